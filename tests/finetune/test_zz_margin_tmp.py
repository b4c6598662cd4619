import pytest
from tests.finetune.test_training_parity import *
from tests.finetune.test_training_parity import setup  # noqa

def test_margins(setup):
    cfg = config(setup, "m")
    train(cfg)
    ours = step_records(setup / "m")
    ref, ref_eval, ref_model, base = reference_run(setup, cfg)
    print("\nloss diffs", max(abs(a["loss"]-b["loss"]) for a, b in zip(ours, ref)))
    print("gn rel", max(abs(a["grad_norm"]-b["grad_norm"])/b["grad_norm"] for a, b in zip(ours, ref)))
    print([round(r["loss"],3) for r in ref]); print([round(r["grad_norm"],2) for r in ref])
    train(config(setup, "a2", micro_batch_size=2, grad_accum=2)); train(config(setup, "a1", micro_batch_size=4, grad_accum=1))
    print("accum", max(abs(a["loss"]-b["loss"]) for a, b in zip(step_records(setup/"a2"), step_records(setup/"a1"))))
