"""finetune.trainer end to end on a tiny random LLaMA (CPU, float32): every method and task
learns the bundled demo data; resuming (after a real SIGKILL, after a deterministic interrupt,
after a failed checkpoint write) replays the uninterrupted run exactly; checkpoint pruning,
metrics.jsonl, loss.png, the exported adapter and the merged checkpoint."""
import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

import finetune.state
import finetune.trainer
from finetune.adapters import attach, load_adapter
from finetune.config import TrainConfig
from finetune.demo import FACTS
from finetune.state import checkpoints, load_state
from finetune.trainer import base_dtype, lr_factor, read_losses, train
from llama import cpu_kind
from llama.formats import read_model_args
from llama.loader import load_model
from llama.tokenizers import Tokenizer
from tests.utils import (
    DEMO_EVAL, DEMO_TRAIN, ROOT, assert_same_tensors, eval_loss_of, read_metrics, tiny_args, trainer_config,
    write_ckpt,
)

METRIC_KEYS = ("loss", "lr", "grad_norm", "epoch", "eval_loss", "eval_ppl", "eval_accuracy")


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory, tokenizer_path):
    """A tiny random LLaMA in our checkpoint format, with the session tokenizer beside it."""
    return write_ckpt(tmp_path_factory.mktemp("base"), tiny_args(), tokenizer_path, seed=0)


def by_step(records: list[dict]) -> dict:
    """{(step, kind): record without the timing}, kind 'train' or 'eval'; fails on a duplicate."""
    out = {}
    for r in records:
        key = (r["step"], "eval" if "eval_loss" in r else "train")
        assert key not in out, f"duplicate metrics line for {key}"
        out[key] = {k: v for k, v in r.items() if k in METRIC_KEYS}
    return out


def assert_same_metrics(got: dict, want: dict, tol: float = 1e-6) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].keys() == want[key].keys(), key
        for name, value in want[key].items():
            assert got[key][name] == pytest.approx(value, rel=tol, abs=tol), (key, name, got[key][name], value)


def same_tensors(dir_a, dir_b, name="adapter_model.safetensors", tol=0.0) -> None:
    assert_same_tensors(load_file(str(dir_a / name)), load_file(str(dir_b / name)), tol)


# --- (a) every method and task learns ---------------------------------------------------------


def labelled_files(folder, task: str):
    """cls: 'The {obj}' -> its color (from finetune.demo.FACTS); regression: -> its name's length
    (centred). Training phrasings differ from the held-out eval phrasing; all end in the object."""
    train_forms = ["The {o}", "A {o}", "I saw the {o}", "Look at the {o}"]
    eval_form = "There is the {o}"

    def label(obj):
        return FACTS[obj][0] if task == "cls" else (len(obj) - 5) / 2

    def write(path, forms):
        rows = [{"text": f.format(o=o), "label": label(o)} for f in forms for o in FACTS]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    return write(folder / f"{task}_train.jsonl", train_forms), write(folder / f"{task}_eval.jsonl", [eval_form])


# (method, task, lr, what the eval loss must come down to): on a random base the sft answers are
# hard for the small methods (the frozen random output layer), so they need only a clear drop
CASES = [("lora", "sft", 1e-2, lambda b: b - 0.3), ("prompt", "sft", 3e-2, lambda b: b - 0.1),
         ("full", "sft", 3e-3, lambda b: 0.6 * b), ("freeze", "sft", 1e-2, lambda b: b - 0.3),
         ("lora", "cls", 1e-2, lambda b: 0.5 * b), ("lora", "regression", 1e-2, lambda b: 0.6 * b),
         ("full", "cls", 3e-3, lambda b: 0.5 * b)]


@pytest.mark.parametrize("method,task,lr,bound", CASES, ids=[f"{m}-{t}" for m, t, *_ in CASES])
def test_each_method_and_task_lowers_eval_loss(base_ckpt, tmp_path, method, task, lr, bound):
    kw = dict(method=method, task=task)
    if task != "sft":
        train_file, eval_file = labelled_files(tmp_path, task)
        kw.update(train_file=str(train_file), eval_file=str(eval_file))
    # lr 0: one step that changes nothing, so its final eval is the untrained model's
    before = train(trainer_config(base_ckpt, tmp_path / "before", max_steps=1, lr=0.0, **kw))
    after = train(trainer_config(base_ckpt, tmp_path / "after", max_steps=40, lr=lr, **kw))
    assert after["eval_loss"] < bound(before["eval_loss"]), (before, after)
    losses = [r["loss"] for r in read_metrics(tmp_path / "after") if "loss" in r]
    assert sum(losses[-5:]) < sum(losses[:5]), losses  # the training loss falls too
    if task == "cls":
        assert after["eval_accuracy"] > before["eval_accuracy"] + 0.3
    if (method, task) == ("lora", "sft"):  # LoRA starts as the identity: the step-0 eval is the base model's
        assert before["eval_loss"] == pytest.approx(reference_eval_loss(base_ckpt), rel=1e-5)


def reference_eval_loss(ckpt) -> float:
    return eval_loss_of(load_model(ckpt, read_model_args(ckpt)), ckpt)


# --- (b) resume replays the uninterrupted run -------------------------------------------------

RESUME = dict(max_steps=8, save_every=2, eval_every=2, keep_last=2, lora_dropout=0.1, shuffle=True,
              micro_batch_size=4, grad_accum=2, merge=True)


@pytest.fixture(scope="module")
def reference_run(base_ckpt, tmp_path_factory):
    """The uninterrupted in-process run the resume tests compare with (also checked in (d))."""
    out = tmp_path_factory.mktemp("reference")
    results = train(trainer_config(base_ckpt, out, **RESUME))
    return out, results


class Interrupt(KeyboardInterrupt):
    pass


def interrupt_at(monkeypatch, step: int) -> None:
    """Raise (like Ctrl-C) inside optimizer step `step` (1-based), after its backward."""
    calls = {"n": 0}
    real = finetune.trainer.clip_grad_norm

    def clip(params, max_norm):
        calls["n"] += 1
        if calls["n"] == step:
            raise Interrupt()
        return real(params, max_norm)

    monkeypatch.setattr(finetune.trainer, "clip_grad_norm", clip)


def test_interrupted_run_resumes_identically(base_ckpt, reference_run, tmp_path, monkeypatch):
    ref_dir, ref_results = reference_run
    out = tmp_path / "run"
    cfg = trainer_config(base_ckpt, out, **RESUME)
    interrupt_at(monkeypatch, 6)  # steps 1-5 done and logged; the last checkpoint is step 4
    with pytest.raises(Interrupt):
        train(cfg)
    assert [p.name for p in checkpoints(out)] == ["step_000002", "step_000004"]
    assert max(r["step"] for r in read_metrics(out)) == 5
    monkeypatch.undo()

    results = train(cfg)  # resume = auto
    assert results == pytest.approx(ref_results, rel=1e-6)
    # steps 5.. are logged again, once (metrics.jsonl was cut back to the checkpoint's step)
    assert_same_metrics(by_step(read_metrics(out)), by_step(read_metrics(ref_dir)))
    same_tensors(out / "adapter", ref_dir / "adapter", tol=1e-6)


def test_resume_from_a_failed_checkpoint_write(base_ckpt, reference_run, tmp_path, monkeypatch):
    """A crash while writing step 4's checkpoint leaves step 2's whole and loadable, the partial
    folder is never taken for a checkpoint, and the resumed run ends as the uninterrupted one."""
    ref_dir, ref_results = reference_run
    out = tmp_path / "run"
    cfg = trainer_config(base_ckpt, out, **RESUME)
    calls = {"n": 0}
    real = finetune.state.save_safetensors

    def failing_save(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            path.write_bytes(b"half a file")  # what a kill mid-write could leave
            raise OSError(28, "No space left on device")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(finetune.state, "save_safetensors", failing_save)
    with pytest.raises(OSError):
        train(cfg)
    monkeypatch.undo()

    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_000002", "step_000004.partial"]
    assert checkpoints(out) == [root / "step_000002"]

    # the surviving checkpoint loads: into a fresh model with the run's trainable parameters
    model = load_model(base_ckpt, read_model_args(base_ckpt))
    torch.manual_seed(123)
    task_model = attach(model, cfg, Tokenizer(str(base_ckpt / "tokenizer.model")))
    named = {n: p for n, p in task_model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(named.values(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, 0, cfg.max_steps, 0.0))
    assert load_state(root / "step_000002", 0, named, optimizer, scheduler, None) == 2
    assert scheduler.last_epoch == 2 and len(optimizer.state) == len(named)
    saved = load_file(str(root / "step_000002" / "rank0.safetensors"))
    for name, p in named.items():
        assert torch.equal(p.detach(), saved[f"param.{name}"])
    # ... and its exported adapter is the parameters just loaded
    fresh = load_adapter(load_model(base_ckpt, read_model_args(base_ckpt)), root / "step_000002" / "adapter")
    fresh_params = dict(fresh.named_parameters())
    for name, p in named.items():
        key = name.removeprefix("model.")
        assert torch.equal(fresh_params[key].detach(), p.detach()), name

    results = train(cfg)  # resumes from step 2, rewrites step 4 over the partial folder
    assert results == pytest.approx(ref_results, rel=1e-6)
    assert sorted(p.name for p in root.iterdir()) == ["step_000006", "step_000008"]
    assert_same_metrics(by_step(read_metrics(out)), by_step(read_metrics(ref_dir)))


def ft_main_command(ckpt, out_dir, max_steps: int) -> list[str]:
    flags = dict(ckpt_dir=ckpt, out_dir=out_dir, train_file=DEMO_TRAIN, eval_file=DEMO_EVAL, template="plain",
                 cutoff_len=64, dtype="float32", device="cpu", method="lora", lora_r=8, lora_alpha=16,
                 lora_dropout=0.1, lora_targets="all-linear", shuffle="true", seed=0, micro_batch_size=8,
                 max_steps=max_steps, lr=3e-3, warmup_steps=2, save_every=2, eval_every=2, keep_last=3,
                 exact_match_samples=0, epochs=1)
    return [sys.executable, str(ROOT / "ft_main.py")] + [x for k, v in flags.items() for x in (f"--{k}", str(v))]


def test_sigkilled_process_resumes_identically(base_ckpt, tmp_path):
    """Kill `ft_main.py` (SIGKILL, wherever it is) once step 4's checkpoint exists; the rerun of
    the same command resumes and logs what an uninterrupted run logs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    steps = 40
    proc = subprocess.Popen(ft_main_command(base_ckpt, killed, steps), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (killed / "checkpoints" / "step_000004").is_dir():
            assert proc.poll() is None, f"ft_main.py ended before step 4's checkpoint: {proc.stderr.read()}"
            assert time.time() < deadline, "no step 4 checkpoint after 120 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "adapter").exists(), "the run finished before it was killed"
    resumed_from = checkpoints(killed)[-1].name

    again = subprocess.run(ft_main_command(base_ckpt, killed, steps), cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=240)
    assert again.returncode == 0, again.stderr
    assert f"resumed from {killed / 'checkpoints' / resumed_from}" in again.stdout
    ref = subprocess.run(ft_main_command(base_ckpt, whole, steps), cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=240)
    assert ref.returncode == 0, ref.stderr
    assert "resumed" not in ref.stdout

    got, want = by_step(read_metrics(killed)), by_step(read_metrics(whole))
    assert len(want) == steps + steps // 2
    assert_same_metrics(got, want)
    same_tensors(killed / "adapter", whole / "adapter", tol=1e-6)
    assert not list((killed / "checkpoints").glob("*.partial"))


# --- (d) outputs ------------------------------------------------------------------------------


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


def test_outputs_of_a_run(base_ckpt, reference_run):
    out, results = reference_run
    # keep_last 2 of the checkpoints at steps 2, 4, 6, 8; no partial folders left
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000006", "step_000008"]
    # one line per step, an eval line every 2 steps; the final results are the last eval
    records = read_metrics(out)
    train_lines = [r for r in records if "loss" in r]
    eval_lines = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train_lines] == list(range(1, 9))
    assert [r["step"] for r in eval_lines] == [2, 4, 6, 8]
    assert results["eval_loss"] == eval_lines[-1]["eval_loss"]
    assert set(train_lines[0]) == {"step", "loss", "lr", "grad_norm", "epoch", "tokens_per_s"}
    # the schedule: cosine from lr (warmup 0) down to 0 over 8 steps, the lr used at each step
    for r in train_lines:
        want = 3e-3 * 0.5 * (1 + math.cos(math.pi * (r["step"] - 1) / 8))
        assert r["lr"] == pytest.approx(want, rel=1e-9, abs=1e-12)
    width, height = png_size(out / "loss.png")
    assert 100 <= width <= 4000 and 100 <= height <= 4000
    # the final checkpoint's exported adapter is the final adapter
    same_tensors(out / "adapter", out / "checkpoints" / "step_000008" / "adapter")

    # out_dir/adapter loads onto the base; out_dir/merged equals base + adapter
    args = read_model_args(base_ckpt)
    tokens = torch.randint(1, args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = load_model(base_ckpt, args)(tokens)
        lora = load_adapter(load_model(base_ckpt, args), out / "adapter").eval()
        lora_logits = lora(tokens)
        merged_logits = load_model(out / "merged", read_model_args(out / "merged"))(tokens)
    assert (lora_logits - base_logits).abs().max() > 1e-3, "the adapter changes nothing"
    torch.testing.assert_close(merged_logits, lora_logits, rtol=1e-5, atol=1e-5)
    # ... and it is an HF folder (merge_format's default) that transformers loads with no code of
    # ours, with the tokenizer beside it
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, lora_logits, rtol=1e-5, atol=1e-5)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out / "merged")
    assert hf_tok("The sky is blue").input_ids == Tokenizer(base_ckpt / "tokenizer.model").encode("The sky is blue", bos=True, eos=False)


def test_metrics_cut_back_on_resume(base_ckpt, tmp_path):
    """Lines logged after the checkpoint a run resumes from are dropped, then logged again once."""
    out = tmp_path / "run"
    cfg = trainer_config(base_ckpt, out, max_steps=4, save_every=2, micro_batch_size=4)
    train(cfg)
    lines = read_metrics(out)
    # a run killed after logging step 5 of a longer schedule, with its last checkpoint at step 4,
    # and a stale line of a later step: all of them go
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({**lines[0], "step": 5, "loss": 123.0}) + "\n")
        f.write(json.dumps({**lines[0], "step": 9, "loss": 456.0}) + "\n")
    train(replace(cfg, max_steps=6))
    steps = [r["step"] for r in read_metrics(out) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert all(r["loss"] < 100 for r in read_metrics(out) if "loss" in r)


# --- (e) the embedded demo: README's quick start (about a minute on 2 idle cores) ------------


def test_embedded_demo_and_example_with_its_adapter(tmp_path):
    out = tmp_path / "demo"
    run = subprocess.run([sys.executable, "ft_main.py", "--out_dir", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=1800)
    assert run.returncode == 0, run.stderr
    line = next(ln for ln in run.stdout.splitlines() if ln.startswith("exact match after training"))
    assert float(line.split(":")[1].split("%")[0]) >= 80.0, line
    # no --ckpt_dir: example.py finds the demo model ft_main.py built (an HF folder: merge_format hf)
    gen = subprocess.run([sys.executable, "example.py", "--adapter",
                          str(out / "adapter"), "--temperature", "0", "--max_gen_len", "8", "--dtype", "float32",
                          "--prompt", "What color is the frog?", "--prompt", "Where does the whale live?"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr
    assert "> green" in gen.stdout and "> ocean" in gen.stdout, gen.stdout


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_freeze_on_a_16_bit_base_without_autocast(base_ckpt, tmp_path, dtype):
    """freeze trains float32 blocks between 16-bit frozen ones (and a 16-bit output layer) in plain
    fp32 precision: the dtypes must meet without autocast."""
    result = train(trainer_config(base_ckpt, tmp_path, method="freeze", dtype=dtype, precision="fp32", max_steps=10,
                                  lr=1e-2))
    losses = [r["loss"] for r in read_metrics(tmp_path) if "loss" in r]
    assert all(math.isfinite(x) for x in losses) and math.isfinite(result["eval_loss"])
    assert losses[-1] < losses[0]


def test_resuming_a_finished_run_reports_its_eval(base_ckpt, tmp_path):
    first = train(trainer_config(base_ckpt, tmp_path, max_steps=4, save_every=2))
    again = train(trainer_config(base_ckpt, tmp_path, max_steps=4, save_every=2))
    assert again["eval_loss"] == pytest.approx(first["eval_loss"], rel=1e-6)


@pytest.mark.parametrize("dtype, flags, expected", [
    ("auto", set(), torch.float32), ("auto", {"avx2"}, torch.float32), ("auto", {"avx512_bf16"}, torch.bfloat16),
    ("auto", {"amx_bf16"}, torch.bfloat16), ("bfloat16", set(), torch.bfloat16), ("float32", {"amx_bf16"}, torch.float32),
])
def test_auto_dtype_on_cpu_follows_native_bf16(base_ckpt, tmp_path, monkeypatch, capsys, dtype, flags, expected):
    """dtype auto (the default) loads a CPU base in bfloat16 where the CPU runs it natively
    (AVX512-BF16 or AMX), float32 elsewhere, where 16-bit matmuls are ~10x slower, and says so;
    the merged checkpoint is written in the base's dtype, which shows what was loaded."""
    monkeypatch.setattr(cpu_kind, "cpu_flags", lambda: set(flags))
    assert TrainConfig().dtype == "auto"
    train(trainer_config(base_ckpt, tmp_path, dtype=dtype, merge=True, max_steps=1, lora_targets=["wq", "wv"]))
    files = sorted((tmp_path / "merged").glob("*.safetensors"))
    assert files
    assert {t.dtype for f in files for t in load_file(f).values()} == {expected}
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("dtype auto:")]
    assert len(said) == (dtype == "auto")
    if said:
        assert said[0].startswith(f"dtype auto: {str(expected)[6:]} base (")
        assert ("natively" in said[0]) == (expected == torch.bfloat16)


def test_base_dtype_resolves_auto_by_device_cpu_and_method(monkeypatch):
    monkeypatch.setattr(cpu_kind, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert base_dtype("auto", "cuda:1")[0] == base_dtype("auto", torch.device("cuda", 0))[0] == torch.bfloat16
    assert base_dtype("auto", torch.device("cpu"))[0] == base_dtype("auto", "cpu")[0] == torch.float32
    monkeypatch.setattr(cpu_kind, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    assert base_dtype("auto", "cpu") == (torch.bfloat16, "this CPU runs bf16 natively: avx512_bf16")
    assert base_dtype("auto", "cpu", trains_base=True)[0] == torch.float32  # full / freeze train float32 weights
    assert base_dtype("auto", "cuda", trains_base=True)[0] == torch.bfloat16
    assert base_dtype("float16", "cpu")[0] == torch.float16


# |bf16 - float32| per step, losses ~5.7: the base's weights rounded to bf16 (8 bits of mantissa,
# ~4e-3 relative) shift the tiny model's loss by ~3e-4 here; 30x that leaves room for other CPUs' kernels
BF16_LOSS_TOL = 0.01


def test_bf16_base_losses_stay_near_float32(base_ckpt, tmp_path):
    """A bfloat16 base (what dtype auto picks on a CPU with AVX512-BF16 or AMX) trains LoRA to the
    float32 run's losses within BF16_LOSS_TOL at every step of 12, and the losses fall in both."""
    losses = {}
    for dtype in ("float32", "bfloat16"):
        train(trainer_config(base_ckpt, tmp_path / dtype, dtype=dtype, max_steps=12))
        losses[dtype] = read_losses(tmp_path / dtype / "metrics.jsonl")[0]
    f32, bf16 = (torch.tensor([loss for _, loss in losses[d]]) for d in ("float32", "bfloat16"))
    assert len(f32) == len(bf16) == 12
    assert f32[-1] < f32[0] - 0.2 and bf16[-1] < bf16[0] - 0.2
    assert (f32 - bf16).abs().max() <= BF16_LOSS_TOL, (f32 - bf16).abs().max()
    assert not torch.equal(f32, bf16)  # the bf16 run did round


@pytest.mark.parametrize("capability,want", [((7, 0), (torch.float16, torch.float16)),
                                             ((8, 0), (torch.bfloat16, torch.bfloat16))])
def test_auto_on_a_gpu_without_bf16_takes_fp16_and_says_so(monkeypatch, capsys, capability, want):
    """dtype and precision 'auto' on a GPU: bf16 from compute capability 8.0; before it (a V100,
    a T4) fp16 with loss scaling, and one warning line naming the GPU. Explicit choices stay."""
    from finetune.trainer import amp_dtype, gpu_has_bf16

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    gpu_has_bf16.cache_clear()
    try:
        cfg = TrainConfig(dtype="auto", precision="auto").check()
        assert (base_dtype("auto", "cuda:0")[0], amp_dtype(cfg, "cuda:0")) == want
        assert amp_dtype(replace(cfg, precision="bf16"), "cuda:0") == torch.bfloat16  # asked for: kept
        assert amp_dtype(cfg, "cpu") is None
        err = capsys.readouterr().err
        if want[0] == torch.float16:
            assert err.count("\n") == 1 and "Tesla V100-SXM2-16GB has no native bf16" in err
        else:
            assert err == ""
    finally:
        gpu_has_bf16.cache_clear()
