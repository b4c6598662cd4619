"""Int4 by GPTQ (Frantar et al. 2022; round-to-nearest is quant/rtn.py), which quantizes one input
column at a time and spreads each column's rounding error over the columns not yet quantized,
weighted by the inverse Hessian of the layer's inputs H = 2 X X^T / n.

`quantize_checkpoint` runs either over a whole checkpoint one transformer block at a time, so
memory holds one block plus the calibration activations, never the float model."""
import math
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from llama.errors import LlamaInputError
from llama.formats import open_checkpoint
from llama.loader import block_linears, fill, load_outside_blocks, replace_module
from llama.model import Transformer, attention_mask
from quant.linear import Int4Linear, check_group_size
from quant.pack import Int4Weight, pack
from quant.rtn import find_params, quantize_column, rtn

class GPTQ:
    """Accumulates H from a layer's inputs, then quantizes its weight against it."""

    def __init__(self, in_features: int, device=None):
        self.H = torch.zeros(in_features, in_features, device=device)
        self.n = 0

    def add_batch(self, x: torch.Tensor) -> None:
        """x [..., in]: inputs the layer saw on calibration data."""
        x = x.reshape(-1, x.shape[-1]).float()
        m = x.shape[0]
        self.H *= self.n / (self.n + m)
        self.n += m
        x = x * math.sqrt(2 / self.n)
        self.H += x.t() @ x

    def quantize(self, weight: torch.Tensor, group_size: int = 128, act_order: bool = False, sym: bool = False,
                 damp: float = 0.01, block_size: int = 128) -> Int4Weight:
        """weight [out, in] -> int4. act_order takes columns by decreasing H[i, i] (the inputs
        with the most energy first, while there is the most freedom to absorb their error)."""
        W = weight.detach().to(self.H.device, torch.float32, copy=True)
        out_features, in_features = W.shape
        H = self.H.clone()
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        if group_size == -1:
            scale, zero = find_params(W, sym)
            size = in_features
        else:
            size = group_size
            if block_size % group_size:
                block_size = group_size  # a group never straddles two blocks
        perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(in_features, device=W.device)
        W, H = W[:, perm], H[perm][:, perm]
        H.diagonal().add_(damp * torch.mean(torch.diag(H)))
        try:
            Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
        except torch.linalg.LinAlgError:
            raise LlamaInputError("GPTQ: the input Hessian is not positive definite; raise --damp") from None

        Q = torch.zeros_like(W)
        scales, zeros = [], []
        for i1 in range(0, in_features, block_size):
            i2 = min(i1 + block_size, in_features)
            W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(out_features, i2 - i1, device=W.device), Hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = i1 + i
                if group_size != -1 and col % group_size == 0:
                    scale, zero = find_params(W1[:, i:i + group_size], sym)
                if col % size == 0:
                    scales.append(scale)
                    zeros.append(zero)
                w, d = W1[:, i], Hinv1[i, i]
                q = quantize_column(w, scale, zero)
                Q[:, col] = q
                err = (w - scale * (q - zero)) / d
                W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
                Err1[:, i] = err
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

        perm = perm.cpu()
        g_idx = torch.empty(in_features, dtype=torch.int32)
        g_idx[perm] = torch.arange(in_features, dtype=torch.int32) // size
        q_orig = torch.empty_like(Q, device="cpu")
        q_orig[:, perm] = Q.cpu()
        return pack(q_orig, torch.stack(zeros).cpu(), torch.stack(scales).cpu(), g_idx)


# --- whole checkpoints -------------------------------------------------------------------------


def calibration_tokens(path, tokenizer, n_samples: int, seq_len: int) -> torch.Tensor:
    """[n_samples, seq_len] token windows taken evenly from a text file (one tokenization of the
    whole text, bos at the start)."""
    p = Path(path)
    if not p.is_file():
        raise LlamaInputError(f"{p}: calibration file not found")
    try:
        tokens = tokenizer.encode(p.read_text(encoding="utf-8"), bos=True, eos=False)
    except UnicodeDecodeError as e:
        raise LlamaInputError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    need = n_samples * seq_len
    if len(tokens) < need:
        raise LlamaInputError(f"{p}: {len(tokens):,} tokens, too short for {n_samples} samples of {seq_len} "
                              f"(needs {need:,}); give more text, or lower --n_samples / --seq_len")
    stride = (len(tokens) - seq_len) // max(1, n_samples - 1) if n_samples > 1 else 0
    return torch.tensor([tokens[i * stride:i * stride + seq_len] for i in range(n_samples)])


def quantize_checkpoint(ckpt_dir, method: str = "gptq", group_size: int = 128, act_order: bool = False,
                        sym: bool = False, calib: Optional[torch.Tensor] = None, damp: float = 0.01,
                        batch_size: int = 8, progress: bool = True, device="cpu") -> tuple[Transformer, dict]:
    """Quantize every block linear of a checkpoint, block by block. calib [n, seq] tokens (GPTQ).
    Each block and the calibration activations visit `device` (a GPU makes GPTQ practical for
    7B and up); the quantized model is returned on CPU.

    Returns the model with Int4Linear blocks (on CPU) and per-layer stats {path: relative output
    error on the calibration inputs} (GPTQ only)."""
    if method not in ("gptq", "rtn"):
        raise LlamaInputError(f"unknown method {method!r}: use gptq or rtn")
    if method == "gptq" and calib is None:
        raise LlamaInputError("GPTQ needs calibration text (--calib FILE)")
    ckpt = open_checkpoint(ckpt_dir).check()
    model = load_outside_blocks(ckpt, ckpt.args, torch.float32, "cpu")
    for i, block in enumerate(model.layers):
        for name, linear in block_linears(block).items():
            check_group_size(f"layers.{i}.{name}", linear.in_features, group_size)

    stats = {}
    with torch.no_grad():
        if calib is not None and method == "gptq":
            h = model.tok_embeddings(calib).to(device)  # [n, seq, dim]
            seq = calib.shape[1]
            rot = model.rope(torch.arange(seq, device=device)[None])
            mask = attention_mask(seq, 0, None, device)
        for i, block in enumerate(tqdm(model.layers, desc=f"quantizing ({method})", disable=not progress)):
            fill(block, ckpt, f"layers.{i}.", torch.float32, device)
            linears = block_linears(block)
            if method == "gptq":
                gptqs = {name: GPTQ(lin.in_features, device) for name, lin in linears.items()}
                hooks = [lin.register_forward_hook(lambda m, inp, out, g=gptqs[name]: g.add_batch(inp[0]))
                         for name, lin in linears.items()]
                for start in range(0, h.shape[0], batch_size):
                    block(h[start:start + batch_size], 0, rot, mask)
                for hook in hooks:
                    hook.remove()
            for name, lin in linears.items():
                w = gptqs[name].quantize(lin.weight, group_size, act_order, sym, damp) if method == "gptq" \
                    else rtn(lin.weight, group_size, sym)
                replace_module(block, name, Int4Linear.from_int4(w, group_size).to(device))
                if method == "gptq":
                    H = gptqs[name].H
                    delta = lin.weight.float() - block_linears(block)[name].dequantized_weight()
                    stats[f"layers.{i}.{name}"] = float(torch.trace(delta @ H @ delta.t()) /
                                                        torch.trace(lin.weight.float() @ H @ lin.weight.float().t()))
            if method == "gptq":  # the next block calibrates on what this quantized block outputs (in place)
                for s in range(0, h.shape[0], batch_size):
                    h[s:s + batch_size] = block(h[s:s + batch_size], 0, rot, mask)
            block.to("cpu")
    return model.eval(), stats
