"""finetune.heads.lm_loss_sum and LinearCrossEntropy (the chunked fused output-layer + summed
cross-entropy) against plain torch in float64:
F.cross_entropy(logits[:, :-1], labels[:, 1:], ignore_index=-100, reduction="sum")."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from finetune.heads import LinearCrossEntropy, TaskModel, lm_loss_sum
from finetune.methods.prompt import PromptTuning
from llama.model import Transformer
from llama.cpu_linear import Linear
from tests.utils import CountCalls, rel_err, tiny_args

TOL = 1e-5  # float32 against float64, relative to the largest value compared
# bfloat16 hidden/weight: the logits and the stored softmax - onehot are rounded to bf16 (8 bits of
# mantissa, relative step 2^-8 = 0.4%). Against float64 on the same bf16 inputs: loss within 0.4%
# (one bf16 step; measured <= 5e-4), each gradient within 1.6% of its largest entry (four steps;
# measured <= 6e-3).
TOL_BF16_LOSS, TOL_BF16_GRAD = 2**-8, 2**-6

BATCH, SEQ, DIM, VOCAB = 3, 9, 16, 37


def make_inputs(seed: int = 0, dtype=torch.float32, ignore_frac: float = 0.3, vocab: int = VOCAB):
    """hidden [BATCH, SEQ, DIM], weight [vocab, DIM] (logits O(1-3)), labels with some -100."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(BATCH, SEQ, DIM, generator=g)
    weight = torch.randn(vocab, DIM, generator=g) * (2.0 / math.sqrt(DIM))
    labels = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
    labels[torch.rand(BATCH, SEQ, generator=g) < ignore_frac] = -100
    labels[0, 3] = labels[2, -1] = -100  # at least two ignored targets
    labels[1, 4] = 0  # target 0 is a real class, not "ignored"
    return hidden.to(dtype), weight.to(dtype), labels


def reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias=None, scale: float = 1.0):
    """float64 plain path: (loss, count, grad hidden, grad weight[, grad bias]) of scale * loss."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    b = None if bias is None else bias.detach().double().requires_grad_()
    logits = F.linear(h, w, b)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")
    (loss * scale).backward()
    count = (labels[:, 1:] != -100).sum()
    return loss.detach(), count, h.grad, w.grad, None if b is None else b.grad


def output_layer(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


def took_fused_path(loss: torch.Tensor) -> bool:
    """The summed loss is the sum of LinearCrossEntropy's per-token losses."""
    return any("LinearCrossEntropy" in type(fn).__name__ for fn, _ in loss.grad_fn.next_functions if fn is not None)


# --- the fused path (output is a bias-free nn.Linear) ---------------------------------------------


@pytest.mark.parametrize("layer_cls", [nn.Linear, Linear], ids=["nn.Linear", "parallel.Linear"])
def test_fused_loss_count_and_grads_match_float64(layer_cls):
    hidden0, weight0, labels = make_inputs(seed=1)
    out = layer_cls(DIM, VOCAB) if layer_cls is Linear else layer_cls(DIM, VOCAB, bias=False)
    with torch.no_grad():
        out.weight.copy_(weight0)
    hidden = hidden0.clone().requires_grad_()
    loss, count = lm_loss_sum(hidden, out, labels)
    assert took_fused_path(loss)
    assert loss.dtype == torch.float32 and loss.shape == ()
    loss.backward()
    ref_loss, ref_count, ref_gh, ref_gw, _ = reference(hidden0, weight0, labels)
    assert ref_count > 0 and (labels[:, 1:] == -100).any()
    assert int(count) == int(ref_count)
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() <= TOL
    assert rel_err(hidden.grad, ref_gh) <= TOL
    assert rel_err(out.weight.grad, ref_gw) <= TOL
    assert hidden.grad.dtype == torch.float32 and out.weight.grad.dtype == torch.float32


def test_ignored_and_last_slots_get_no_logits():
    """Slots whose target is -100, and each row's last slot (no next token), are dropped before
    the matmul: inf there changes nothing and their gradient is exactly 0."""
    hidden0, weight0, labels = make_inputs(seed=2)
    no_target = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    no_target[:, :-1] = labels[:, 1:] == -100
    no_target[:, -1] = True
    dirty = hidden0.clone()
    dirty[no_target] = float("inf")
    hidden = dirty.requires_grad_()
    out = output_layer(weight0)
    loss, count = lm_loss_sum(hidden, out, labels)
    loss.backward()
    ref_loss, ref_count, ref_gh, ref_gw, _ = reference(hidden0, weight0, labels)
    assert torch.isfinite(loss) and int(count) == int(ref_count)
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() <= TOL
    assert torch.equal(hidden.grad[no_target], torch.zeros_like(hidden.grad[no_target]))
    assert rel_err(hidden.grad, ref_gh) <= TOL
    assert rel_err(out.weight.grad, ref_gw) <= TOL


@pytest.mark.parametrize("rows_per_chunk", [1, 3, 4])
def test_chunked_matches_float64(monkeypatch, rows_per_chunk):
    """CHUNK_ELEMENTS forced to a few rows of logits: several chunks and a final partial one."""
    monkeypatch.setattr(LinearCrossEntropy, "CHUNK_ELEMENTS", rows_per_chunk * VOCAB)
    hidden0, weight0, labels = make_inputs(seed=3)
    kept = int((labels[:, 1:] != -100).sum())
    chunks = math.ceil(kept / rows_per_chunk)
    assert chunks >= 4
    if rows_per_chunk > 1:
        assert kept % rows_per_chunk != 0  # the last chunk is partial
    hidden, out = hidden0.clone().requires_grad_(), output_layer(weight0)
    with CountCalls() as calls:
        loss, count = lm_loss_sum(hidden, out, labels)
    assert took_fused_path(loss)
    assert calls.names.count("log_softmax") == chunks  # one pass per chunk
    loss.backward()
    ref_loss, ref_count, ref_gh, ref_gw, _ = reference(hidden0, weight0, labels)
    assert int(count) == int(ref_count) == kept
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() <= TOL
    assert rel_err(hidden.grad, ref_gh) <= TOL
    assert rel_err(out.weight.grad, ref_gw) <= TOL


def test_frozen_weight_gets_no_grad():
    hidden0, weight0, labels = make_inputs(seed=4)
    out = output_layer(weight0).requires_grad_(False)
    hidden = hidden0.clone().requires_grad_()
    loss, _ = lm_loss_sum(hidden, out, labels)
    assert took_fused_path(loss)
    loss.backward()
    assert out.weight.grad is None
    _, _, ref_gh, _, _ = reference(hidden0, weight0, labels)
    assert rel_err(hidden.grad, ref_gh) <= TOL


def test_weight_grad_only():
    """hidden not requiring grad (a frozen body): only the weight gets a gradient."""
    hidden0, weight0, labels = make_inputs(seed=5)
    out = output_layer(weight0)
    loss, _ = lm_loss_sum(hidden0, out, labels)
    loss.backward()
    _, _, _, ref_gw, _ = reference(hidden0, weight0, labels)
    assert rel_err(out.weight.grad, ref_gw) <= TOL


@pytest.mark.parametrize("scale", [0.37, -2.5])
def test_upstream_gradient_scales_grads(scale):
    hidden0, weight0, labels = make_inputs(seed=6)
    hidden, out = hidden0.clone().requires_grad_(), output_layer(weight0)
    loss, _ = lm_loss_sum(hidden, out, labels)
    (loss * scale).backward()
    _, _, ref_gh, ref_gw, _ = reference(hidden0, weight0, labels, scale=scale)
    assert rel_err(hidden.grad, ref_gh) <= TOL
    assert rel_err(out.weight.grad, ref_gw) <= TOL


def test_bfloat16_matches_float64_within_bf16_tolerance():
    hidden0, weight0, labels = make_inputs(seed=7, dtype=torch.bfloat16)
    hidden, out = hidden0.clone().requires_grad_(), output_layer(weight0)
    assert out.weight.dtype == torch.bfloat16
    loss, count = lm_loss_sum(hidden, out, labels)
    assert took_fused_path(loss)
    loss.backward()
    # the reference sees the same bf16 values, upcast: only the arithmetic differs
    ref_loss, ref_count, ref_gh, ref_gw, _ = reference(hidden0, weight0, labels)
    assert int(count) == int(ref_count)
    assert hidden.grad.dtype == torch.bfloat16 and out.weight.grad.dtype == torch.bfloat16
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() <= TOL_BF16_LOSS
    assert rel_err(hidden.grad, ref_gh) <= TOL_BF16_GRAD
    assert rel_err(out.weight.grad, ref_gw) <= TOL_BF16_GRAD


# --- the fallback (any other output module) ---------------------------------------------------------


class Wrapped(nn.Module):
    """Not an nn.Linear (as a tensor-parallel or LoRA output layer): lm_loss_sum calls it."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.inner = nn.Linear(weight.shape[1], weight.shape[0], bias=True)
        with torch.no_grad():
            self.inner.weight.copy_(weight)
            self.inner.bias.copy_(bias)

    def forward(self, x):
        return self.inner(x)


@pytest.mark.parametrize("kind", ["wrapped", "linear_with_bias"])
def test_fallback_matches_float64(kind):
    hidden0, weight0, labels = make_inputs(seed=8)
    bias0 = torch.randn(VOCAB, generator=torch.Generator().manual_seed(9))
    out = Wrapped(weight0, bias0) if kind == "wrapped" else nn.Linear(DIM, VOCAB, bias=True)
    if kind == "linear_with_bias":
        with torch.no_grad():
            out.weight.copy_(weight0)
            out.bias.copy_(bias0)
    lin = out.inner if kind == "wrapped" else out
    hidden = hidden0.clone().requires_grad_()
    loss, count = lm_loss_sum(hidden, out, labels)
    assert not took_fused_path(loss)
    loss.backward()
    ref_loss, ref_count, ref_gh, ref_gw, ref_gb = reference(hidden0, weight0, labels, bias=bias0)
    assert int(count) == int(ref_count)
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() <= TOL
    assert rel_err(hidden.grad, ref_gh) <= TOL
    assert rel_err(lin.weight.grad, ref_gw) <= TOL
    assert rel_err(lin.bias.grad, ref_gb) <= TOL


# --- nothing to predict -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fused", "fallback"])
def test_all_labels_ignored_gives_zero_loss_and_count(kind):
    hidden0, weight0, _ = make_inputs(seed=10)
    labels = torch.full((BATCH, SEQ), -100)
    out = output_layer(weight0) if kind == "fused" else Wrapped(weight0, torch.zeros(VOCAB))
    hidden = hidden0.clone().requires_grad_()
    loss, count = lm_loss_sum(hidden, out, labels)
    assert took_fused_path(loss) == (kind == "fused")
    assert int(count) == 0
    assert loss.item() == 0.0 and loss.shape == ()
    loss.backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))
    w = out.weight if kind == "fused" else out.inner.weight
    assert w.grad is None or torch.equal(w.grad, torch.zeros_like(w))


def test_only_first_label_set_is_not_a_target():
    """labels[:, 0] never is a target (nothing predicts the first token)."""
    hidden0, weight0, _ = make_inputs(seed=11)
    labels = torch.full((BATCH, SEQ), -100)
    labels[:, 0] = 5
    loss, count = lm_loss_sum(hidden0, output_layer(weight0), labels)
    assert int(count) == 0 and loss.item() == 0.0


# --- TaskModel end to end ---------------------------------------------------------------------------


def tiny_model(seed: int) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(tiny_args(n_kv_heads=2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 1.0 if "tok_embeddings" in name else 1.0 / math.sqrt(p.shape[1]))
    return model


@pytest.mark.parametrize("prompt_tuned", [False, True], ids=["transformer", "prompt_tuning"])
def test_task_model_sft_loss_and_grads_match_plain_logits(prompt_tuned):
    """TaskModel's LM loss (fused path on the model's own output layer) equals cross-entropy on
    the model's full float32 logits computed in float64, and so do the output weight's and
    the trained parameters' gradients."""
    model = tiny_model(seed=12)
    g = torch.Generator().manual_seed(13)
    wrapped = PromptTuning(model, torch.randn(3, model.args.dim, generator=g)) if prompt_tuned else model
    tokens = torch.randint(3, model.args.vocab_size, (2, 10), generator=g)
    pad_lens = torch.tensor([3, 0])
    labels = tokens.clone()
    labels[0, :5] = -100  # padding and the prompt carry no loss
    labels[1, :2] = -100
    task = TaskModel(wrapped, "sft")

    loss, count, scores = task(tokens, labels, pad_lens)
    assert scores is None and int(count) == int((labels[:, 1:] != -100).sum())
    trained = [wrapped.prompt_embeddings] if prompt_tuned else [model.layers[1].feed_forward.w2.weight]
    params = trained + [model.output.weight]
    grads = torch.autograd.grad(loss, params)

    hidden = task.encode(tokens, pad_lens)
    logits = hidden.double() @ model.output.weight.double().T
    ref = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")
    ref_grads = torch.autograd.grad(ref, params)
    assert abs(loss.item() - ref.item()) / ref.item() <= TOL
    # the model's own logits at the predicting slots agree too (the plain path before the change)
    full = wrapped(tokens, 0, pad_lens)
    plain = F.cross_entropy(full[:, :-1].flatten(0, 1).double(), labels[:, 1:].flatten(), ignore_index=-100,
                            reduction="sum")
    assert abs(loss.item() - plain.item()) / plain.item() <= TOL
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) <= 1e-4  # through the whole float32 model


def test_double_backward_is_refused():
    """The saved softmax - onehot is not a function of the inputs: a second-order gradient through
    it would be silently wrong, so it must raise instead."""
    hidden, weight, labels = make_inputs(seed=11)
    hidden.requires_grad_()
    loss, _ = lm_loss_sum(hidden, output_layer(weight), labels)
    with pytest.raises(RuntimeError):  # either "does not require grad" or "differentiate twice"
        (grad,) = torch.autograd.grad(loss, hidden, create_graph=True)
        grad.pow(2).sum().backward()


def test_autocast_runs_the_matmuls_in_its_dtype_and_returns_float32_grads():
    """Under bf16 autocast with float32 hidden and weight (full fine-tuning's setup), every matmul
    of forward and backward is bf16, as through autocast's nn.Linear, and the gradients come back
    float32; values agree with float64 within bf16 tolerance."""
    hidden, weight, labels = make_inputs(seed=12)
    hidden.requires_grad_()
    layer = output_layer(weight)
    seen = []

    class MatmulDtypes(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("matmul", "__matmul__", "mm"):
                seen.append(tuple(a.dtype for a in args[:2]))
            return func(*args, **(kwargs or {}))

    with MatmulDtypes():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = lm_loss_sum(hidden, layer, labels)
        loss.backward()
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}
    assert hidden.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
    ref_loss, _, ref_h, ref_w, _ = reference(hidden, weight, labels)
    assert abs(loss.item() - ref_loss.item()) <= TOL_BF16_LOSS * abs(ref_loss.item())
    assert rel_err(hidden.grad, ref_h) <= TOL_BF16_GRAD and rel_err(layer.weight.grad, ref_w) <= TOL_BF16_GRAD


def test_without_grad_no_gradient_buffer_is_built():
    """Evaluation (no_grad) takes the plain path: LinearCrossEntropy would allocate a [tokens,
    vocab] gradient nobody reads."""
    hidden, weight, labels = make_inputs(seed=13)
    with torch.no_grad():
        loss, count = lm_loss_sum(hidden, output_layer(weight), labels)
    ref_loss, ref_count, *_ = reference(hidden, weight, labels)
    assert loss.grad_fn is None and count == ref_count
    assert abs(loss.item() - ref_loss.item()) <= TOL * abs(ref_loss.item())


def test_float32_forward_allocates_one_logits_sized_buffer():
    """Float32 logits are written into the gradient's buffer and turned into softmax - onehot
    there: the only [tokens, vocab] allocation of the forward is that buffer."""
    hidden, weight, labels = make_inputs(seed=17, vocab=4099)
    out = output_layer(weight)
    with torch.profiler.profile(profile_memory=True) as prof:
        loss, count = lm_loss_sum(hidden, out, labels)
    assert took_fused_path(loss)
    allocated = [(e.name, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage > 0]
    logits_bytes = int(count) * weight.shape[0] * 4
    assert [b for _, b in allocated if b >= logits_bytes] == [logits_bytes], allocated
