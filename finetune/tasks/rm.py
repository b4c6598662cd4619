"""Reward modelling (the second step of DeepSpeed-Chat's recipe; TRL's RewardTrainer): a scalar
score head read at each sequence's last token, trained so the chosen answer outscores the
rejected one: loss -logsigmoid(r_chosen - r_rejected) per pair (Bradley-Terry)."""
import torch
import torch.nn.functional as F


def rm_loss(scores: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """scores [2 * pairs]: every chosen answer's score, then every rejected one's (collate's
    order). Returns the loss summed over pairs and metric sums (the trainer divides both by the
    pair count of the whole step): accuracy (chosen scored higher) and margin (r_chosen - r_rejected)."""
    chosen, rejected = scores.float().chunk(2)
    margin = chosen - rejected
    loss = -F.logsigmoid(margin).sum()
    margin = margin.detach()
    return loss, {"accuracy": (margin > 0).float().sum(), "margin": margin.sum()}
