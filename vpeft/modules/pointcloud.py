"""``PointCloudClassifier``: point-cloud classification (ModelNet40, ScanObjectNN) with PEFT on Point-MAE / Point-BERT.

Protocol of the official fine-tuning (Point-MAE, arXiv:2203.06604; Point-BERT, arXiv:2111.14819; followed by IDPT,
arXiv:2304.07221, and Point-PEFT, arXiv:2310.03059):
    * Loss: plain cross-entropy (the official ``build_loss_func`` is ``nn.CrossEntropyLoss()``, no label smoothing;
      ``label_smoothing`` stays available and defaults to 0).
    * Training augmentation: ``PointcloudScaleAndTranslate`` (see :mod:`vpeft.datasets.pointcloud`).
    * Voting evaluation: ``votes`` passes over each test batch, the first on the clouds as given and the others on
      scale-and-translate augmented copies; the logits are averaged (Point-MAE's ``test_vote`` uses 10). Voting
      accuracy is logged as ``{stage}/vote_acc`` next to the single-view ``{stage}/acc``; it runs in the stages of
      ``vote_stages`` (default: test only, as it costs ``votes`` forward passes).

Point-PEFT's memory bank. When a ``point_peft`` method is present and its bank is not built yet (``bank_size=0``),
:meth:`PointCloudClassifier.on_fit_start` fills it with :func:`vpeft.methods.point_peft.build_memory_bank` from the
training dataloader (one pass over the training set, frozen backbone, adapters disabled) before the first training
step. ``on_fit_start`` is used (not ``configure_model``) because the model is on its device there, and it runs after
a resumed checkpoint was restored, so a resumed run keeps its bank. The resolved ``bank_size`` is written into the
hyper-parameters, so checkpoints and ``vpeft test --ckpt_path`` rebuild a buffer of the right size;
:meth:`~PointCloudClassifier.on_load_checkpoint` also resizes an unbuilt bank to the checkpoint's before the state
is loaded (resuming from a config with ``bank_size: 0``).

Deviations from the reference implementations:
    * Voting: Point-MAE re-samples each vote's points by farthest-point sampling from 1,200 points and repeats the
      whole 10-vote test 300 times, keeping the best run; here one run, same points every vote, augmentation only.
    * Training clouds take the first ``num_points`` points of each file (ModelNet) or a random subset (ScanObjectNN);
      Point-MAE samples 1,200 points by FPS and keeps a random 1,024 of them.
    * Checkpoints are selected on a validation split carved from training (the official scripts select on test).
    * The scheduler in the presets is cosine annealing without the official 10 warm-up epochs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics.classification import MulticlassAccuracy

import vpeft

from ..datasets.datamodule import mix_seed
from ..datasets.pointcloud import scale_translate
from .base import PeftTask, config_hparam

STAGES = ("train", "val", "test")


class PointCloudClassifier(PeftTask):
    """Classification of ``(B, N, 3)`` clouds (``(B, N, 6)`` with normals: the xyz columns are used) with a frozen
    point transformer, PEFT methods and a trained head.

    Logs ``{stage}/loss``, ``{stage}/acc`` (single view) and, in ``vote_stages``, ``{stage}/vote_acc``.

    Args:
        backbone: ``"point_mae:base"`` or ``"point_bert:base"``.
        num_classes: Classes (the CLI links it from ``data.num_classes``).
        methods: Method configs (``idpt``, ``point_peft``, ``lora``, ...).
        trainable_extra: Extra trainable sites; default the classifier ``head``.
        pretrained: Official checkpoint path (``False``: random weights).
        backbone_kwargs: ``create_backbone`` kwargs (``num_group``, ``group_size``, ``drop_path_rate``, ...).
        adapter: See :class:`~vpeft.modules.base.PeftTask`.
        optimizer: See :class:`~vpeft.modules.base.PeftTask`.
        lr_scheduler: See :class:`~vpeft.modules.base.PeftTask`.
        lr_scheduler_interval: See :class:`~vpeft.modules.base.PeftTask`.
        init_seed: See :class:`~vpeft.modules.base.PeftTask`; also seeds the voting augmentations.
        grad_checkpointing: See :class:`~vpeft.modules.base.PeftTask`.
        label_smoothing: Cross-entropy label smoothing (official: 0).
        votes: Passes of voting evaluation (official 10; 1 = single view only).
        vote_stages: Stages (``"val"``, ``"test"``) that also log voting accuracy.
        build_memory_bank: Build an unbuilt Point-PEFT bank from the training data at the start of ``fit``.
    """

    def __init__(
            self,
            backbone: str = "point_mae:base",
            num_classes: int = 40,
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
            votes: int = 10,
            vote_stages: Sequence[str] = ("test",),
            build_memory_bank: bool = True,
    ) -> None:
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not backbone.startswith(("point_mae:", "point_bert:")):
            raise ValueError(f"PointCloudClassifier needs a point backbone ('point_mae:base', 'point_bert:base'), got "
                             f"{backbone!r}")
        if isinstance(votes, bool) or not isinstance(votes, int) or votes < 1:
            raise ValueError(f"votes must be an int >= 1, got {votes!r}")
        if isinstance(vote_stages, str):
            vote_stages = [vote_stages]
        bad = [s for s in vote_stages if s not in ("val", "test")]
        if bad:
            raise ValueError(f"vote_stages may hold 'val' and 'test', got {bad}")
        if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) or \
                not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        super().__init__(backbone, methods, trainable_extra, pretrained, backbone_kwargs, adapter, optimizer,
                         lr_scheduler, lr_scheduler_interval, init_seed, grad_checkpointing)
        self.hparams["vote_stages"] = list(vote_stages)
        self.num_classes = num_classes
        self.label_smoothing = float(label_smoothing)
        self.votes, self.vote_stages = votes, list(vote_stages)
        self.auto_memory_bank = build_memory_bank
        # ModuleDict keys may not shadow Module attributes ("train"): suffixed with "_".
        self.acc = nn.ModuleDict({f"{s}_": MulticlassAccuracy(num_classes, average="micro") for s in STAGES})
        self.vote_acc = nn.ModuleDict({f"{s}_": MulticlassAccuracy(num_classes, average="micro")
                                       for s in ("val", "test")})

    # -- template hooks --------------------------------------------------------------------------------------------
    def build_backbone(self) -> nn.Module:  # noqa: D102
        return vpeft.create_backbone(self.backbone_id, pretrained=self.pretrained,
                                     **{**self.backbone_kwargs, "num_classes": self.num_classes})

    def task_modules(self) -> dict[str, nn.Module]:
        """None: the head lives in the backbone (``trainable_extra``); metrics are not state to save."""
        return {}

    def calibration_loss(self, backbone: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the plain backbone on the xyz columns (calibrated methods: SPT, mask tuning)."""
        return F.cross_entropy(backbone(inputs[..., :3].contiguous()), targets)

    # -- forward and steps -----------------------------------------------------------------------------------------
    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """Class logits of ``(B, N, 3+)`` clouds."""
        return self._require_model()(points[..., :3].contiguous())

    def vote_logits(self, points: torch.Tensor, batch_idx: int = 0) -> torch.Tensor:
        """Mean logits of :attr:`votes` passes: the clouds as given, then scale-and-translate copies seeded from
        ``(init_seed, batch_idx, vote)`` (reproducible, independent of the global RNG)."""
        logits = self(points)
        for k in range(1, self.votes):
            g = torch.Generator().manual_seed(mix_seed(self.init_seed, batch_idx, k))
            logits = logits + self(scale_translate(points, generator=g))
        return logits / self.votes

    def _step(self, batch, batch_idx: int, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        n = len(y)
        self.acc[f"{stage}_"](logits.detach(), y)
        self.log(f"{stage}/loss", loss, on_step=stage == "train", on_epoch=True, prog_bar=True, sync_dist=True,
                 batch_size=n)
        self.log(f"{stage}/acc", self.acc[f"{stage}_"], on_step=False, on_epoch=True, prog_bar=True, batch_size=n)
        if stage in self.vote_stages and self.votes > 1:
            self.vote_acc[f"{stage}_"](self.vote_logits(x, batch_idx), y)
            self.log(f"{stage}/vote_acc", self.vote_acc[f"{stage}_"], on_step=False, on_epoch=True, batch_size=n)
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:  # noqa: D102
        return self._step(batch, batch_idx, "train")

    def validation_step(self, batch, batch_idx: int) -> None:  # noqa: D102
        self._step(batch, batch_idx, "val")

    def test_step(self, batch, batch_idx: int) -> None:  # noqa: D102
        self._step(batch, batch_idx, "test")

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        """Class probabilities (voted when ``votes > 1`` and ``"test"`` is in ``vote_stages``)."""
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        logits = self.vote_logits(x, batch_idx) if "test" in self.vote_stages else self(x)
        return logits.softmax(dim=-1)

    # -- Point-PEFT memory bank ------------------------------------------------------------------------------------
    def _unbuilt_banks(self) -> list[str]:
        from vpeft.methods.point_peft import MemoryBank

        model = self._require_model()
        banks = {k: model.shared[k] for k in getattr(model, "method_keys", []) if k in model.shared}
        return [k for k, b in banks.items() if isinstance(b, MemoryBank) and not bool(b.built)]

    def on_fit_start(self) -> None:
        """Build every unbuilt Point-PEFT memory bank from the training dataloader (see the module doc)."""
        keys = self._unbuilt_banks() if self.auto_memory_bank else []
        if not keys:
            return
        from lightning.fabric.utilities.apply_func import move_data_to_device

        from vpeft.methods.point_peft import build_memory_bank

        loader = self._calibration_loader()
        if loader is None:
            raise ValueError("Point-PEFT's memory bank needs the training data, but no training dataloader is "
                             "reachable; build it with vpeft.methods.point_peft.build_memory_bank(task.model, batches)")
        model = self._require_model()
        # The loader draws its base seed from the global RNG: keep the training RNG streams untouched.
        with torch.random.fork_rng(devices=[]):
            for key in keys:
                batches = (move_data_to_device(b[0][..., :3].contiguous(), self.device) for b in loader)
                build_memory_bank(model, batches, key=key)
                trainer = self._trainer
                if trainer is not None and trainer.world_size > 1:
                    # Each rank saw its shard (DistributedSampler pads shards to one size): every rank keeps the
                    # concatenation, so all ranks hold the same bank of the whole training set.
                    bank = model.shared[key]
                    memory = self.all_gather(bank.memory).reshape(-1, bank.memory.shape[-1])
                    bank.register_buffer("memory", memory.contiguous())
                    model.configs[model.method_keys.index(key)].bank_size = int(memory.shape[0])
        self._sync_method_hparams()

    def _sync_method_hparams(self) -> None:
        model = self._require_model()
        self.methods = list(model.configs)
        self.hparams["methods"] = [config_hparam(c) for c in self.methods]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resize unbuilt Point-PEFT banks to the checkpoint's, then the base checks (see the module doc)."""
        from vpeft.methods.point_peft import MemoryBank

        model = self._require_model()
        state = checkpoint.get("state_dict", {})
        changed = False
        for i, key in enumerate(getattr(model, "method_keys", [])):
            bank = model.shared[key] if key in model.shared else None
            if not isinstance(bank, MemoryBank):
                continue
            saved = [v for k, v in state.items() if k == f"model._shared.{key}.memory"]
            cfg = model.configs[i]
            if len(saved) == 1 and (bank.memory is None or bank.memory.shape != saved[0].shape):
                ref = next(model.base_model.blocks[0].parameters())
                bank.register_buffer("memory", torch.zeros(saved[0].shape, device=ref.device, dtype=ref.dtype))
                cfg.bank_size = int(saved[0].shape[0])
                changed = True
        if changed:
            self._sync_method_hparams()
        super().on_load_checkpoint(checkpoint)
