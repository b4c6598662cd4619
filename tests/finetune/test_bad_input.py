"""Bad input and faults at the fine-tuning entry point: `ft_main.main(argv)` returns 2 and prints
one `error: ...` line on stderr (no traceback) for bad configs, data and adapters, skips malformed
rows with a warning unless --strict, and returns 1 when the loss turns NaN or a checkpoint can't be
written, leaving the checkpoints saved before untouched. SIGINT and SIGTERM (real signals to a real
`ft_main.py`) save a checkpoint at the next step boundary and exit 130 or 143 with one line; the
rerun resumes and ends as an uninterrupted run."""
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import example
import finetune.state
import ft_main
import finetune.trainer as trainer_module
from finetune.adapters import attach, load_adapter
from finetune.config import load_config
from finetune.state import checkpoints, load_state
from llama.formats import read_model_args, save_checkpoint
from llama.loader import load_model
from llama.tiny import random_model
from llama.tokenizers import Tokenizer
from tests.utils import DEMO_EVAL, DEMO_TRAIN, ROOT, metrics_by_step, tiny_args


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer_path) -> Path:
    d = tmp_path_factory.mktemp("ft_bad") / "base"
    save_checkpoint(random_model(tiny_args()), d)
    shutil.copy(tokenizer_path, d / "tokenizer.model")
    return d


def rows(n=10):
    return [{"instruction": f"What is {i} plus {i + 1}?", "output": f"The answer is {2 * i + 1}."} for i in range(n)]


def write_lines(path: Path, lines) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def write_rows(path: Path, data) -> str:
    return write_lines(path, [json.dumps(r) for r in data])


def base_config(tmp_path, ckpt, train_file=None, **extra) -> str:
    """A complete TOML for a tiny CPU run (so nothing falls back to the demo's settings)."""
    values = dict(ckpt_dir=str(ckpt), train_file=train_file or write_rows(tmp_path / "train.jsonl", rows()),
                  out_dir=str(tmp_path / "out"), device="cpu", dtype="float32", precision="fp32", template="plain",
                  micro_batch_size=2, lora_dropout=0.0, cutoff_len=64, max_steps=2, eval_every=0, save_every=0,
                  exact_match_samples=0, seed=0)
    values.update(extra)
    path = tmp_path / "cfg.toml"
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    return str(path)


def run_main(argv, capsys):
    rc = ft_main.main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def one_error(err: str, alone: bool = True) -> str:
    """The one `error: ...` line; with alone, stderr holds nothing else."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, err
    if alone:
        assert lines == errors, err
    return errors[0]


# --- unknown keys ----------------------------------------------------------------------------


@pytest.mark.parametrize("toml", ["lora_rank = 4\n", "[method]\nlora_rank = 4\n"], ids=["flat", "grouped"])
def test_unknown_key_in_toml(tmp_path, capsys, toml):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    rc, _, err = run_main(["--config", str(path)], capsys)
    assert rc == 2
    msg = one_error(err)
    assert "'lora_rank'" in msg and "did you mean 'lora_r'" in msg and str(path) in msg


@pytest.mark.parametrize("flag", [["--lora_rank", "4"], ["--lora_rank=4"]])
def test_unknown_key_on_the_command_line(tmp_path, ckpt, capsys, flag):
    rc, _, err = run_main(["--config", base_config(tmp_path, ckpt)] + flag, capsys)
    assert rc == 2
    msg = one_error(err)
    assert "'lora_rank'" in msg and "command line" in msg and "did you mean 'lora_r'" in msg
    assert not (tmp_path / "out").exists()  # stopped before training


def test_unknown_key_without_a_close_match(tmp_path, ckpt, capsys):
    rc, _, err = run_main(["--config", base_config(tmp_path, ckpt), "--zzzz", "1"], capsys)
    assert rc == 2
    msg = one_error(err)
    assert "'zzzz'" in msg and "did you mean" not in msg


def test_positional_argument(tmp_path, ckpt, capsys):
    rc, _, err = run_main(["--config", base_config(tmp_path, ckpt), "train.jsonl"], capsys)
    assert rc == 2 and "train.jsonl" in one_error(err)


def test_missing_config_file(tmp_path, capsys):
    rc, _, err = run_main(["--config", str(tmp_path / "nope.toml")], capsys)
    assert rc == 2 and "nope.toml" in one_error(err)


def test_invalid_choice_through_main(tmp_path, ckpt, capsys):
    rc, _, err = run_main(["--config", base_config(tmp_path, ckpt), "--method", "qlora"], capsys)
    assert rc == 2
    msg = one_error(err)
    assert "method" in msg and "qlora" in msg


def test_flag_without_value_exits_2(tmp_path, ckpt, capsys):
    with pytest.raises(SystemExit) as e:
        ft_main.main(["--config", base_config(tmp_path, ckpt), "--lr"])
    assert e.value.code == 2


def test_unknown_template_names_it(tmp_path, ckpt, capsys):
    rc, _, err = run_main(["--config", base_config(tmp_path, ckpt), "--template", "chatml"], capsys)
    assert rc == 2
    msg = one_error(err)
    assert "chatml" in msg and "template" in msg


@pytest.mark.parametrize("key, typo, meant", [("template", "alpacca", "alpaca"), ("method", "lorra", "lora")])
def test_unknown_choice_suggests_the_closest(tmp_path, ckpt, capsys, key, typo, meant):
    rc, _, err = run_main(["--config", base_config(tmp_path, ckpt), f"--{key}", typo], capsys)
    assert rc == 2
    msg = one_error(err)
    assert f"{key} = {typo!r}" in msg and f"did you mean {meant!r}" in msg
    assert "choose from" in msg and ("vicuna" if key == "template" else "prompt") in msg
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, argv, shown, expected", [
    ({"lr": "fast"}, [], 'lr = "fast"', "a number"),
    ({"merge": 3}, [], "merge = 3", "true or false"),
    ({"max_steps": True}, [], "max_steps = true", "an integer"),
    ({"ckpt_dir": 7}, [], "ckpt_dir = 7", "a string"),
    ({}, ["--micro_batch_size", "two"], 'micro_batch_size = "two"', "an integer"),
], ids=["toml-float", "toml-bool", "toml-int", "toml-str", "command-line-int"])
def test_config_value_of_the_wrong_type(tmp_path, ckpt, capsys, extra, argv, shown, expected):
    cfg_path = base_config(tmp_path, ckpt, **extra)
    rc, _, err = run_main(["--config", cfg_path] + argv, capsys)
    assert rc == 2
    msg = one_error(err)
    assert shown in msg and f"expected {expected}" in msg
    assert ("the command line" if argv else cfg_path) in msg
    assert not (tmp_path / "out").exists()


# --- data files ------------------------------------------------------------------------------


def test_missing_train_file(tmp_path, ckpt, capsys):
    missing = str(tmp_path / "absent.jsonl")
    rc, _, err = run_main(["--config", base_config(tmp_path, ckpt), "--train_file", missing], capsys)
    assert rc == 2
    msg = one_error(err)
    assert missing in msg and "not found" in msg


def test_missing_eval_file(tmp_path, ckpt, capsys):
    missing = str(tmp_path / "absent_eval.jsonl")
    rc, _, err = run_main(["--config", base_config(tmp_path, ckpt), "--eval_file", missing], capsys)
    assert rc == 2 and missing in one_error(err)


@pytest.mark.parametrize("content", ["", "\n\n  \n", "[]"], ids=["empty", "blank-lines", "empty-array"])
def test_empty_dataset(tmp_path, ckpt, capsys, content):
    train = tmp_path / "empty.jsonl"
    train.write_text(content)
    rc, _, err = run_main(["--config", base_config(tmp_path, ckpt, str(train))], capsys)
    assert rc == 2
    msg = one_error(err)
    assert str(train) in msg and "no usable rows" in msg


def test_every_sample_longer_than_cutoff(tmp_path, ckpt, capsys):
    """The prompts ("What is 3 plus 4?") fill cutoff_len 6, the plain template's own ~3 don't;
    one more row is malformed: the message counts both reasons."""
    lines = [json.dumps(r) for r in rows()] + [BAD_LINES["missing-output"]]
    train = write_lines(tmp_path / "train.jsonl", lines)
    rc, _, err = run_main(["--config", base_config(tmp_path, ckpt, train), "--cutoff_len", "6"], capsys)
    assert rc == 2
    msg = one_error(err, alone=False)  # after the warning for the malformed row
    assert msg == (f"error: {train}: no usable rows: dropped 11 of 11 rows: 1 malformed (warned above), 10 too long "
                   "for cutoff_len 6 (the prompt fills it: no answer tokens left)")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("template", ["alpaca", "plain"])
def test_cutoff_len_within_the_templates_own_prompt(tmp_path, ckpt, capsys, template):
    """Refused before the data is read (here it is missing): alpaca's preamble alone is ~30 tokens;
    plain's is only bos (its "\\n" encodes to nothing), which any cutoff_len but 1 leaves room after."""
    cutoff = 20 if template == "alpaca" else 1
    rc, _, err = run_main(["--config", base_config(tmp_path, ckpt), "--template", template, "--cutoff_len",
                           str(cutoff), "--train_file", str(tmp_path / "absent.jsonl")], capsys)
    assert rc == 2
    msg = one_error(err)
    m = re.fullmatch(rf"error: cutoff_len {cutoff} leaves no room for an answer: the {template} template's own "
                     r"prompt is (\d+) tokens? before any instruction", msg)
    assert m and int(m.group(1)) >= cutoff, msg
    assert not (tmp_path / "out").exists()


def test_cls_data_without_label_column(tmp_path, ckpt, capsys):
    train = write_rows(tmp_path / "cls.jsonl", [{"text": f"The cat number {i}."} for i in range(6)])
    rc, _, err = run_main(["--config", base_config(tmp_path, ckpt, train), "--task", "cls"], capsys)
    assert rc == 2
    msg = one_error(err)
    assert f"{train}:1" in msg and "label" in msg


def test_cls_data_without_label_on_a_later_row(tmp_path, ckpt, capsys):
    data = [{"text": f"The cat number {i}.", "label": "ab"[i % 2]} for i in range(8)]
    data[4] = {"text": "no label here"}
    train = write_rows(tmp_path / "cls.jsonl", data)
    rc, _, err = run_main(["--config", base_config(tmp_path, ckpt, train), "--task", "cls", "--strict"], capsys)
    assert rc == 2
    msg = one_error(err)
    assert f"{train}:5" in msg and "label" in msg


PAIRS = [{"prompt": f"What is {i} plus {i + 1}?", "chosen": f"{2 * i + 1}", "rejected": f"{2 * i}"} for i in range(6)]


@pytest.mark.parametrize("case", ["beta", "pref-to-sft", "sft-to-dpo", "no-rejected", "all-too-long", "full-no-ref"])
def test_bad_preference_input_is_one_line_and_writes_nothing(tmp_path, ckpt, capsys, case):
    pairs = write_rows(tmp_path / "pairs.jsonl", PAIRS)
    argv = {
        "beta": ["--task", "dpo", "--train_file", pairs, "--dpo_beta", "0"],
        "pref-to-sft": ["--task", "sft", "--train_file", pairs],
        "sft-to-dpo": ["--task", "dpo"],
        "no-rejected": ["--task", "dpo", "--strict", "--train_file",
                        write_rows(tmp_path / "missing.jsonl", PAIRS[:3] + [{"prompt": "Q", "chosen": "a"}])],
        "all-too-long": ["--task", "rm", "--train_file", pairs, "--cutoff_len", "2"],
        "full-no-ref": ["--task", "dpo", "--method", "full", "--train_file", pairs],
    }[case]
    rc, _, err = run_main(["--config", base_config(tmp_path, ckpt)] + argv, capsys)
    assert rc == 2
    msg = one_error(err)
    want = {
        "beta": "error: dpo_beta must be positive, got 0.0",
        "pref-to-sft": f"error: {pairs}:1: a preference row (chosen/rejected), which task sft does not read: "
                       "tasks rm and dpo do",
        "sft-to-dpo": f"error: {tmp_path / 'train.jsonl'}:1: task dpo needs preference rows (chosen and rejected "
                      "answers), but the row has keys ['instruction', 'output']",
        "no-rejected": f"error: {tmp_path / 'missing.jsonl'}:4: missing 'rejected'",
        "all-too-long": f"error: {pairs}: no usable pairs: dropped 6 of 6 rows: 6 too long for cutoff_len 2 "
                        "(the longer answer does not fit after bos)",
        "full-no-ref": "error: task dpo with method full trains the base, so it can't be its own reference: set "
                       "precompute_ref = true (the reference log-probs computed once before training)",
    }[case]
    assert msg == want
    assert not (tmp_path / "out").exists()


BAD_LINES = {"not-json": '{"instruction": "broken", "output": ', "not-an-object": "[1, 2, 3]",
             "missing-output": '{"instruction": "where is the answer?"}'}


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_malformed_row_is_skipped_with_a_warning(tmp_path, ckpt, capsys, kind):
    lines = [json.dumps(r) for r in rows()]
    lines.insert(2, BAD_LINES[kind])  # line 3
    train = write_lines(tmp_path / "train.jsonl", lines)
    rc, out, err = run_main(["--config", base_config(tmp_path, ckpt, train)], capsys)
    assert rc == 0, err
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning")]
    assert len(warnings) == 1 and f"{train}:3" in warnings[0], err
    assert "error" not in err
    # training went on with the other rows
    metrics = [json.loads(ln) for ln in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2]
    assert "9 rows" in out  # 11 lines, one skipped, one held out for eval
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_malformed_row_is_fatal_with_strict(tmp_path, ckpt, capsys, kind):
    lines = [json.dumps(r) for r in rows()]
    lines.insert(2, BAD_LINES[kind])
    train = write_lines(tmp_path / "train.jsonl", lines)
    rc, _, err = run_main(["--config", base_config(tmp_path, ckpt, train), "--strict"], capsys)
    assert rc == 2
    assert f"{train}:3" in one_error(err)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


# --- divergence ------------------------------------------------------------------------------


def digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def saved(monkeypatch) -> dict:
    """{checkpoint folder: digest of its files as written} for every checkpoint the run saves."""
    written = {}
    real_save_state = trainer_module.save_state

    def recording_save_state(*args, **kwargs):
        folder = real_save_state(*args, **kwargs)
        written[folder] = digest(folder)
        return folder

    monkeypatch.setattr(trainer_module, "save_state", recording_save_state)
    return written


def test_nan_loss_returns_1_and_keeps_the_last_checkpoint(tmp_path, ckpt, capsys, saved):
    """lr 1e30 without clipping: Adam's first update moves every LoRA weight by ~1e30, and the
    next forward overflows. The step-1 checkpoint (save_every 1) is written before that."""
    out = tmp_path / "out"
    cfg_path = base_config(tmp_path, ckpt, lr=1e30, max_grad_norm=0.0, warmup_steps=0, max_steps=6, save_every=1,
                           keep_last=10, lora_targets=["all-linear"])
    rc, _, err = run_main(["--config", cfg_path], capsys)
    assert rc == 1, err
    msg = one_error(err)
    m = re.search(r"\bstep (\d+)\b", msg)
    assert m and ("nan" in msg.lower() or "inf" in msg.lower()), msg
    bad_step = int(m.group(1))
    assert 2 <= bad_step <= 6

    # every checkpoint written before the divergence is still there, byte for byte, and none after
    steps = sorted(saved)
    assert [p.name for p in steps] == [f"step_{s:06d}" for s in range(1, bad_step)]
    on_disk = sorted(p for p in (out / "checkpoints").iterdir())
    assert on_disk == steps  # no newer step_ folder, no leftover .partial
    for folder, files in saved.items():
        assert digest(folder) == files
    assert steps[-1].name in msg  # the message names the checkpoint to go back to
    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in metrics) == bad_step - 1

    # the last checkpoint loads: training state and the exported adapter
    last = steps[-1]
    cfg = load_config(["--config", cfg_path])
    tokenizer = Tokenizer(ckpt / "tokenizer.model")
    model = load_model(ckpt, read_model_args(ckpt))
    task_model = attach(model, cfg, tokenizer)
    named = {n: p for n, p in task_model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(list(named.values()), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    assert load_state(last, 0, named, optimizer, scheduler, None) == bad_step - 1
    tensors = load_file(str(last / "rank0.safetensors"))
    for name, p in named.items():
        assert torch.equal(p.detach(), tensors[f"param.{name}"]), name
        assert torch.isfinite(p).all(), name
    assert any(p.abs().max() > 1e20 for n, p in named.items() if "lora_B" in n)  # the huge step did happen
    fresh = load_model(ckpt, read_model_args(ckpt))
    load_adapter(fresh, last / "adapter")
    assert torch.isfinite(fresh.layers[0].attention.wq.lora_B.weight).all()


def test_full_disk_during_a_checkpoint_returns_1_and_keeps_the_last(tmp_path, ckpt, capsys, saved, monkeypatch):
    """ENOSPC in the middle of step 2's checkpoint (its first file): one line, exit 1, step 1's
    checkpoint byte for byte as written and still the one resume takes."""
    real = finetune.state.save_safetensors
    calls = {"n": 0}

    def filling_disk(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # step 2's rank0.safetensors
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(finetune.state, "save_safetensors", filling_disk)
    out = tmp_path / "out"
    rc, _, err = run_main(["--config", base_config(tmp_path, ckpt, max_steps=4, save_every=1)], capsys)
    assert rc == 1
    step1 = out / "checkpoints" / "step_000001"
    assert one_error(err) == (f"error: could not save step 2's checkpoint (No space left on device); {step1} is the "
                              "last whole checkpoint; free space and run the same command again to resume")
    assert list(saved) == [step1] and digest(step1) == saved[step1]
    assert checkpoints(out) == [step1]


@pytest.mark.parametrize("under", [False, True], ids=["is-a-file", "under-a-file"])
def test_out_dir_that_is_a_file(tmp_path, ckpt, capsys, under):
    blocker = tmp_path / "results"
    blocker.write_text("my notes\n")
    out_dir = blocker / "run" if under else blocker
    rc, _, err = run_main(["--config", base_config(tmp_path, ckpt), "--out_dir", str(out_dir)], capsys)
    assert rc == 2
    msg = one_error(err)
    if under:
        assert f"{out_dir}: {blocker} is a file, so nothing can be written below it; choose another out_dir" in msg
    else:
        assert f"out_dir {out_dir} is a file" in msg
    assert blocker.read_text() == "my notes\n"


# --- an adapter trained on another base ---------------------------------------------------------


@pytest.fixture(scope="module")
def wider_ckpt(ckpt) -> Path:
    """A base of another width (dim 128), the same tokenizer."""
    d = ckpt.parent / "wider"
    save_checkpoint(random_model(tiny_args(dim=128)), d)
    shutil.copy(ckpt / "tokenizer.model", d / "tokenizer.model")
    return d


@pytest.mark.parametrize("method, shapes", [("lora", "(8, 64) in the checkpoint but (8, 128)"),
                                            ("prompt", "(4, 64) in the checkpoint but (4, 128)")], ids=["lora", "prompt"])
def test_resuming_on_another_base_names_it(tmp_path, ckpt, wider_ckpt, capsys, method, shapes):
    cfg_path = base_config(tmp_path, ckpt, max_steps=1, method=method, num_virtual_tokens=4)
    assert run_main(["--config", cfg_path], capsys)[0] == 0
    out = tmp_path / "out"
    before = digest(out)
    rc, _, err = run_main(["--config", cfg_path, "--ckpt_dir", str(wider_ckpt), "--max_steps", "2"], capsys)
    assert rc == 2
    msg = one_error(err)
    assert f"{shapes} in this run" in msg
    assert msg.endswith(f"it was trained on base {ckpt}, not ckpt_dir {wider_ckpt}")
    assert digest(out) == before

    # example.py --adapter: the same adapter on the wider base
    rc = example.main(["--ckpt_dir", str(wider_ckpt), "--adapter", str(out / "adapter"), "--max_gen_len", "2"])
    msg = one_error(capsys.readouterr().err)
    assert rc == 2 and f"an adapter for another base model (trained on {ckpt})" in msg

    # a base of the same shapes elsewhere resumes, with a warning naming both
    same_shapes = tmp_path / "copy_of_base"
    shutil.copytree(ckpt, same_shapes)
    rc, _, err = run_main(["--config", cfg_path, "--ckpt_dir", str(same_shapes), "--max_steps", "2"], capsys)
    assert rc == 0, err
    assert f"was trained on base {ckpt}; resuming it on ckpt_dir {same_shapes}" in err


# --- SIGINT and SIGTERM ------------------------------------------------------------------------

# ~0.1 s a step (40 micro-batches of 2), so a signal sent once step 1 is logged lands mid-run
SIGNAL_RUN = ["--max_steps", "12", "--grad_accum", "40", "--save_every", "5", "--keep_last", "3", "--eval_every", "4"]


def ft_main_process(cfg_path: str, out_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "ft_main.py"), "--config", cfg_path, "--out_dir", str(out_dir),
                             *SIGNAL_RUN, *extra], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=240)
    return proc.returncode, out, err


def wait_for_a_logged_step(proc: subprocess.Popen, out_dir: Path) -> None:
    metrics, deadline = out_dir / "metrics.jsonl", time.time() + 120
    while not (metrics.is_file() and metrics.read_text().strip()):
        assert proc.poll() is None, f"ft_main.py ended before logging a step: {proc.communicate()}"
        assert time.time() < deadline, "no step logged after 120 s"
        time.sleep(0.01)


def deliver(pid: int, signum: int) -> None:
    """Send signum and wait until the process has taken it (no longer pending), so that a second
    one sent next is not merged into it."""
    os.kill(pid, signum)
    bit = 1 << (signum - 1)
    while any(int(ln.split()[1], 16) & bit for ln in Path(f"/proc/{pid}/status").read_text().splitlines()
              if ln.startswith(("SigPnd:", "ShdPnd:"))):
        time.sleep(0.001)


def losses(out_dir: Path) -> dict:
    return {key: r.get("loss", r.get("eval_loss")) for key, r in metrics_by_step(out_dir).items()}


def assert_resumes_as_uninterrupted(cfg_path: str, out_dir: Path, reference: Path) -> None:
    """The same command again resumes from the newest checkpoint and ends as the uninterrupted run."""
    newest = checkpoints(out_dir)[-1]
    rc, out, err = finish(ft_main_process(cfg_path, out_dir))
    assert rc == 0, err
    assert f"resumed from {newest}" in out
    assert losses(out_dir) == pytest.approx(losses(reference), rel=1e-6, abs=1e-6)


@pytest.fixture(scope="module")
def signal_run(ckpt, tmp_path_factory) -> tuple[str, Path]:
    """(config, out_dir) of the uninterrupted run the signal tests compare with."""
    folder = tmp_path_factory.mktemp("signals")
    cfg_path = base_config(folder, ckpt)
    rc, _, err = finish(ft_main_process(cfg_path, folder / "reference"))
    assert rc == 0, err
    return cfg_path, folder / "reference"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_at_the_next_step_and_resumes(tmp_path, signal_run, signum):
    cfg_path, reference = signal_run
    out = tmp_path / "out"
    proc = ft_main_process(cfg_path, out)
    wait_for_a_logged_step(proc, out)
    deliver(proc.pid, signum)
    rc, _, err = finish(proc)
    assert rc == 128 + signum  # 130, 143: what a shell reports for a process killed by the signal
    assert "Traceback" not in err
    m = re.fullmatch(rf"interrupted by {signum.name} at step (\d+): saved (\S+); run the same command again to "
                     r"resume \(resume = auto\)", err.strip())
    assert m, err
    step = int(m.group(1))
    assert 1 <= step < 12
    assert m.group(2) == str(out / "checkpoints" / f"step_{step:06d}") and checkpoints(out)[-1] == Path(m.group(2))
    assert not list((out / "checkpoints").glob("*.partial")) and not (out / "adapter").exists()
    assert max(r for r, _ in metrics_by_step(out)) == step
    assert_resumes_as_uninterrupted(cfg_path, out, reference)


def test_second_sigint_stops_at_once_leaving_whole_checkpoints(tmp_path, signal_run):
    """A checkpoint every step, the second Ctrl-C just after the first, once step 1's checkpoint is
    saved: it stops in step 2 or its save, every step_N folder left is whole, and the same command
    again resumes from the newest and finishes."""
    cfg_path, _ = signal_run
    out = tmp_path / "out"
    command = ("--save_every", "1", "--grad_accum", "200", "--max_steps", "4")  # ~0.5 s a step
    proc = ft_main_process(cfg_path, out, *command)
    wait_for_a_logged_step(proc, out)
    while not checkpoints(out):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    deliver(proc.pid, signal.SIGINT)
    deliver(proc.pid, signal.SIGINT)
    rc, _, err = finish(proc)
    assert rc == 130
    assert err.strip() == ("stopped at once on a second SIGINT: the checkpoints saved before are whole; run the same "
                           "command again to resume from the last (resume = auto)"), err
    for folder in checkpoints(out):
        assert {"rank0.json", "rank0.safetensors", "adapter"} <= {p.name for p in folder.iterdir()}, folder
        load_file(str(folder / "rank0.safetensors"))
    newest = checkpoints(out)[-1]
    rc, out_text, err = finish(ft_main_process(cfg_path, out, *command))
    assert rc == 0 and f"resumed from {newest}" in out_text, err
    assert max(r for r, _ in metrics_by_step(out)) == 4


def test_interrupt_while_deleting_an_old_checkpoint_leaves_only_whole_ones(tmp_path, monkeypatch):
    """A second Ctrl-C inside the deletion of a pruned checkpoint: the half-deleted folder no longer
    has a checkpoint's name, so resume can't take it, and the next save clears it away."""
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    save = lambda step: finetune.state.save_state(tmp_path, step, 0, {"p": param}, optimizer, scheduler, None, 1)  # noqa: E731
    save(1)
    real_rmtree = shutil.rmtree

    def interrupted_rmtree(path, *a, **k):
        if Path(path).name.endswith(".discard") and Path(path).exists():
            (Path(path) / "rank0.json").unlink()  # half deleted
            raise KeyboardInterrupt
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(finetune.state.shutil, "rmtree", interrupted_rmtree)
    with pytest.raises(KeyboardInterrupt):
        save(2)
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    assert checkpoints(tmp_path) == [root / "step_000002"]
    assert sorted(p.name for p in root.iterdir()) == ["step_000001.discard", "step_000002"]
    save(3)
    assert sorted(p.name for p in root.iterdir()) == ["step_000003"]


def test_torchrun_ranks_stop_together_when_one_is_signalled(tmp_path, signal_run):
    """SIGINT to rank 1 alone: both ranks stop after the same step and write its checkpoint."""
    cfg_path, _ = signal_run
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "ft_main.py"), "--config", cfg_path, "--out_dir", str(out), *SIGNAL_RUN]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agent = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_a_logged_step(agent, out)
    workers = [int(pid) for pid in Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split()]
    rank1 = [pid for pid in workers if b"\0RANK=1\0" in b"\0" + Path(f"/proc/{pid}/environ").read_bytes()]
    assert len(rank1) == 1, workers
    deliver(rank1[0], signal.SIGINT)
    rc, _, err = finish(agent)
    assert rc != 0
    m = re.search(r"interrupted by SIGINT at step (\d+): saved (\S+);", err)
    assert m, err
    step = int(m.group(1))
    folder = out / "checkpoints" / f"step_{step:06d}"
    assert checkpoints(out)[-1] == folder == Path(m.group(2))
    assert [json.loads((folder / f"rank{r}.json").read_text())["step"] for r in (0, 1)] == [step, step]
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {folder}" in again.stdout


# --- one rank failing under torchrun ----------------------------------------------------------------

# Fault injection in a real torchrun run: Python imports sitecustomize from PYTHONPATH at start-up,
# so rank 1 alone gets an optimizer whose third zero_grad raises, as an out-of-memory error would,
# while rank 0 goes on into the next step's gradient all-reduce.
FAIL_ON_RANK_1 = """
import os
if os.environ.get("RANK") == "1":
    import torch
    calls = [0]
    zero_grad = torch.optim.Optimizer.zero_grad
    def failing(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("injected failure on rank 1 (out of memory)")
        return zero_grad(self, *args, **kwargs)
    torch.optim.Optimizer.zero_grad = failing
"""


def test_one_failing_rank_stops_every_rank_within_seconds(tmp_path, ckpt):
    """Before, the failing rank waited in shutdown's barrier while rank 0 waited in an all-reduce:
    both hung until gloo's 30-minute timeout. Now every rank is gone in seconds, and torchrun
    names rank 1 as the root cause, with its message."""
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(FAIL_ON_RANK_1)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "inject"), str(ROOT)])}
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "ft_main.py", "--ckpt_dir", ckpt, "--out_dir", tmp_path / "out", "--train_file", DEMO_TRAIN,
                             "--eval_file", DEMO_EVAL, "--template", "plain", "--max_steps", "20", "--micro_batch_size",
                             "2", "--exact_match_samples", "0", "--eval_every", "0", "--save_every", "0"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    elapsed = time.monotonic() - start
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "RuntimeError: injected failure on rank 1 (out of memory)" in out
    root_cause = out[out.index("Root Cause"):]
    assert "rank      : 1 (local_rank: 1)" in root_cause
    assert elapsed < 60, f"took {elapsed:.0f} s"
