"""Learning-rate schedules of the CLIP prompt-learning papers (not in torch or Lightning)."""

from __future__ import annotations

import math

import torch


class ConstantWarmupCosineLR(torch.optim.lr_scheduler.LRScheduler):
    """The schedule of CoOp, CoCoOp, MaPLe and PromptSRC (Dassl's ``ConstantWarmupScheduler`` around
    ``CosineAnnealingLR``): ``warmup_lr`` for the first ``warmup_epochs`` epochs, then cosine from the base rate,
    ``lr(e) = eta_min + (base - eta_min) * (1 + cos(pi * (e - warmup_epochs) / T_max)) / 2``.

    As in Dassl, the cosine restarts its count after the warm-up, so with ``T_max = max_epochs`` the last epoch's
    rate stays above ``eta_min``. Step it once per epoch (``lr_scheduler_interval: epoch``).

    Args:
        optimizer: The optimizer.
        T_max: Cosine period in epochs (the papers: the number of training epochs).
        warmup_epochs: Epochs at the constant ``warmup_lr``.
        warmup_lr: The warm-up rate (the papers: 1e-5).
        eta_min: Minimum rate of the cosine.
        last_epoch: Index of the last epoch (``-1``: start).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, T_max: int, warmup_epochs: int = 1,  # noqa: N803
                 warmup_lr: float = 1e-5, eta_min: float = 0.0, last_epoch: int = -1) -> None:
        if not isinstance(T_max, int) or isinstance(T_max, bool) or T_max < 1:
            raise ValueError(f"T_max must be a positive int, got {T_max!r}")
        if not isinstance(warmup_epochs, int) or isinstance(warmup_epochs, bool) or warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be a non-negative int, got {warmup_epochs!r}")
        self.T_max, self.warmup_epochs, self.warmup_lr, self.eta_min = T_max, warmup_epochs, warmup_lr, eta_min
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:  # noqa: D102
        e = self.last_epoch
        if e < self.warmup_epochs:
            return [self.warmup_lr for _ in self.base_lrs]
        cos = (1.0 + math.cos(math.pi * (e - self.warmup_epochs) / self.T_max)) / 2.0
        return [self.eta_min + (base - self.eta_min) * cos for base in self.base_lrs]
