"""Layer-wise placement: the stage plan, and logits equal to single-device placement."""
import itertools

import pytest
import torch

from llama.placement import place_layers, plan_stages
from llama.tiny import random_model
from tests.utils import tiny_args


def best_max_stage(units, n):
    """Brute force: the smallest possible largest-stage size over all contiguous splits."""
    best = float("inf")
    for cuts in itertools.combinations(range(1, len(units)), n - 1):
        bounds = (0, *cuts, len(units))
        best = min(best, max(sum(units[a:b]) for a, b in zip(bounds, bounds[1:])))
    return best


@pytest.mark.parametrize("units, n", [
    ([10] + [5] * 8 + [10], 2), ([10] + [5] * 8 + [10], 4), ([40, 3, 3, 3, 3, 3, 3, 40], 3),
    ([1000, 1, 1, 1, 1], 3), ([1, 1, 1, 1, 1000], 3), ([7, 7], 2), ([3, 9, 2, 8, 4, 6, 5], 3),
])
def test_plan_is_contiguous_covering_and_near_balanced(units, n):
    stages = plan_stages(units, [1.0] * n)
    assert len(stages) == len(units)
    assert stages == sorted(stages) and set(stages) == set(range(n))  # contiguous, none empty
    sizes = [sum(u for u, s in zip(units, stages) if s == k) for k in range(n)]
    assert max(sizes) <= best_max_stage(units, n) + max(units)  # within one unit of the optimum


def test_plan_follows_shares():
    stages = plan_stages([1] * 40, [3.0, 1.0])
    assert stages.count(0) == 30


def forward_logits(model, tokens, pad_lens=None):
    with torch.no_grad():
        return model(tokens, 0, pad_lens)


@pytest.mark.parametrize("devices", [["cpu", "cpu"], ["cpu", "cpu", "cpu"]])
def test_placement_logits_match_single_device(devices):
    args = tiny_args(n_layers=4, n_kv_heads=2)
    reference = random_model(args, seed=0).eval()
    placed = random_model(args, seed=0).eval()
    plan = place_layers(placed, devices)
    assert len(plan) == 4
    for layer, dev in zip(placed.layers, plan):
        assert all(p.device == torch.device(dev) for p in layer.parameters())
    tokens = torch.randint(0, args.vocab_size, (2, 12))
    pad_lens = torch.tensor([0, 3])
    torch.testing.assert_close(forward_logits(placed, tokens, pad_lens), forward_logits(reference, tokens, pad_lens), atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_placement_across_cpu_and_gpu():
    args = tiny_args(n_layers=4, n_kv_heads=2)
    reference = random_model(args, seed=0).eval()
    placed = random_model(args, seed=0).eval()
    plan = place_layers(placed, ["cpu", "cuda:0"])
    assert plan[0] == "cpu" and plan[-1] == "cuda:0"
    for layer, dev in zip(placed.layers, plan):
        assert all(p.device.type == torch.device(dev).type for p in layer.parameters())
    placed.setup_caches(2, 32)
    reference.setup_caches(2, 32)
    tokens = torch.randint(0, args.vocab_size, (2, 12))
    with torch.no_grad():
        got = torch.cat([placed(tokens[:, :8]).cpu(), *(placed(tokens[:, i:i + 1], i).cpu() for i in range(8, 12))], dim=1)
    want = forward_logits(reference, tokens)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
