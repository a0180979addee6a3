"""``FewShotClassifier``: image classification with PEFT methods on a timm ViT or a CLIP image tower."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics.classification import MulticlassAccuracy

import vpeft

from .base import PeftTask


class FewShotClassifier(PeftTask):
    """Classification with a frozen backbone, PEFT adapters and a new linear head.

    timm backbones get their own classifier resized to ``num_classes`` (site ``head``, trained through
    ``trainable_extra``). open_clip backbones are classified from L2-normalised ``encode_image`` features by a linear
    head the task owns (saved in checkpoints and in ``task_state.safetensors`` next to the adapter).

    Logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc`` (micro accuracy, i.e.
    the fraction of correct images). Validation drives checkpoint selection; test metrics exist only under
    ``trainer.test``.

    Args:
        backbone: Backbone id (see :class:`~vpeft.modules.base.PeftTask`).
        num_classes: Number of classes (the CLI links it from ``data.num_classes``).
        methods: Method configs.
        trainable_extra: Extra trainable sites; ``"head"`` is the classifier (for CLIP: the task's own head).
        pretrained: See :class:`~vpeft.modules.base.PeftTask`.
        backbone_kwargs: See :class:`~vpeft.modules.base.PeftTask`.
        adapter: See :class:`~vpeft.modules.base.PeftTask`.
        optimizer: See :class:`~vpeft.modules.base.PeftTask`.
        lr_scheduler: See :class:`~vpeft.modules.base.PeftTask`.
        lr_scheduler_interval: See :class:`~vpeft.modules.base.PeftTask`.
        init_seed: See :class:`~vpeft.modules.base.PeftTask`.
        grad_checkpointing: See :class:`~vpeft.modules.base.PeftTask`.
        label_smoothing: Cross-entropy label smoothing.
    """

    def __init__(
            self,
            backbone: str,
            num_classes: int,
            methods: Optional[list[vpeft.PeftConfig]] = None,
            trainable_extra: Sequence[str] = ("head",),
            pretrained: Union[bool, str] = False,
            backbone_kwargs: Optional[dict[str, Any]] = None,
            adapter: Optional[str] = None,
            optimizer: OptimizerCallable = torch.optim.AdamW,
            lr_scheduler: Optional[LRSchedulerCallable] = None,
            lr_scheduler_interval: str = "epoch",
            init_seed: Optional[int] = None,
            grad_checkpointing: bool = False,
            label_smoothing: float = 0.0,
    ) -> None:
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        super().__init__(backbone, methods, trainable_extra, pretrained, backbone_kwargs, adapter, optimizer,
                         lr_scheduler, lr_scheduler_interval, init_seed, grad_checkpointing)
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.is_clip = backbone.startswith("open_clip:")
        self.head: Optional[nn.Module] = None
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    # -- template hooks --------------------------------------------------------------------------------------------
    def build_backbone(self) -> nn.Module:  # noqa: D102
        kw = dict(self.backbone_kwargs)
        if not self.is_clip:
            kw["num_classes"] = self.num_classes
        return vpeft.create_backbone(self.backbone_id, pretrained=self.pretrained, **kw)

    def peft_extras(self) -> list[str]:  # noqa: D102
        # On CLIP "head" names the task's own classifier, which always trains; it is not a backbone site.
        return [e for e in self.trainable_extra if not (self.is_clip and e == "head")]

    def build_task_modules(self, model: vpeft.PeftModel) -> None:  # noqa: D102
        if self.is_clip:
            self.head = nn.Linear(model.base_model.visual.output_dim, self.num_classes)

    # -- forward and steps -----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits for a batch of images."""
        model = self._require_model()
        if self.is_clip:
            return self.head(F.normalize(model.encode_image(x), dim=-1))
        return model(x)

    def _step(self, batch, metric: MulticlassAccuracy, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        metric(logits.detach(), y)
        on_step = stage == "train"
        # sync_dist averages the epoch loss over DDP ranks; torchmetrics syncs the accuracy itself.
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=True,
                 batch_size=len(y))
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:  # noqa: D102
        return self._step(batch, self.train_acc, "train")

    def validation_step(self, batch, batch_idx: int) -> None:  # noqa: D102
        self._step(batch, self.val_acc, "val")

    def test_step(self, batch, batch_idx: int) -> None:  # noqa: D102
        self._step(batch, self.test_acc, "test")

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        """Class probabilities."""
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x).softmax(dim=-1)
