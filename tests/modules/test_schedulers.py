"""vpeft.modules.schedulers.WarmupPolyLR (SAMed / MapSAM): rates against the formula written out by hand, argument
errors, and a vpeft task filling ``total_iters`` from the trainer."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("lightning")

from vpeft.modules.schedulers import WarmupPolyLR  # noqa: E402


def _rates(sched: WarmupPolyLR, opt: torch.optim.Optimizer, n: int) -> list[float]:
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_then_polynomial_decay_by_hand():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.005)
    got = _rates(WarmupPolyLR(opt, warmup_iters=4, total_iters=10, power=0.9), opt, 12)
    # warm-up: 0.005 * 1/4, 2/4, 3/4, 4/4; then 0.005 * (1 - k/10) ** 0.9 for k = 0, 1, ..., 7
    want = [0.00125, 0.0025, 0.00375, 0.005] + [0.005 * (1 - k / 10) ** 0.9 for k in range(8)]
    assert got == pytest.approx(want, rel=1e-12)
    opt0 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert _rates(WarmupPolyLR(opt0, warmup_iters=0, total_iters=4, power=1.0), opt0, 5) == \
        pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


@pytest.mark.parametrize("kwargs, field", [(dict(warmup_iters=-1), "warmup_iters"),
                                           (dict(total_iters=0), "total_iters"), (dict(power=0), "power")])
def test_errors(kwargs, field):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=field):
        WarmupPolyLR(opt, **kwargs)


def test_task_sets_total_iters_from_the_trainer():
    from vpeft.modules.segmentation import SamSegmenter

    task = SamSegmenter("sam:vit_b", num_classes=2, methods=[],
                        backbone_kwargs=dict(img_size=64, embed_dim=64, depth=2, num_heads=4, window_size=2,
                                             global_attn_indexes=(1,)),
                        lr_scheduler=lambda opt: WarmupPolyLR(opt, warmup_iters=3), lr_scheduler_interval="step")
    task.configure_model()
    with pytest.raises(ValueError, match="total_iters"):
        task.configure_optimizers()
    task._trainer = SimpleNamespace(estimated_stepping_batches=37.0)
    cfg = task.configure_optimizers()
    assert cfg["lr_scheduler"]["scheduler"].total_iters == 37 and cfg["lr_scheduler"]["interval"] == "step"
