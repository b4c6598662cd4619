"""Task rm (reward model): the loss and the score head's gradient against a hand-written float64
reference on HF's LlamaForCausalLM hidden states; a whole run logs accuracy and margin, and its
saved adapter is a PEFT SEQ_CLS adapter whose scores HF's LlamaForSequenceClassification + PEFT
reproduce."""
import json
import math

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import PeftModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from finetune.adapters import attach, load_adapter  # noqa: E402
from finetune.config import TrainConfig  # noqa: E402
from finetune.data import PairExample, collate  # noqa: E402
from finetune.trainer import train  # noqa: E402
from llama.formats import read_model_args  # noqa: E402
from llama.loader import load_model  # noqa: E402
from tests.utils import ROOT, hf_from_ours, make_ours, metrics_by_step, tiny_args, write_ckpt  # noqa: E402

PREF_TRAIN, PREF_EVAL = ROOT / "data" / "demo" / "pref_train.jsonl", ROOT / "data" / "demo" / "pref_eval.jsonl"


def test_loss_and_head_gradient_match_a_float64_reference():
    model = make_ours(tiny_args(), seed=3)
    hf = hf_from_ours(make_ours(tiny_args(), seed=3)).double()
    task_model = attach(model, TrainConfig(method="lora", task="rm", lora_targets=["wq"]).check(), None)
    g = torch.Generator().manual_seed(4)
    pairs = [PairExample([1] + torch.randint(3, 384, (2 + i,), generator=g).tolist(),
                         torch.randint(3, 384, (3,), generator=g).tolist(),
                         torch.randint(3, 384, (1 + 2 * i,), generator=g).tolist()) for i in range(4)]
    loss, count, metrics = task_model(**collate(pairs, 0, "rm"))
    (loss / count).backward()

    head = task_model.head.weight.detach().double().requires_grad_()  # [1, dim]

    def score(ids):  # the final-normed hidden state of the last token, one unpadded sequence
        hidden = hf.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        return (head @ hidden)[0]

    margins = torch.stack([score(p.prompt + p.chosen) - score(p.prompt + p.rejected) for p in pairs])
    want = torch.log1p(torch.exp(-margins)).mean()  # -log sigmoid(m), written out
    want.backward()
    assert (loss / count).item() == pytest.approx(want.item(), rel=1e-5)
    assert metrics["margin"].item() == pytest.approx(margins.sum().item(), rel=1e-4, abs=1e-5)
    assert metrics["accuracy"].item() == (margins > 0).sum().item()
    torch.testing.assert_close(task_model.head.weight.grad.double(), head.grad, rtol=1e-4, atol=1e-6)
    assert head.grad.abs().max() > 1e-3


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer_path):
    return write_ckpt(tmp_path_factory.mktemp("rm_base"), tiny_args(), tokenizer_path, seed=1)


def test_run_logs_accuracy_and_margin_and_saves_a_seq_cls_adapter(ckpt, tmp_path):
    cfg = TrainConfig(ckpt_dir=str(ckpt), dtype="float32", device="cpu", method="lora", task="rm",
                      train_file=str(PREF_TRAIN), eval_file=str(PREF_EVAL), template="plain", cutoff_len=64,
                      out_dir=str(tmp_path / "rm"), seed=0, micro_batch_size=8, max_steps=8, lr=1e-2, warmup_steps=0,
                      lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_targets=["q_proj", "v_proj"]).check()
    results = train(cfg)
    m = metrics_by_step(tmp_path / "rm")
    assert {"accuracy", "margin"} <= set(m[(1, "train")])
    assert {"eval_loss", "eval_accuracy", "eval_margin"} <= set(m[(8, "eval")])
    assert results["preference_accuracy_after"] == m[(8, "eval")]["eval_accuracy"]
    assert all(math.isfinite(m[(s, "train")]["loss"]) for s in range(1, 9))

    adapter = tmp_path / "rm" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    # HF's sequence classifier with PEFT scores pairs as our trained reward model does
    from transformers import LlamaForSequenceClassification

    base = load_model(ckpt, read_model_args(ckpt))
    hf = hf_from_ours(base)
    hf.config.num_labels, hf.config.pad_token_id = 1, 0
    seq = LlamaForSequenceClassification(hf.config).float()
    seq.model.load_state_dict(hf.model.state_dict())
    theirs = PeftModel.from_pretrained(seq, adapter).eval()
    ours = load_adapter(base, adapter)
    head = load_file(str(adapter / "adapter_model.safetensors"))["base_model.model.score.weight"]
    tokens = torch.randint(3, 384, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = ours.hidden_states(ours.tok_embeddings(tokens))[:, -1] @ head.T
        want = theirs(input_ids=tokens).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
