"""``TrainingFreeClassifier``: Tip-Adapter, Tip-Adapter-F and GDA on frozen CLIP features, run by Lightning.

``vpeft fit`` runs ``trainer.max_epochs`` passes over the few-shot training split collecting image features (each pass
draws new augmentations: Tip-Adapter and GDA build their statistics from 10 augmented passes), then, at the last
epoch's validation, fits the head in closed form (Tip-Adapter-F: trains its cache keys) and searches its
hyper-parameters on the few-shot **validation** split. ``vpeft test`` evaluates the fitted head; the test split is
never seen before. The zero-shot classifier the heads ensemble with is built from the dataset's class names with
CoOp's hand-crafted template (or the templates given).

Checkpoints hold the fitted head (its buffers) and nothing of the frozen backbone; loading one rebuilds the head from
the stored tensor shapes.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

import vpeft
from vpeft.clip import tokenizer_for
from vpeft.datasets.templates import resolve_templates
from vpeft.heads import GDA, TipAdapter, TipAdapterF

from .base import PeftTask

HEADS = {"tip_adapter": TipAdapter, "tip_adapter_f": TipAdapterF, "gda": GDA}


class TrainingFreeClassifier(PeftTask):
    """A training-free head (Tip-Adapter, Tip-Adapter-F, GDA) on a frozen open_clip model.

    Args:
        backbone: open_clip backbone id (``"open_clip:ViT-B-16/openai"``).
        num_classes: Number of classes (linked from the data module by the CLI); when given it must equal the number
            of class names the zero-shot classifier is built from.
        head: ``"tip_adapter"``, ``"tip_adapter_f"`` or ``"gda"``.
        templates: ``"dataset"`` (CoOp's hand-crafted template of the data module's dataset), ``"imagenet80"``
            (CLIP's 80 templates), ``"imagenet7"`` or format strings (``vpeft.datasets.templates.resolve_templates``).
        grid: Hyper-parameter grid for the validation search (``None``: the head's paper default).
        head_kwargs: Extra arguments of the head's ``search`` (e.g. ``{"epochs": 20}`` for Tip-Adapter-F).
        pretrained: See :class:`~vpeft.modules.base.PeftTask`.
        backbone_kwargs: See :class:`~vpeft.modules.base.PeftTask`.
        adapter: Adapter directory of a CLIP that was adapted before (its features are then used).
        init_seed: See :class:`~vpeft.modules.base.PeftTask`.
    """

    def __init__(
            self,
            backbone: str,
            num_classes: Optional[int] = None,
            head: str = "gda",
            templates: Union[str, list[str]] = "dataset",
            grid: Optional[dict[str, list[float]]] = None,
            head_kwargs: Optional[dict[str, Any]] = None,
            pretrained: Union[bool, str] = False,
            backbone_kwargs: Optional[dict[str, Any]] = None,
            adapter: Optional[str] = None,
            init_seed: Optional[int] = None,
    ) -> None:
        if head not in HEADS:
            raise ValueError(f"head must be one of {sorted(HEADS)}, got {head!r}")
        if not backbone.startswith("open_clip:"):
            raise ValueError(f"training-free heads need an open_clip backbone ('open_clip:<arch>[/<tag>]'), got "
                             f"{backbone!r}")
        resolve_templates(templates)  # validate early
        super().__init__(backbone, [], (), pretrained, backbone_kwargs, adapter, init_seed=init_seed)
        self.automatic_optimization = False
        # PeftTask records these; this task takes neither (`vpeft test --ckpt_path` re-parses the hyper-parameters).
        for key in ("methods", "trainable_extra"):
            self.hparams.pop(key, None)
        self.num_classes = num_classes
        self.head_name, self.templates, self.grid = head, templates, grid
        self.head_kwargs = dict(head_kwargs or {})
        self.head: Optional[nn.Module] = None
        self._train: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.search_result: Optional[dict] = None

    # -- features --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features of the frozen (or adapted) CLIP."""
        return F.normalize(self._require_model().encode_image(images), dim=-1)

    def zero_shot_weights(self) -> torch.Tensor:
        """``(D, C)`` zero-shot classifier over the data module's classes."""
        dm = self.trainer.datamodule
        names = list(dm.classnames)
        if self.num_classes is not None and self.num_classes != len(names):
            raise ValueError(f"num_classes={self.num_classes} but the data module has {len(names)} class names")
        tokenizer = tokenizer_for(self.backbone_id, self._require_model())
        return vpeft.build_zero_shot_classifier(self._require_model(), tokenizer, names,
                                                resolve_templates(self.templates, getattr(dm, "dataset", None)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits of the fitted head."""
        if self.head is None:
            raise ValueError("no fitted head: run `fit` first, or load a checkpoint of a fitted run")
        f = self.features(images)
        return self.head(f.to(self.head.zs_weights.device))

    # -- Lightning hooks -------------------------------------------------------------------------------------------
    def configure_optimizers(self):  # noqa: D102
        return None  # closed-form heads (Tip-Adapter-F trains its keys inside its own fit)

    def on_train_epoch_start(self) -> None:  # noqa: D102
        if not self.trainer.max_epochs or self.trainer.max_epochs < 1:
            raise ValueError("set trainer.max_epochs >= 1: the number of (augmented) passes over the training split")

    def training_step(self, batch, batch_idx: int) -> None:  # noqa: D102
        x, y = batch
        self._train.append((self.features(x).cpu(), y.cpu()))

    def validation_step(self, batch, batch_idx: int) -> None:  # noqa: D102
        x, y = batch
        feats = self.features(x)
        self._val.append((feats.cpu(), y.cpu()))

    def on_validation_epoch_end(self) -> None:  # noqa: D102
        val = self._val
        self._val = []
        if not val:
            return
        vf, vy = (torch.cat(t) for t in zip(*val))
        last = self.current_epoch >= self.trainer.max_epochs - 1
        if self.head is None and self._train and last and not self.trainer.sanity_checking:
            tf, ty = (torch.cat(t) for t in zip(*self._train))
            zs = self.zero_shot_weights().cpu()
            self.head = HEADS[self.head_name].search(tf, ty, zs, vf, vy, grid=self.grid, **self.head_kwargs)
            self.search_result = {k: v for k, v in self.head.search_result.items() if k != "table"}
            self._train = []
        if self.head is not None:
            logits = self.head(vf)
        else:  # before the head exists (sanity check, early epochs): the zero-shot classifier
            logits = 100.0 * vf @ self.zero_shot_weights().cpu()
        acc = (logits.argmax(dim=-1) == vy).float().mean()
        self.log("val/acc", acc, prog_bar=True)

    def test_step(self, batch, batch_idx: int) -> None:  # noqa: D102
        x, y = batch
        logits = self(x)
        if not hasattr(self, "test_acc"):
            self.test_acc = MulticlassAccuracy(logits.shape[1], average="micro")
        self.test_acc.update(logits.cpu(), y.cpu())
        self.log("test/acc", self.test_acc, on_epoch=True, batch_size=len(y))

    def task_modules(self) -> dict[str, nn.Module]:  # noqa: D102
        return {"head": self.head} if self.head is not None else {}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Rebuild the head from the checkpoint's tensors, then load it."""
        head = {k[len("head."):]: v for k, v in state_dict.items() if k.startswith("head.")}
        if head:
            cls = HEADS[self.head_name]
            if cls is GDA:
                self.head = GDA(head["gda_weight"], head["gda_bias"], head["zs_weights"])
            else:
                self.head = cls(head["cache_keys"], head["cache_values"], head["zs_weights"])
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def num_parameters(self, trainable_only: bool = False) -> int:  # noqa: D102
        n = super().num_parameters(trainable_only)
        if self.head is not None and not trainable_only:
            n += sum(b.numel() for b in self.head.buffers())
        return n

