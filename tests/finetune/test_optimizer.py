"""finetune.trainer.make_optimizer: AdamW fused where every trained tensor allows it, with the
same steps as torch's default (foreach) AdamW, the reference."""
import torch

from finetune.config import TrainConfig
from finetune.trainer import make_optimizer


def params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*shape, generator=g).to(dtype)) for shape in ((64, 32), (32,), (7, 5))]


def test_float32_cpu_params_get_fused_adamw_with_the_foreach_steps():
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1, adam_betas=[0.8, 0.95], adam_eps=1e-6)
    ours, ref = params(), params()
    optimizer = make_optimizer(ours, cfg)
    assert optimizer.defaults["fused"] is True
    reference = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, betas=(0.8, 0.95), eps=1e-6, foreach=True)
    for step in range(5):
        grads = params(seed=100 + step)
        for p, q, g in zip(ours, ref, grads):
            p.grad, q.grad = g.detach().clone(), g.detach().clone()
        optimizer.step()
        reference.step()
    for p, q in zip(ours, ref):
        assert (p - q).abs().max() <= 1e-6 * q.abs().max()


def test_a_16_bit_param_keeps_unfused_adamw():
    mixed = params() + params(torch.bfloat16)
    assert not make_optimizer(mixed, TrainConfig()).defaults["fused"]
