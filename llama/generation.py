"""Llama.build and batched text/chat completion with left padding and a KV cache."""
import functools
from typing import Callable, Optional

import torch

from llama.chat import Message, encode_dialog
from llama.cpu_kind import auto_dtype
from llama.distributed import setup_model_parallel
from llama.errors import LlamaInputError
from llama.formats import read_model_args
from llama.loader import load_model
from llama.model import Transformer
from llama.placement import device_shares, place_layers, resolve_devices
from llama.tokenizers import Tokenizer, check_vocab, find_tokenizer

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def parse_dtype(dtype, device="cpu") -> torch.dtype:
    """A dtype by name; "auto" is llama.cpu_kind.auto_dtype's choice for `device`."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return auto_dtype(device)[0]
    if dtype not in DTYPES:
        raise LlamaInputError(f"unknown dtype {dtype!r}; choose from auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def sample(logits: torch.Tensor, temperature: float, top_p: float, top_k: Optional[int], generator) -> torch.Tensor:
    """Next token [batch] from logits [batch, vocab]: greedy at temperature 0, else top-k, then
    nucleus (top-p) sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    if top_k is not None:
        sorted_probs[:, top_k:] = 0
    # drop tokens once the mass before them exceeds top_p (the first token always stays)
    sorted_probs[(sorted_probs.cumsum(-1) - sorted_probs) > top_p] = 0
    sorted_probs /= sorted_probs.sum(-1, keepdim=True)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


# Llama(compile=...): the torch.compile options of each mode
COMPILE_MODES = {
    # one graph for every cache position (dynamic), the weights read from the model at each call
    "default": {"dynamic": True},
    # the weights frozen into the graph as constants, so inductor may repack them and time its own
    # GEMM kernels against ATen's per shape. On CPU its C++ micro-GEMM reads one-row products' weights
    # near the memory bandwidth, where MKL's GEMV falls short (docs/benchmarks.md). A graph per
    # batch size and one for every later position; ~1 min to compile on 2 cores; a second copy of
    # the weights it repacks; weights changed after the first step are not seen.
    "max": {"dynamic": None, "options": {"freezing": True, "max_autotune": True}},
}


def compile_mode(compile) -> Optional[str]:
    """None (eager), "default" or "max" from a bool or a mode name."""
    if compile in (False, None):
        return None
    if compile is True:
        return "default"
    if compile not in COMPILE_MODES:
        raise LlamaInputError(f"unknown compile mode {compile!r}; choose from {', '.join(COMPILE_MODES)}")
    return compile


def _without_grad(method: Callable) -> Callable:
    """Run a Llama method under torch.inference_mode, or no_grad (see Llama's inference_mode)."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with torch.inference_mode() if self.inference_mode else torch.no_grad():
            return method(self, *args, **kwargs)
    return run


class Llama:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_seq_len: int, max_batch_size: int, seed: int = 1,
                 compile=False, inference_mode: bool = True):
        """compile: run the one-token decode steps through torch.compile (the prompt stays eager),
        True or "default", or "max" (COMPILE_MODES). The default takes 15-50 s (2 CPU cores) at the
        first generate; each token after it skips most of the ~1,000 small-op dispatches of an
        eager step (bench/decode.py). "max" also freezes the weights into the graph.
        inference_mode False: generate under no_grad instead, for a model in training whose
        weights are gathered into buffers the training step reuses (FSDP): tensors made in
        inference mode cannot be written outside it."""
        self.model = model
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.max_batch_size = max_batch_size
        # every rank draws the same samples from the same (gathered) logits
        self.generator = torch.Generator(device=model.tok_embeddings.weight.device).manual_seed(seed)
        self.compile = compile_mode(compile)
        self.inference_mode = inference_mode
        self._compiled: Optional[tuple] = None  # (model, its compiled form): the model may be swapped for an adapter's

    def decode_step(self) -> Callable:
        """The model, or its compiled form for one-token steps."""
        if not self.compile:
            return self.model
        if self._compiled is None or self._compiled[0] is not self.model:
            self._compiled = (self.model, torch.compile(self.model, **COMPILE_MODES[self.compile]))
        return self._compiled[1]

    @staticmethod
    def build(
        ckpt_dir,
        tokenizer_path=None,
        max_seq_len: int = 512,
        max_batch_size: int = 4,
        dtype="float32",
        device: Optional[str] = None,
        seed: int = 1,
        devices=None,
        compile=False,
        quant: str = "none",
        group_size: int = 128,
    ) -> "Llama":
        """Load a checkpoint (Meta, HF or ours) and its tokenizer. Under torchrun each rank loads
        its own tensor-parallel shard. `devices` (a list, "cuda:0,cuda:1" or "auto") spreads
        contiguous layer ranges over several devices in this one process instead. quant and
        group_size as in llama.loader.load_model (int4/NF4 bases; `import quant` registers them)."""
        if devices is not None:
            devices = resolve_devices(devices)
            device = "cpu"  # load (mmap'd) on the host, then move each layer range to its device
        rank, world, device = setup_model_parallel(device)
        args = read_model_args(ckpt_dir)
        tokenizer = Tokenizer(tokenizer_path or find_tokenizer(ckpt_dir))
        check_vocab(args, tokenizer)
        model = load_model(ckpt_dir, args, parse_dtype(dtype, devices[0] if devices else device), device, rank, world,
                           quant, group_size)
        if devices is not None:
            place_layers(model, devices, device_shares(devices))
        model.setup_caches(max_batch_size, max_seq_len)
        return Llama(model, tokenizer, max_seq_len, max_batch_size, seed, compile)

    @_without_grad
    def generate(
        self,
        prompt_tokens: list[list[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        top_k: Optional[int] = None,
        on_token: Optional[Callable[[int], None]] = None,
    ) -> list[list[int]]:
        """Generate up to max_gen_len tokens after each prompt; each row stops at its first stop
        token (eos; Llama-3 also `<|eot_id|>` and `<|eom_id|>`), which is not returned.
        Prompts are left-padded into one batch. on_token(token) streams row 0's tokens."""
        bsz = len(prompt_tokens)
        if bsz > self.max_batch_size:
            raise LlamaInputError(f"{bsz} prompts but max_batch_size is {self.max_batch_size}")
        if min(map(len, prompt_tokens)) == 0:
            raise LlamaInputError("empty prompt")
        prompt_len = max(map(len, prompt_tokens))
        if prompt_len >= self.max_seq_len:
            raise LlamaInputError(f"prompt of {prompt_len} tokens does not fit max_seq_len {self.max_seq_len}")
        total_len = min(self.max_seq_len, prompt_len + max_gen_len)
        device = self.model.tok_embeddings.weight.device

        tokens = torch.full((bsz, prompt_len), self.tokenizer.pad_id, dtype=torch.long, device=device)
        for row, prompt in enumerate(prompt_tokens):
            tokens[row, prompt_len - len(prompt):] = torch.tensor(prompt, device=device)
        pad_lens = torch.tensor([prompt_len - len(p) for p in prompt_tokens], device=device)
        if not pad_lens.any():
            pad_lens = None  # no padding: no masks to build, and SDPA's unmasked kernels

        stop_ids = torch.tensor(sorted(self.tokenizer.stop_ids), device=device)
        out: list[list[int]] = [[] for _ in range(bsz)]
        done = torch.zeros(bsz, dtype=torch.bool, device=device)
        logits = self.model(tokens, 0, pad_lens, last_only=True)[:, -1].to(device)
        step = self.decode_step()
        for cur_pos in range(prompt_len, total_len):
            next_token = sample(logits, temperature, top_p, top_k, self.generator)
            next_token = torch.where(done, self.tokenizer.eos_id, next_token)
            stopped = torch.isin(next_token, stop_ids)
            for row, (tok, stop, finished) in enumerate(zip(next_token.tolist(), stopped.tolist(), done.tolist())):
                if not finished and not stop:
                    out[row].append(tok)
                    if row == 0 and on_token is not None:
                        on_token(tok)
            done |= stopped
            if done.all() or cur_pos + 1 == total_len:
                break
            logits = step(next_token[:, None], cur_pos, pad_lens)[:, -1].to(device)
        return out

    def text_completion(
        self,
        prompts: list[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        top_k: Optional[int] = None,
        max_gen_len: Optional[int] = None,
        on_text: Optional[Callable[[str], None]] = None,
    ) -> list[dict]:
        """[{"generation": str}] for each prompt. on_text streams the first prompt's new text."""
        prompt_tokens = [self.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
        return self._complete(prompt_tokens, temperature, top_p, top_k, max_gen_len, on_text)

    def chat_completion(
        self,
        dialogs: list[list[Message]],
        temperature: float = 0.6,
        top_p: float = 0.9,
        top_k: Optional[int] = None,
        max_gen_len: Optional[int] = None,
        on_text: Optional[Callable[[str], None]] = None,
    ) -> list[dict]:
        """[{"generation": {"role": "assistant", "content": str}}] for each dialog, in the chat
        format of the tokenizer's vocabulary (Llama-2's or Llama-3's, llama/chat.py)."""
        prompt_tokens = [self.encode_dialog(d) for d in dialogs]
        results = self._complete(prompt_tokens, temperature, top_p, top_k, max_gen_len, on_text)
        return [{"generation": {"role": "assistant", "content": r["generation"]}} for r in results]

    def _complete(self, prompt_tokens, temperature, top_p, top_k, max_gen_len, on_text):
        if max_gen_len is None:
            max_gen_len = self.max_seq_len - 1
        on_token = None
        if on_text is not None:
            stream = self.tokenizer.stream(context=prompt_tokens[0])
            on_token = lambda tok: on_text(stream.push(tok))  # noqa: E731
        generated = self.generate(prompt_tokens, max_gen_len, temperature, top_p, top_k, on_token)
        return [{"generation": self.tokenizer.decode(t)} for t in generated]

    def encode_dialog(self, dialog: list[Message]) -> list[int]:
        """The dialog's prompt tokens in the tokenizer's chat format (llama/chat.py)."""
        return encode_dialog(self.tokenizer, dialog)
