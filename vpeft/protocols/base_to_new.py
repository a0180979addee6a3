"""Base-to-new generalisation (CoCoOp, arXiv:2203.05557) in one call: train on the base classes, test on the base
and on the new classes, report the harmonic mean.

The classes of a dataset are split by label: base = the first ``ceil(n / 2)``, new = the rest
(``vpeft.datasets.subsample_classes``, as in CoCoOp's ``subsample_classes``). The model is trained few-shot on the
base classes only (validation too uses base classes), then the same adapter classifies the full test split of each
half; ``HM = 2 * base * new / (base + new)``.

From the command line the same protocol is two ``vpeft`` runs whose result cards ``vpeft.protocols.aggregate``
pairs (``data.subsample`` ``base`` / ``new``)::

    vpeft fit  -c configs/trainer/gpu.yaml -c configs/data/caltech101.yaml -c configs/method/clip/coop.yaml \\
               -c configs/experiment/clip_prompt_vit_b16.yaml --data.subsample base --trainer.default_root_dir RUN
    vpeft test -c configs/trainer/gpu.yaml -c configs/data/caltech101.yaml --data.subsample base \\
               --ckpt_path RUN/checkpoints/last.ckpt --trainer.default_root_dir RUN/base
    vpeft test -c configs/trainer/gpu.yaml -c configs/data/caltech101.yaml --data.subsample new \\
               --ckpt_path RUN/checkpoints/last.ckpt --trainer.default_root_dir RUN/new
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any, Optional

logger = logging.getLogger(__name__)

RESULT_NAME = "base_to_new.json"


def base_to_new(
        task_kwargs: Mapping[str, Any],
        data_kwargs: Mapping[str, Any],
        trainer_kwargs: Optional[Mapping[str, Any]] = None,
        ckpt_path: Optional[str] = None,
        metric: str = "test/acc",
) -> dict[str, float]:
    """Train a :class:`~vpeft.modules.clip_tasks.ClipPromptTask` on the base classes; test it on base and new.

    Args:
        task_kwargs: ``ClipPromptTask`` arguments (``backbone``, ``methods``, ``optimizer``, ...). Class names come
            from the data modules, so do not pass ``classnames``.
        data_kwargs: ``FewShotDataModule`` arguments (``dataset``, ``root``, ``shots``, ``seed``, ...) without
            ``subsample``; ``backbone``/``backbone_kwargs`` default to the task's (as the CLI links them).
        trainer_kwargs: ``lightning.Trainer`` arguments (``max_epochs``, ``accelerator``, ``logger``, ...).
        ckpt_path: Checkpoint to test (``"best"``: the one selected on base-class validation accuracy by the
            trainer's checkpoint callback). ``None`` (default) tests the model as training left it, as the papers do
            (for PromptSRC: after Gaussian prompt aggregation).
        metric: The logged metric to report.

    Returns:
        ``{"base": ..., "new": ..., "hm": ...}`` (fractions in [0, 1]); also written to ``base_to_new.json`` in the
        trainer's log folder (else ``default_root_dir``), logged at INFO level and sent to the trainer's logger as
        ``base_to_new/{base,new,hm}``.

    Raises:
        ValueError: ``subsample`` or ``classnames`` given; a test run that did not log ``metric``.
    """
    from lightning.pytorch import Trainer

    from ..datasets.datamodule import FewShotDataModule
    from ..modules.clip_tasks import ClipPromptTask
    from .aggregate import harmonic_mean

    task_kwargs, data_kwargs = dict(task_kwargs), dict(data_kwargs)
    if "subsample" in data_kwargs:
        raise ValueError("base_to_new sets data subsample itself (base, then new); remove it from data_kwargs")
    if task_kwargs.get("classnames") is not None:
        raise ValueError("base_to_new takes the class names from the data modules; remove classnames from task_kwargs")
    data_kwargs.setdefault("backbone", task_kwargs.get("backbone"))
    data_kwargs.setdefault("backbone_kwargs", task_kwargs.get("backbone_kwargs"))

    task = ClipPromptTask(**task_kwargs)
    trainer = Trainer(**dict(trainer_kwargs or {}))
    base_dm = FewShotDataModule(**data_kwargs, subsample="base")
    trainer.fit(task, datamodule=base_dm)
    result: dict[str, float] = {}
    for half, dm in (("base", base_dm), ("new", FewShotDataModule(**data_kwargs, subsample="new"))):
        metrics = trainer.test(task, datamodule=dm, ckpt_path=ckpt_path, verbose=False)
        if not metrics or metric not in metrics[0]:
            raise ValueError(f"the {half}-class test run did not log {metric!r} (logged: "
                             f"{sorted(metrics[0]) if metrics else []})")
        result[half] = float(metrics[0][metric])
    result["hm"] = harmonic_mean(result["base"], result["new"])

    logger.info("base-to-new %s: base %.4f, new %.4f, HM %.4f", metric, result["base"], result["new"], result["hm"])
    if trainer.logger is not None:
        trainer.logger.log_metrics({f"base_to_new/{k}": v for k, v in result.items()}, step=trainer.global_step)
        trainer.logger.save()
    folder = trainer.log_dir or trainer.default_root_dir  # on every rank: log_dir is a collective under DDP
    if trainer.is_global_zero:
        from .._fileio import atomic_write

        os.makedirs(folder, exist_ok=True)
        summary = {**result, "metric": metric, "ckpt_path": ckpt_path,
                   "dataset": data_kwargs.get("dataset"), "shots": data_kwargs.get("shots"),
                   "seed": data_kwargs.get("seed"), "backbone": task_kwargs.get("backbone")}
        atomic_write(os.path.join(folder, RESULT_NAME),
                     lambda f: json.dump(summary, f, indent=2, sort_keys=True, default=str), binary=False)
    return result


__all__ = ["RESULT_NAME", "base_to_new"]
