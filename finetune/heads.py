"""What the model is trained to output: next-token logits (sft, pt), a score head read at the
last token (cls, regression, rm), or answer log-probabilities beside a reference's (dpo), and the
summed losses the trainer normalises."""
import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from llama.cpu_linear import Linear
from llama.model import Transformer
from finetune.methods.base import base_transformer
from finetune.tasks.dpo import DPOSettings, dpo_loss
from finetune.tasks.rm import rm_loss

LM_TASKS = ("sft", "pt")
SCORE_TASKS = ("cls", "regression", "rm")  # a score head replaces the output layer


class ScoreHead(nn.Module):
    """Linear(dim -> num_labels) on the final hidden state, as HF's LlamaForSequenceClassification
    `score` layer (no bias). Kept float32 and replicated on every tensor-parallel rank."""

    def __init__(self, dim: int, num_labels: int, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_labels, dim, device=device) * dim**-0.5)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.to(self.weight.dtype) @ self.weight.T


class LinearCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy [tokens] of the logits hidden @ weight.T against targets, computed
    in chunks of rows, keeping for backward only d(loss)/d(logits) = softmax - onehot [tokens, vocab].
    Each token's incoming gradient scales only the [tokens, dim] side of backward, so a loss that
    weighs tokens unequally (DPO's per-sequence terms) costs no extra pass over the vocabulary.

    The plain path keeps the logits, their log-softmax and then their gradient (three tensors of
    that size) and makes two more passes over them in backward; here the logits are written chunk
    by chunk into the gradient's buffer and turned into the gradient there (through float32
    temporaries per chunk when they are 16-bit), and backward is two matmuls."""

    CHUNK_ELEMENTS = 1 << 24  # logits per chunk: bounds 16-bit logits' float32 temporary (64 MiB)

    @staticmethod
    def forward(ctx, hidden, weight, targets):
        """hidden [tokens, dim], weight [vocab, dim], targets [tokens] -> losses [tokens] (float32).
        Under autocast the matmuls, forward and backward, run in its dtype, as nn.Linear's would."""
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        ctx.dtypes = hidden.dtype, weight.dtype
        hidden, weight = hidden.to(dtype), weight.to(dtype)  # once: autocast recasts a frozen weight per use
        vocab = weight.shape[0]
        # 16-bit training keeps the gradient in 16 bits, as autograd would through 16-bit logits
        grad = torch.empty(hidden.shape[0], vocab, device=hidden.device,
                           dtype=dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32)
        loss = torch.empty(hidden.shape[0], device=hidden.device)
        rows = max(1, LinearCrossEntropy.CHUNK_ELEMENTS // vocab)
        for start in range(0, hidden.shape[0], rows):
            chunk, t = grad[start:start + rows], targets[start:start + rows, None]
            # the logits go where their gradient will: one [rows, vocab] temporary fewer
            logits = torch.mm(hidden[start:start + rows], weight.t(), out=chunk if chunk.dtype == dtype else None)
            # log_softmax is one fused kernel; logsumexp and a subtraction took twice as long here.
            # A float32 buffer takes it in place (each row is read before it is written): no
            # [rows, vocab] temporary at all; 16-bit logits get a float32 one.
            log_probs = torch.log_softmax(logits.float(), dim=-1, out=chunk if chunk.dtype == torch.float32 else None)
            loss[start:start + rows] = -log_probs.gather(1, t)[:, 0]
            if chunk.dtype == log_probs.dtype:
                torch.exp(log_probs, out=chunk)
            else:
                chunk.copy_(log_probs.exp_())
            # - onehot; scatter_add_ would take a float32 copy of a 16-bit chunk on CPU
            chunk[torch.arange(len(t), device=chunk.device), t[:, 0]] -= 1
        ctx.save_for_backward(hidden, weight, grad)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable  # the saved gradient is not a function of the inputs
    def backward(ctx, grad_loss):
        hidden, weight, grad = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        grad_hidden = grad_weight = None
        scale = grad_loss[:, None].to(hidden.dtype)  # scales the [tokens, dim] side, never a [vocab, ...] tensor
        if ctx.needs_input_grad[0]:
            grad_hidden = ((grad.to(weight.dtype) @ weight) * scale).to(hidden_dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad.t().to(hidden.dtype) @ (hidden * scale)).to(weight_dtype)
        return grad_hidden, grad_weight, None


def token_losses(hidden: torch.Tensor, output: nn.Module, labels: torch.Tensor,
                 fused: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy of each target token of the logits output(hidden): losses
    [targets] and the mask keep [batch, seq - 1] of where they are. hidden [batch, seq, dim]
    predicts labels [batch, seq] shifted by one; -100 is ignored, and slots without a target get
    no logits at all. fused: through LinearCrossEntropy where it applies (default: when there is
    a gradient to keep; DPO's reference asks for it without one, to round as the policy does)."""
    targets = labels[:, 1:]
    keep = targets != -100
    hidden, targets = hidden[:, :-1][keep], targets[keep]
    fused = torch.is_grad_enabled() if fused is None else fused
    if type(output) in (nn.Linear, Linear) and output.bias is None and fused:
        return LinearCrossEntropy.apply(hidden, output.weight, targets), keep
    # evaluation keeps no gradient; a tensor-parallel output layer gathers its logits itself
    return F.cross_entropy(output(hidden).float(), targets, reduction="none"), keep


def lm_loss_sum(hidden: torch.Tensor, output: nn.Module, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy (see token_losses) and the number of target tokens."""
    losses, keep = token_losses(hidden, output, labels)
    return losses.sum(), keep.sum()


def sequence_logps(hidden: torch.Tensor, output: nn.Module, labels: torch.Tensor,
                   fused: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed log-probability of its target tokens under the logits output(hidden), and
    their count: hidden [rows, seq, dim], labels [rows, seq] (-100: not a target) -> logps [rows]
    (float32), lengths [rows]. Through LinearCrossEntropy where it applies (no [tokens, vocab]
    logits, log-softmax and gradient side by side)."""
    losses, keep = token_losses(hidden, output, labels, fused)
    rows = torch.arange(keep.shape[0], device=keep.device)[:, None].expand_as(keep)[keep]
    logps = torch.zeros(keep.shape[0], device=losses.device, dtype=losses.dtype).index_add(0, rows, -losses)
    return logps, keep.sum(1)


class TaskModel(nn.Module):
    """The model (maybe prompt-tuned, maybe with LoRA inside) plus what the task reads from it.
    forward returns (summed loss, count it sums over, scores or metric sums or None) so the trainer
    can divide by the count over the whole optimizer step, across micro-batches and data-parallel
    ranks. The count is target tokens (sft, pt), samples (cls, regression) or pairs (rm, dpo).

    dpo: the loss settings; reference: a context manager factory under which the model computes
    the reference (the method switched off: LoRA skipped, no virtual tokens), or None when the
    method can't (full, freeze: their reference log-probs are precomputed into the batch)."""

    def __init__(self, model: nn.Module, task: str, head: ScoreHead | None = None,
                 dpo: DPOSettings | None = None, reference=None):
        super().__init__()
        self.model = model  # a Transformer, or a method's wrapper around one (prompt tuning)
        self.task = task
        self.head = head
        self.dpo = dpo or DPOSettings()
        self.reference = reference

    @property
    def transformer(self) -> Transformer:
        return base_transformer(self.model)

    def encode(self, tokens, pad_lens=None, segment_ids=None) -> torch.Tensor:
        """tokens [batch, seq] -> final hidden states [batch, seq, dim]. A wrapper that adds
        inputs of its own (prompt tuning's virtual tokens) encodes them itself."""
        if self.model is not self.transformer:
            return self.model.encode(tokens, pad_lens)
        return self.model.hidden_states(self.model.tok_embeddings(tokens), 0, pad_lens, segment_ids)

    @torch.no_grad()
    def reference_logps(self, tokens, labels, pad_lens=None, fused: bool | None = None) -> torch.Tensor:
        """The reference model's summed answer log-probs [rows], without gradients: this model
        with its method switched off (see `reference`), or as it is now for a method that can't
        be (full, freeze: called once before training, precompute_ref). fused: see token_losses."""
        with self.reference() if self.reference else contextlib.nullcontext():
            return sequence_logps(self.encode(tokens, pad_lens), self.transformer.output, labels, fused)[0]

    def forward(self, tokens, labels, pad_lens=None, segment_ids=None, ref_logps=None):
        """tokens [batch, seq]; labels [batch, seq] token ids (-100 = no loss) for LM tasks and
        the preference tasks, [batch] class ids for cls, [batch] floats for regression. rm and dpo
        take 2 * pairs rows, the chosen answers first (collate); ref_logps [2 * pairs] (dpo): the
        reference's answer log-probs when precomputed."""
        if self.task == "dpo":
            if ref_logps is None:
                if self.reference is None:  # the model itself would be its own moving reference
                    raise RuntimeError("method trains the base: dpo needs precompute_ref")
                # the policy's own arithmetic: a fresh LoRA's rewards are then exactly 0, not rounding noise
                ref_logps = self.reference_logps(tokens, labels, pad_lens, fused=torch.is_grad_enabled())
            logps, lengths = sequence_logps(self.encode(tokens, pad_lens), self.transformer.output, labels)
            loss, metrics = dpo_loss(logps, ref_logps, lengths, self.dpo)
            return loss, torch.tensor(tokens.shape[0] // 2, device=loss.device), metrics
        hidden = self.encode(tokens, pad_lens, segment_ids)
        if self.task in LM_TASKS:
            loss, count = lm_loss_sum(hidden, self.transformer.output, labels)
            return loss, count, None
        scores = self.head(hidden[:, -1])  # left padding: the last slot is each row's last token
        if self.task == "rm":
            loss, metrics = rm_loss(scores.squeeze(-1))
            return loss, torch.tensor(tokens.shape[0] // 2, device=loss.device), metrics
        if self.task == "cls":
            loss = F.cross_entropy(scores, labels, reduction="sum")
        else:
            scores = scores.squeeze(-1)
            loss = F.mse_loss(scores, labels.to(scores.dtype), reduction="sum")
        return loss, torch.tensor(labels.shape[0], device=loss.device), scores.detach()
