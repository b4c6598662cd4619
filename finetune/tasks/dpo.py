"""Direct preference optimisation (Rafailov et al. 2023), with the losses and metrics of TRL's
DPOTrainer. Per pair, with logp(y) the summed log-probability of the answer's tokens under the
policy (the model being trained) and the reference (the model before it):

    h = beta * ((logp(chosen) - ref_logp(chosen)) - (logp(rejected) - ref_logp(rejected)))
    sigmoid:  -(1 - eps) * logsigmoid(h) - eps * logsigmoid(-h)   (eps = label smoothing:
              conservative DPO, a fraction eps of the labels taken as flipped)
    ipo:      (h' / beta - 1 / (2 * beta))**2, h' as h but with each log-ratio divided by its
              answer's token count (TRL's length-averaged IPO)
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DPO_LOSSES = ("sigmoid", "ipo")


@dataclass(frozen=True)
class DPOSettings:
    beta: float = 0.1
    loss: str = "sigmoid"
    label_smoothing: float = 0.0


def dpo_loss(logps: torch.Tensor, ref_logps: torch.Tensor, lengths: torch.Tensor,
             settings: DPOSettings) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """logps, ref_logps, lengths [2 * pairs]: the answers' summed log-probs under the policy and the
    reference and their token counts, every chosen answer first, then every rejected one. Returns
    the loss summed over pairs and the sums over pairs of TRL's metrics (the trainer divides both
    by the pair count of the whole step): rewards/chosen and rewards/rejected (beta * the log-ratio),
    rewards/accuracies (chosen's reward above rejected's), rewards/margins, logps/chosen, logps/rejected;
    and logps/accuracies (chosen's log-prob above rejected's)."""
    beta = settings.beta
    ratios = logps.float() - ref_logps.float()
    chosen_ratio, rejected_ratio = ratios.chunk(2)
    if settings.loss == "ipo":
        chosen_len, rejected_len = lengths.float().clamp(min=1).chunk(2)
        h = chosen_ratio / chosen_len - rejected_ratio / rejected_len
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        h = beta * (chosen_ratio - rejected_ratio)
        eps = settings.label_smoothing
        losses = -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h) if eps else -F.logsigmoid(h)
    chosen_reward, rejected_reward = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    chosen_logps, rejected_logps = logps.detach().float().chunk(2)
    metrics = {"rewards/chosen": chosen_reward.sum(), "rewards/rejected": rejected_reward.sum(),
               "rewards/accuracies": (chosen_reward > rejected_reward).float().sum(),
               "rewards/margins": (chosen_reward - rejected_reward).sum(),
               "logps/chosen": chosen_logps.sum(), "logps/rejected": rejected_logps.sum(),
               # ours, not TRL's: the policy's own preference, whatever the reference's (before
               # training rewards/accuracies is 0: every reward is 0 and none is above another)
               "logps/accuracies": (chosen_logps > rejected_logps).float().sum()}
    return losses.sum(), metrics
