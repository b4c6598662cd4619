"""Bad input to the fine-tuning entry point: `ft_main.main(argv)` returns 2 and prints one
`error: ...` line on stderr (no traceback) for bad configs and data, skips malformed rows with a
warning unless --strict, and returns 1 when the loss turns NaN, leaving the checkpoints saved
before the divergence untouched."""
import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ft_main
import finetune.trainer as trainer_module
from finetune.adapters import attach, load_adapter
from finetune.config import load_config
from finetune.state import load_state
from llama.formats import read_model_args, save_checkpoint
from llama.loader import load_model
from llama.tiny import random_model
from llama.tokenizers import Tokenizer
from tests.utils import tiny_args


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
    rc, _, err = run_main(["--config", base_config(tmp_path, ckpt), "--cutoff_len", "3"], capsys)
    assert rc == 2
    msg = one_error(err)
    assert "train.jsonl" in msg and "cutoff_len 3" in msg


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


def test_nan_loss_returns_1_and_keeps_the_last_checkpoint(tmp_path, ckpt, capsys, monkeypatch):
    """lr 1e30 without clipping: Adam's first update moves every LoRA weight by ~1e30, and the
    next forward overflows. The step-1 checkpoint (save_every 1) is written before that."""
    saved = {}
    real_save_state = trainer_module.save_state

    def recording_save_state(*args, **kwargs):
        folder = real_save_state(*args, **kwargs)
        saved[folder] = digest(folder)  # the bytes as written
        return folder

    monkeypatch.setattr(trainer_module, "save_state", recording_save_state)
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
