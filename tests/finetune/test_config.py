"""finetune/config.py: TOML files (flat or grouped in [model]/[method]/[data]/[train]), command-line
overrides that win over the TOML, type coercion, `ft_main.py --help`, the shipped TOMLs, and
errors that name the key."""
import dataclasses
import os
import subprocess
import sys

import pytest

from finetune.config import TrainConfig, load_config, read_toml
from llama.errors import LlamaInputError
from tests.utils import ROOT

KEYS = [f.name for f in dataclasses.fields(TrainConfig)]

FLAT = """
ckpt_dir = "ckpts/x"
method = "lora"
lora_r = 4
lora_alpha = 8
lora_targets = ["q_proj", "wv"]
task = "sft"
template = "vicuna"
packing = true
cutoff_len = 256
lr = 3e-4
adam_betas = [0.8, 0.95]
max_steps = 7
label_names = ["b", "a"]
"""

GROUPED = """
[model]
ckpt_dir = "ckpts/x"

[method]
method = "lora"
lora_r = 4
lora_alpha = 8
lora_targets = ["q_proj", "wv"]

[data]
task = "sft"
template = "vicuna"
packing = true
cutoff_len = 256
label_names = ["b", "a"]

[train]
lr = 3e-4
adam_betas = [0.8, 0.95]
max_steps = 7
"""

EXPECTED = dict(ckpt_dir="ckpts/x", method="lora", lora_r=4, lora_alpha=8.0, lora_targets=["q_proj", "wv"], task="sft",
                template="vicuna", packing=True, cutoff_len=256, lr=3e-4, adam_betas=[0.8, 0.95], max_steps=7,
                label_names=["b", "a"])


def write(tmp_path, text, name="cfg.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def check_types(cfg: TrainConfig) -> None:
    """Every value has its default's type (ints stay ints, floats are floats, lists are lists)."""
    for f in dataclasses.fields(TrainConfig):
        default, value = f.default_factory(), getattr(cfg, f.name)
        assert type(value) is type(default), (f.name, value)
        if isinstance(default, list) and default:
            assert all(type(v) is type(default[0]) for v in value), (f.name, value)


@pytest.mark.parametrize("text", [FLAT, GROUPED], ids=["flat", "grouped"])
def test_toml_flat_and_grouped(tmp_path, text):
    path = write(tmp_path, text)
    assert read_toml(path) == EXPECTED
    cfg = load_config(["--config", path])
    for key, value in EXPECTED.items():
        assert getattr(cfg, key) == value, key
    assert cfg.seed == 42 and cfg.micro_batch_size == 4  # untouched keys keep their defaults
    check_types(cfg)
    assert isinstance(cfg.lora_alpha, float)  # TOML integer 8 for a float key


def test_flat_and_grouped_agree(tmp_path):
    assert load_config(["--config", write(tmp_path, FLAT, "a.toml")]) == \
        load_config(["--config", write(tmp_path, GROUPED, "b.toml")])


def test_command_line_wins_over_toml(tmp_path):
    path = write(tmp_path, GROUPED)
    cfg = load_config(["--config", path, "--lr", "1e-4", "--lora_targets", "q_proj,v_proj", "--lora_r", "16",
                       "--adam_betas", "0.9,0.99", "--label_names", "x,y,z", "--epochs", "2", "--out_dir", "o"])
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float)
    assert cfg.lora_targets == ["q_proj", "v_proj"]
    assert cfg.lora_r == 16 and isinstance(cfg.lora_r, int)
    assert cfg.adam_betas == [0.9, 0.99]
    assert cfg.label_names == ["x", "y", "z"]
    assert cfg.epochs == 2.0 and isinstance(cfg.epochs, float)
    assert cfg.out_dir == "o"
    assert cfg.max_steps == 7 and cfg.template == "vicuna"  # the rest still from the TOML
    check_types(cfg)
    # --key=value works too
    assert load_config(["--config", path, "--lr=5e-5"]).lr == 5e-5


@pytest.mark.parametrize("argv, expected", [
    (["--packing"], True), (["--packing", "false"], False), (["--packing", "true"], True),
    (["--packing", "0"], False), (["--packing=false"], False), (["--packing", "--lr", "1e-4"], True),
])
def test_bool_flags(tmp_path, argv, expected):
    off = write(tmp_path, "packing = false\n", "off.toml")
    on = write(tmp_path, "packing = true\n", "on.toml")
    for path in (off, on):
        cfg = load_config(["--config", path] + argv)
        assert cfg.packing is expected, (path, argv)
    assert load_config([]).packing is False
    assert load_config(["--config", on]).packing is True


def test_bool_flag_followed_by_another_key(tmp_path):
    cfg = load_config(["--packing", "--use_rslora", "--strict", "no", "--lr", "1e-3"])
    assert (cfg.packing, cfg.use_rslora, cfg.strict, cfg.lr) == (True, True, False, 1e-3)


def test_defaults_and_default_config(tmp_path):
    cfg = load_config([])
    assert cfg == TrainConfig()
    path = write(tmp_path, "lr = 0.5\nmax_steps = 3\n")
    assert load_config([], default_config=path).lr == 0.5
    other = write(tmp_path, "lr = 0.25\n", "other.toml")
    assert load_config(["--config", other], default_config=path).lr == 0.25  # --config replaces the default file
    assert load_config(["--config", other], default_config=path).max_steps == 0


def test_toml_integral_float_for_int_key(tmp_path):
    assert load_config(["--config", write(tmp_path, "lora_r = 8.0\n")]).lora_r == 8
    with pytest.raises(LlamaInputError, match="lora_r"):
        load_config(["--config", write(tmp_path, "lora_r = 8.5\n", "b.toml")])


@pytest.mark.parametrize("argv, key", [
    (["--lora_r", "abc"], "lora_r"), (["--lr", "fast"], "lr"), (["--packing", "maybe"], "packing"),
    (["--adam_betas", "0.9,x"], "adam_betas"), (["--micro_batch_size", "0"], "micro_batch_size"),
    (["--cutoff_len", "0"], "cutoff_len"), (["--grad_accum", "0"], "grad_accum"),
])
def test_bad_values_name_the_key(argv, key):
    with pytest.raises(LlamaInputError, match=key):
        load_config(argv)


def test_bad_toml_value_names_the_key_and_file(tmp_path):
    path = write(tmp_path, '[train]\nlr = "fast"\n')
    with pytest.raises(LlamaInputError) as e:
        load_config(["--config", path])
    assert "lr" in str(e.value) and path in str(e.value)


CHOICES = {"method": "lorax", "task": "seq2seq", "precision": "fp8", "quant": "int3", "prompt_init": "zeros",
           "dtype": "float64"}


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_invalid_choice_names_the_key(tmp_path, key):
    bad = CHOICES[key]
    for attempt in (lambda: load_config([f"--{key}", bad]),
                    lambda: load_config(["--config", write(tmp_path, f'{key} = "{bad}"\n')])):
        with pytest.raises(LlamaInputError) as e:
            attempt()
        assert key in str(e.value) and bad in str(e.value)


def test_packing_needs_an_lm_task_without_prompt_tuning():
    with pytest.raises(LlamaInputError, match="packing"):
        load_config(["--packing", "--method", "prompt"])
    with pytest.raises(LlamaInputError, match="packing"):
        load_config(["--packing", "--task", "cls"])
    assert load_config(["--packing", "--task", "pt"]).packing


def test_toml_errors_name_the_file(tmp_path):
    with pytest.raises(LlamaInputError, match="not found"):
        read_toml(tmp_path / "missing.toml")
    bad = write(tmp_path, "lr = = 1\n")
    with pytest.raises(LlamaInputError, match="not valid TOML") as e:
        read_toml(bad)
    assert bad in str(e.value)


def run_help():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "ft_main.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=env)


@pytest.fixture(scope="module")
def help_run():
    return run_help()


def test_help_lists_every_key(help_run):
    out = help_run.stdout
    assert out.startswith("usage: ft_main.py")
    assert "--config" in out
    options = out.split("options:", 1)[1]  # the described options, not just the usage line
    missing = [k for k in KEYS if not any(f"--{k}{end}" in options for end in (" ", "\n"))]
    assert not missing, missing
    for group in ("[model]", "[method]", "[data]", "[train]"):
        assert group in out


def test_help_returns_0_without_a_traceback(help_run):
    assert help_run.returncode == 0, help_run.stderr
    assert "Traceback" not in help_run.stderr


SHIPPED = sorted((ROOT / "torchrun_configs").glob("*.toml"))


def test_there_are_shipped_configs():
    assert any(p.name == "demo.toml" for p in SHIPPED)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_tomls_parse(path):
    values = read_toml(path)
    assert values, path
    cfg = TrainConfig(**values).check()
    check_types(cfg)
    assert load_config(["--config", str(path)]) == cfg
