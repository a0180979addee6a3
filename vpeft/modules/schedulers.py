"""Learning-rate schedules of the CLIP prompt-learning and SAM-adaptation papers (not in torch or Lightning)."""

from __future__ import annotations

import math
from typing import Optional

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


class WarmupPolyLR(torch.optim.lr_scheduler.LRScheduler):
    """The schedule of SAMed and MapSAM: a linear warm-up over ``warmup_iters`` steps, then polynomial decay over the
    whole run, stepped every iteration (``lr_scheduler_interval: step``):

    ``lr(t) = base * (t + 1) / warmup_iters`` for ``t < warmup_iters``, else
    ``lr(t) = base * (1 - (t - warmup_iters) / total_iters) ** power``,

    with ``t`` the 0-based step and ``total_iters`` the run's total number of steps (SAMed: ``max_epochs *
    iterations per epoch``; the decay counts from the end of the warm-up but divides by the total, so the last rate
    stays above 0, as in SAMed). SAMed applies each rate one step later (it sets the rate after the optimizer step);
    that one-step lag is not reproduced.

    Args:
        optimizer: The optimizer.
        warmup_iters: Warm-up steps (SAMed, MapSAM: 250); 0 starts at the base rate.
        total_iters: Total training steps; ``None`` lets :class:`~vpeft.modules.base.PeftTask` set it from the
            trainer (``estimated_stepping_batches``) when it builds the optimizer.
        power: Exponent of the decay (0.9).
        last_epoch: Index of the last step (``-1``: start).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_iters: int = 250, total_iters: Optional[int] = None,
                 power: float = 0.9, last_epoch: int = -1) -> None:
        if not isinstance(warmup_iters, int) or isinstance(warmup_iters, bool) or warmup_iters < 0:
            raise ValueError(f"warmup_iters must be a non-negative int, got {warmup_iters!r}")
        if total_iters is not None and (not isinstance(total_iters, int) or isinstance(total_iters, bool)
                                        or total_iters < 1):
            raise ValueError(f"total_iters must be a positive int or None (set from the trainer), got {total_iters!r}")
        if not isinstance(power, (int, float)) or isinstance(power, bool) or power <= 0:
            raise ValueError(f"power must be a positive number, got {power!r}")
        self.warmup_iters, self.total_iters, self.power = warmup_iters, total_iters, float(power)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:  # noqa: D102
        t = self.last_epoch
        if t < self.warmup_iters:
            factor = (t + 1) / self.warmup_iters
        elif self.total_iters is None:
            raise RuntimeError("WarmupPolyLR.total_iters is not set: pass it, or let a vpeft task set it from the "
                               "trainer before training")
        else:
            factor = max(0.0, 1.0 - (t - self.warmup_iters) / self.total_iters) ** self.power
        return [base * factor for base in self.base_lrs]
