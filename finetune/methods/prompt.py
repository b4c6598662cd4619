"""Prompt tuning: P learned embeddings ("virtual tokens") placed right before each row's first
real token. Rows are left-padded, so the order is [pad..., virtual..., real...] and the model
counts positions from the first virtual token, as if the prompt were P extra tokens of text.

PromptTuning wraps a Transformer with the same forward(tokens, start_pos, pad_lens), so
llama.generation decodes with it unchanged: the virtual tokens enter the KV cache at prefill
(start_pos 0) and later steps are shifted by P cache slots.

Saved in PEFT's format: one tensor, `prompt_embeddings` [P, dim].
"""
import contextlib

import torch
from torch import nn

from llama.errors import LlamaInputError
from llama.model import Transformer
from llama.peft import trained_on
from llama.tokenizers import Tokenizer
from finetune.methods.base import Method, register_method


class PromptTuning(nn.Module):
    def __init__(self, model: Transformer, init_embeddings: torch.Tensor):
        super().__init__()
        self.model = model
        self.prompt_embeddings = nn.Parameter(init_embeddings.detach().float().clone())  # [P, dim]
        self.disabled = False  # no virtual tokens: the base alone (DPO's reference), see Prompt.reference

    @property
    def n_virtual(self) -> int:
        return self.prompt_embeddings.shape[0]

    @property
    def tok_embeddings(self) -> nn.Module:
        return self.model.tok_embeddings

    @property
    def args(self):
        return self.model.args

    def setup_caches(self, max_batch_size: int, max_seq_len: int) -> None:
        self.model.setup_caches(max_batch_size, max_seq_len + self.n_virtual)

    def clear_caches(self) -> None:
        self.model.clear_caches()

    def insert(self, h: torch.Tensor, pad_lens: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings h [batch, seq, dim] -> [batch, P + seq, dim] with the virtual tokens
        between each row's padding and its first real token."""
        bsz, seqlen, _ = h.shape
        p = self.n_virtual
        prompt = self.prompt_embeddings.to(h.dtype).expand(bsz, p, -1)
        both = torch.cat([prompt, h], dim=1)  # slot i < P: virtual token i; slot P + j: token j
        pad = torch.zeros(bsz, 1, dtype=torch.long, device=h.device) if pad_lens is None else pad_lens[:, None]
        j = torch.arange(p + seqlen, device=h.device)[None]
        src = torch.where(j < pad, p + j, torch.where(j < pad + p, j - pad, j))
        return both.gather(1, src[..., None].expand(-1, -1, h.shape[-1]))

    def encode(self, tokens: torch.Tensor, pad_lens: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [batch, seq] -> final hidden states [batch, seq, dim] of the real slots."""
        if self.disabled:
            return self.model.hidden_states(self.model.tok_embeddings(tokens), 0, pad_lens)
        h = self.insert(self.model.tok_embeddings(tokens), pad_lens)
        hidden = self.model.hidden_states(h, 0, pad_lens)
        return self._drop_virtual(hidden, pad_lens)

    def _drop_virtual(self, hidden: torch.Tensor, pad_lens: torch.Tensor | None) -> torch.Tensor:
        """[batch, P + seq, dim] -> [batch, seq, dim]: the inverse of insert's slot order."""
        bsz, total, _ = hidden.shape
        p = self.n_virtual
        pad = torch.zeros(bsz, 1, dtype=torch.long, device=hidden.device) if pad_lens is None else pad_lens[:, None]
        j = torch.arange(total - p, device=hidden.device)[None]
        src = torch.where(j < pad, j, j + p)
        return hidden.gather(1, src[..., None].expand(-1, -1, hidden.shape[-1]))

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, pad_lens: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """tokens [batch, seq] -> logits [batch, seq, vocab] (float32), or [batch, 1, vocab] with
        last_only, as Transformer.forward."""
        if start_pos == 0:
            hidden = self.encode(tokens, pad_lens)
        else:
            hidden = self.model.hidden_states(self.model.tok_embeddings(tokens), start_pos + self.n_virtual, pad_lens)
        return self.model.output(hidden[:, -1:] if last_only else hidden).float()


@torch.no_grad()
def init_prompt(model: Transformer, tokenizer: Tokenizer, n_virtual: int, how: str, text: str = "",
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Initial virtual-token embeddings [n_virtual, dim] (float32):
    text: the embeddings of `text`'s tokens, repeated to fill n_virtual;
    vocab: the embeddings of tokens drawn at random from the vocabulary;
    random: normal noise with the embedding table's own spread."""
    if n_virtual < 1:
        raise LlamaInputError(f"num_virtual_tokens must be at least 1, got {n_virtual}")
    device = model.tok_embeddings.weight.device
    vocab = model.args.vocab_size
    if how == "text":
        ids = tokenizer.encode(text, bos=False, eos=False)
        if not ids:
            raise LlamaInputError("prompt_init = 'text' needs a non-empty prompt_init_text")
        ids = (ids * (n_virtual // len(ids) + 1))[:n_virtual]
        return model.tok_embeddings(torch.tensor(ids, device=device)).float()
    if how == "vocab":
        ids = torch.randint(vocab, (n_virtual,), generator=generator)
        return model.tok_embeddings(ids.to(device)).float()
    if how == "random":
        sample = model.tok_embeddings(torch.randperm(vocab, generator=generator)[:1024].to(device)).float()
        return torch.randn(n_virtual, sample.shape[-1], generator=generator).to(device) * sample.std()
    raise LlamaInputError(f"prompt_init must be text, vocab or random, not {how!r}")


@register_method
class Prompt(Method):
    name = "prompt"
    peft_type = "PROMPT_TUNING"
    packs = False  # the virtual tokens go before each row's first token, not each sample's

    def attach(self, model, cfg, tokenizer):
        gen = torch.Generator().manual_seed(cfg.seed)
        return PromptTuning(model, init_prompt(model, tokenizer, cfg.num_virtual_tokens, cfg.prompt_init,
                                               cfg.prompt_init_text, gen))

    has_reference = True

    @contextlib.contextmanager
    def reference(self, model):
        """Encode without the virtual tokens."""
        model.disabled = True
        try:
            yield
        finally:
            model.disabled = False

    def adapter_tensors(self, model):
        return {"prompt_embeddings": model.prompt_embeddings.detach()}

    def peft_config(self, cfg, model):
        args = model.args
        init = {"text": "TEXT", "vocab": "SAMPLE_VOCAB", "random": "RANDOM"}[cfg.prompt_init]
        return {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": model.n_virtual, "token_dim": args.dim,
                "num_transformer_submodules": 1, "num_attention_heads": args.n_heads, "num_layers": args.n_layers,
                "prompt_tuning_init": init, "prompt_tuning_init_text": cfg.prompt_init_text if init == "TEXT" else None,
                # PEFT insists on a tokenizer for TEXT init, though in inference mode it never loads it
                "tokenizer_name_or_path": cfg.tokenizer_path or cfg.ckpt_dir}

    def load(self, model, config, tensors, where):
        prompt = tensors["prompt_embeddings"]
        if prompt.shape[-1] != model.args.dim:
            raise LlamaInputError(f"{where}: prompt width {prompt.shape[-1]} but the model's dim is {model.args.dim}"
                                  f"{trained_on(config)}")
        return PromptTuning(model, prompt.to(model.tok_embeddings.weight.device))
