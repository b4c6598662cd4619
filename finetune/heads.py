"""What the model is trained to output: next-token logits (sft, pt) or a score head read at the
last token (cls, regression), and the summed losses the trainer normalises."""
import torch
import torch.nn.functional as F
from torch import nn

from llama.model import Transformer
from finetune.prompt_tuning import PromptTuning

LM_TASKS = ("sft", "pt")
SCORE_TASKS = ("cls", "regression")


class ScoreHead(nn.Module):
    """Linear(dim -> num_labels) on the final hidden state, as HF's LlamaForSequenceClassification
    `score` layer (no bias). Kept float32 and replicated on every tensor-parallel rank."""

    def __init__(self, dim: int, num_labels: int, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_labels, dim, device=device) * dim**-0.5)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.to(self.weight.dtype) @ self.weight.T


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy and the number of target tokens.
    logits [batch, seq, vocab] predict labels [batch, seq] shifted by one; -100 is ignored."""
    targets = labels[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
    return loss, (targets != -100).sum()


class TaskModel(nn.Module):
    """The model (maybe prompt-tuned, maybe with LoRA inside) plus what the task reads from it.
    forward returns (summed loss, count it sums over, scores or None) so the trainer can divide by
    the count over the whole optimizer step, across micro-batches and data-parallel ranks."""

    def __init__(self, model: nn.Module, task: str, head: ScoreHead | None = None):
        super().__init__()
        self.model = model  # a Transformer or a PromptTuning around one
        self.task = task
        self.head = head

    @property
    def transformer(self) -> Transformer:
        return self.model.model if isinstance(self.model, PromptTuning) else self.model

    def encode(self, tokens, pad_lens=None, segment_ids=None) -> torch.Tensor:
        """tokens [batch, seq] -> final hidden states [batch, seq, dim]."""
        if isinstance(self.model, PromptTuning):
            return self.model.encode(tokens, pad_lens)
        return self.model.hidden_states(self.model.tok_embeddings(tokens), 0, pad_lens, segment_ids)

    def forward(self, tokens, labels, pad_lens=None, segment_ids=None):
        """tokens [batch, seq]; labels [batch, seq] token ids (-100 = no loss) for LM tasks,
        [batch] class ids for cls, [batch] floats for regression."""
        hidden = self.encode(tokens, pad_lens, segment_ids)
        if self.task in LM_TASKS:
            loss, count = lm_loss_sum(self.transformer.output(hidden), labels)
            return loss, count, None
        scores = self.head(hidden[:, -1])  # left padding: the last slot is each row's last token
        if self.task == "cls":
            loss = F.cross_entropy(scores, labels, reduction="sum")
        else:
            scores = scores.squeeze(-1)
            loss = F.mse_loss(scores, labels.to(scores.dtype), reduction="sum")
        return loss, torch.tensor(labels.shape[0], device=loss.device), scores.detach()
