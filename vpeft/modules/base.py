"""``PeftTask``: the base LightningModule of vpeft's tasks (torchgeo's base-task pattern).

A task takes a backbone id, a list of method configs and injected optimizer / scheduler callables, and builds its
``PeftModel`` in :meth:`~PeftTask.configure_model`. Subclasses fill in the template hooks (:meth:`build_backbone`,
:meth:`build_task_modules`, :meth:`forward`, :meth:`training_step`, ...).

Checkpoints are adapter-only. :meth:`~PeftTask.state_dict` holds the adapter tensors and declared extras
(``PeftModel.adapter_state_dict()`` under ``model.``) plus the task's own modules (e.g. a head outside the backbone),
never the frozen backbone; :meth:`~PeftTask.load_state_dict` loads them strictly (a key or shape mismatch raises
``ValueError`` with the diff). The frozen backbone is rebuilt from its source (``backbone``, ``pretrained``,
``backbone_kwargs`` and, for random weights, ``init_seed``) and checked against per-tensor statistics stored in the
checkpoint, so a checkpoint restored onto different base weights fails loudly instead of evaluating garbage.

Training randomness is a function of counters that checkpoints restore: the global RNG is re-seeded before every
training batch from ``(init_seed, epoch, batch index, rank)`` (dropout masks), and model construction runs under
``init_seed``. Together with :class:`vpeft.datasets.datamodule.FewShotDataModule`'s seeded pipeline, a run resumed
from an epoch-boundary checkpoint ends bit-identical to an uninterrupted one on CPU.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import torch
import torch.nn as nn
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable, ReduceLROnPlateau
from torch.nn.modules.module import _IncompatibleKeys

import vpeft
from vpeft.methods._calibration import needs_calibration
from vpeft.methods.peft_model import canonical_name

from .._fileio import atomic_write
from ..datasets.datamodule import mix_seed

CKPT_KEY = "vpeft"
TASK_STATE_NAME = "task_state.safetensors"


def method_configs(methods: Optional[Sequence[Any]]) -> list[vpeft.PeftConfig]:
    """Normalise method configs: ``PeftConfig`` objects, ``{"class_path", "init_args"}`` dicts (jsonargparse / YAML)
    or ``{"method": "lora", ...}`` dicts (``PeftConfig.to_dict``).

    Raises:
        TypeError: an entry of another type, or a class path that is not a ``PeftConfig``.
        ValueError: an unknown method name or field.
    """
    out = []
    for m in methods or []:
        if isinstance(m, vpeft.PeftConfig):
            out.append(m)
        elif isinstance(m, Mapping) and "class_path" in m:
            module, _, name = str(m["class_path"]).rpartition(".")
            cls = getattr(importlib.import_module(module), name, None) if module else None
            if not (isinstance(cls, type) and issubclass(cls, vpeft.PeftConfig)):
                raise TypeError(f"method class_path {m['class_path']!r} is not a vpeft.PeftConfig subclass")
            out.append(vpeft.PeftConfig.from_dict({"method": cls.method, **dict(m.get("init_args") or {})}))
        elif isinstance(m, Mapping):
            out.append(vpeft.PeftConfig.from_dict(dict(m)))
        else:
            raise TypeError(f"a method config must be a vpeft.PeftConfig or a dict, got {type(m).__name__}")
    return out


def config_hparam(cfg: vpeft.PeftConfig) -> dict[str, Any]:
    """A config as the ``{"class_path", "init_args"}`` dict jsonargparse parses back (plain data, pickle-free)."""
    cls = type(cfg)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}",
            "init_args": {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}}


def _plain(value: Any) -> bool:
    """Whether ``value`` survives ``torch.load(weights_only=True)`` (hparams are stored in checkpoints)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


class PeftTask(LightningModule):
    """Base task: backbone + PEFT methods, adapter-only checkpoints, injected optimizer and scheduler.

    Args:
        backbone: Backbone id for ``vpeft.create_backbone`` (``"timm:vit_base_patch16_224"``,
            ``"open_clip:ViT-B-16/openai"``).
        methods: Method configs, applied in order (``[]``: only ``trainable_extra`` trains, e.g. a linear probe).
        trainable_extra: Sites or module paths that train with the adapters and are saved with them.
        pretrained: ``False`` (random weights, reproducible from ``init_seed``), ``True`` (hub download) or the path
            of a local checkpoint in the official format.
        backbone_kwargs: Extra ``create_backbone`` kwargs (``img_size``, ``drop_path_rate``, ...).
        adapter: A saved adapter directory (``save_adapter``) to start from; its method configs must equal
            ``methods`` when both are given.
        optimizer: Callable ``params -> Optimizer`` (injected by the CLI from ``class_path``/``init_args``).
        lr_scheduler: Callable ``optimizer -> scheduler``, or ``None`` for a constant rate.
        lr_scheduler_interval: ``"epoch"`` or ``"step"``: when the scheduler steps.
        init_seed: Seed for building the model (random backbone weights, adapter initialisation) and for the
            per-batch training RNG. ``None`` takes the seed ``seed_everything`` set (``PL_GLOBAL_SEED``), else 0; the
            resolved value is stored in the hyper-parameters.
        grad_checkpointing: Enable the backbone's gradient checkpointing (timm ``set_grad_checkpointing``).
    """

    def __init__(
            self,
            backbone: str,
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
    ) -> None:
        super().__init__()
        if lr_scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"lr_scheduler_interval must be 'epoch' or 'step', got {lr_scheduler_interval!r}")
        if isinstance(trainable_extra, str):
            trainable_extra = [trainable_extra]
        self.backbone_id = backbone
        self.methods = method_configs(methods)
        self.trainable_extra = list(trainable_extra)
        self.pretrained = pretrained
        self.backbone_kwargs = dict(backbone_kwargs or {})
        self.adapter = adapter
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.init_seed = int(init_seed if init_seed is not None else os.environ.get("PL_GLOBAL_SEED", 0))
        self.grad_checkpointing = grad_checkpointing
        self.model: Optional[vpeft.PeftModel] = None
        self._frozen_stats: Optional[tuple[list[str], torch.Tensor]] = None
        self.save_hyperparameters()
        # Checkpoints are read with torch.load(weights_only=True): hparams must be plain data. Method configs become
        # class_path dicts (what the CLI re-parses from a checkpoint); programmatic callables are dropped.
        self.hparams["methods"] = [config_hparam(c) for c in self.methods]
        self.hparams["init_seed"] = self.init_seed
        self.hparams["trainable_extra"] = list(self.trainable_extra)  # a tuple would not round-trip hparams.yaml
        for key in [k for k, v in self.hparams.items() if not _plain(v)]:
            del self.hparams[key]

    # -- template hooks --------------------------------------------------------------------------------------------
    def build_backbone(self) -> nn.Module:
        """The plain backbone (override to pass task-specific kwargs such as ``num_classes``)."""
        return vpeft.create_backbone(self.backbone_id, pretrained=self.pretrained, **self.backbone_kwargs)

    def peft_extras(self) -> list[str]:
        """``trainable_extra`` as passed to ``get_peft_model`` (a subclass drops the names it owns itself)."""
        return list(self.trainable_extra)

    def build_task_modules(self, model: vpeft.PeftModel) -> None:
        """Create modules the task owns outside the backbone (e.g. a head on CLIP features). Default: none."""

    # -- model construction ----------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Build backbone, adapters and task modules once, under ``init_seed`` (idempotent: Lightning calls it for
        every ``fit``/``test`` and ``load_from_checkpoint``)."""
        if self.model is not None:
            return
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.init_seed)
            backbone = self.build_backbone()
            if self.adapter is not None:
                model = vpeft.PeftModel.from_pretrained(backbone, self.adapter)
                if self.methods and [c.to_dict() for c in self.methods] != [c.to_dict() for c in model.configs]:
                    raise ValueError(f"adapter {self.adapter!r} holds methods {[c.to_dict() for c in model.configs]}, "
                                     f"but the task was configured with {[c.to_dict() for c in self.methods]}")
                self.methods = list(model.configs)
            else:
                if any(needs_calibration(c) for c in self.methods):
                    self._calibrate_methods(backbone)
                model = vpeft.get_peft_model(backbone, self.methods, trainable_extra=self.peft_extras())
            if self.grad_checkpointing:
                if not hasattr(model.base_model, "set_grad_checkpointing"):
                    raise ValueError(f"backbone {self.backbone_id!r} has no set_grad_checkpointing()")
                model.base_model.set_grad_checkpointing(True)
            self.model = model
            self.build_task_modules(model)
        if self.adapter is not None:
            self._load_task_state(self.adapter)

    # -- data-dependent placement (SPT, mask tuning) ---------------------------------------------------------------
    #: Training batches the placement criterion of calibrated methods reads (the SPT reference's
    #: ``sensitivity_batch_num`` default); a subclass or instance may change it before ``fit``.
    calibration_batches: int = 16
    #: Batches to calibrate from instead of the trainer's training dataloader (e.g. ``datamodule.train_dataloader()``
    #: when ``configure_model()`` is called outside ``Trainer.fit``).
    calibration_dataloader: Optional[Any] = None

    def calibration_loss(self, backbone: nn.Module, inputs: Any, targets: Any) -> torch.Tensor:
        """Loss of the plain backbone on one training batch, for calibration (default: cross-entropy of
        ``backbone(inputs)``, right for timm classifiers). Override for backbones whose call is not the task's
        logits (e.g. CLIP)."""
        return torch.nn.functional.cross_entropy(backbone(inputs), targets)

    def _calibration_loader(self):
        """The training dataloader, reached through the trainer. ``configure_model`` runs inside ``Trainer.fit``
        after the datamodule's ``setup("fit")`` and before the fit loop builds its own loaders, so the loader is
        requested from the datamodule (or the dataloader source passed to ``fit``) directly."""
        if self.calibration_dataloader is not None:
            return self.calibration_dataloader
        trainer = self._trainer
        if trainer is None:
            return None
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "train_dataloader"):
            return dm.train_dataloader()
        source = getattr(getattr(trainer, "fit_loop", None), "_data_source", None)
        if source is not None and source.is_defined():
            return source.dataloader()
        return None

    def _calibrate_methods(self, backbone: nn.Module) -> None:
        """Resolve the placement of configs that need data from the first ``calibration_batches`` training batches,
        and record the resolved configs in the hyper-parameters (checkpoints then rebuild without data)."""
        from lightning.fabric.utilities.apply_func import move_data_to_device

        from vpeft.methods._calibration import calibrate

        loader = self._calibration_loader()
        names = [type(c).__name__ for c in self.methods if needs_calibration(c)]
        if loader is None:
            raise ValueError(f"{names} choose their placement from training data, but no training dataloader is "
                             "reachable here (configure_model() outside Trainer.fit); run fit, set "
                             "task.calibration_dataloader, or calibrate the configs with vpeft.calibrate(...) and pass "
                             "the resolved configs")
        device = next(backbone.parameters()).device
        batches = (move_data_to_device(b, device) for b in loader)
        with torch.enable_grad():
            methods = calibrate(backbone, self.methods, batches, loss_fn=self.calibration_loss,
                                max_batches=self.calibration_batches)
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            # Each rank sees its own shard of the data; every rank must build the same adapters: rank 0's placement
            # (configs with their calibration tensors, pickled) is used everywhere.
            methods = trainer.strategy.broadcast(methods, src=0)
        self.methods = methods
        self.hparams["methods"] = [config_hparam(c) for c in self.methods]

    def _require_model(self) -> vpeft.PeftModel:
        if self.model is None:
            raise RuntimeError("the model is not built yet; call configure_model() (Lightning does this in fit/test)")
        return self.model

    def task_modules(self) -> dict[str, nn.Module]:
        """Child modules other than the backbone (their full state is saved)."""
        return {name: m for name, m in self.named_children() if name != "model"}

    # -- adapter-only state ----------------------------------------------------------------------------------------
    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):  # noqa: D417
        """Adapter tensors and extras (``model.<canonical key>``) plus task modules; never the frozen backbone."""
        if self.model is None:
            return super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        out = OrderedDict() if destination is None else destination
        for key, t in self.model.adapter_state_dict().items():
            out[f"{prefix}model.{key}"] = t
        for name, module in self.task_modules().items():
            module.state_dict(destination=out, prefix=f"{prefix}{name}.", keep_vars=keep_vars)
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Load what :meth:`state_dict` wrote. ``strict`` (the default): every key must match, else ``ValueError``."""
        model = self._require_model()
        own = self.state_dict()
        missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
        if strict and (missing or unexpected):
            raise ValueError(f"checkpoint does not match this task's adapters: missing {missing[:8]}"
                             f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                             f"{' ...' if len(unexpected) > 8 else ''}")
        adapter = {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.") and k in own}
        if strict:
            model.load_adapter_state_dict(adapter)
        else:
            current = model.adapter_state_dict()
            with torch.no_grad():
                for k, v in adapter.items():
                    if current[k].shape != v.shape:
                        raise ValueError(f"checkpoint tensor model.{k}: shape {tuple(v.shape)} vs model "
                                         f"{tuple(current[k].shape)}")
                    current[k].copy_(v)
        for name, module in self.task_modules().items():
            sub = {k[len(name) + 1:]: v for k, v in state_dict.items() if k.startswith(name + ".")}
            module.load_state_dict(sub, strict=strict)
        return _IncompatibleKeys(missing, unexpected)

    def frozen_stats(self) -> tuple[list[str], torch.Tensor]:
        """Names and float64 ``[sum, sum of |x|]`` of every frozen backbone tensor (what the checkpoint omits)."""
        if self._frozen_stats is None:
            model = self._require_model()
            saved = set(model.adapter_state_dict())
            names, stats = [], []
            with torch.no_grad():
                for k, t in model.base_model.state_dict().items():
                    name = canonical_name(k)
                    if name in saved or not torch.is_floating_point(t) or t.is_meta:
                        continue
                    t64 = t.detach().double()
                    names.append(name)
                    stats.append(torch.stack([t64.sum(), t64.abs().sum()]).cpu())
            self._frozen_stats = (names, torch.stack(stats) if stats else torch.zeros(0, 2, dtype=torch.float64))
        return self._frozen_stats

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record how to rebuild the frozen backbone and how to check it (plain data, ``weights_only``-safe)."""
        model = self._require_model()
        names, stats = self.frozen_stats()
        checkpoint[CKPT_KEY] = {
            "format_version": 1,
            "vpeft_version": vpeft.__version__,
            "backbone": self.backbone_id,
            "pretrained": self.pretrained if isinstance(self.pretrained, bool) else os.fspath(self.pretrained),
            "fingerprint": model.fingerprint,
            "methods": [c.to_dict() for c in model.configs],
            "trainable_extra": list(model.trainable_extra),
            "init_seed": self.init_seed,
            "frozen_names": names,
            "frozen_stats": stats,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the rebuilt backbone against the checkpoint before its adapters are loaded.

        Raises:
            ValueError: another architecture (fingerprint), other method configs, or other frozen weights (e.g. a
                different ``pretrained`` file, or a random backbone built with another ``init_seed``).
        """
        meta = checkpoint.get(CKPT_KEY)
        if meta is None:
            raise ValueError("this checkpoint was not written by a vpeft task (no 'vpeft' entry); load plain "
                             "Lightning checkpoints with the task that wrote them")
        model = self._require_model()
        if meta["fingerprint"] != model.fingerprint:
            raise ValueError(f"checkpoint was trained on backbone {meta['backbone']!r} with another architecture "
                             f"(fingerprint differs) than this task's {self.backbone_id!r} {self.backbone_kwargs}")
        ours = [c.to_dict() for c in model.configs]
        if meta["methods"] != ours:
            raise ValueError(f"checkpoint methods {meta['methods']} differ from this task's {ours}")
        names, stats = self.frozen_stats()
        if list(meta["frozen_names"]) != names:
            raise ValueError("checkpoint's frozen backbone tensors differ by name from this task's backbone")
        ref = meta["frozen_stats"].to(torch.float64)
        scale = ref.abs() + stats.abs() + 1e-6
        bad = ((ref - stats).abs() > 1e-5 * scale).any(dim=1).nonzero().flatten().tolist()
        if bad:
            raise ValueError(
                f"the frozen backbone differs from the one this checkpoint was trained on ({len(bad)} of {len(names)} "
                f"tensors, e.g. {[names[i] for i in bad[:4]]}); checkpoints hold adapters only, so the backbone "
                f"must be rebuilt identically: checkpoint pretrained={meta['pretrained']!r}, "
                f"init_seed={meta['init_seed']}; this task pretrained={self.pretrained!r}, init_seed={self.init_seed}")

    # -- adapter directories ---------------------------------------------------------------------------------------
    def save_adapter(self, directory: str) -> None:
        """``PeftModel.save_adapter`` plus ``task_state.safetensors`` when the task owns modules with state."""
        from safetensors.torch import save

        model = self._require_model()
        model.save_adapter(directory)
        state = OrderedDict()
        for name, module in self.task_modules().items():
            for k, t in module.state_dict().items():
                state[f"{name}.{k}"] = t.detach().cpu().contiguous().clone()
        path = os.path.join(directory, TASK_STATE_NAME)
        if state:
            meta = {"task": type(self).__name__, "hparams": json.dumps(dict(self.hparams), default=str)}
            atomic_write(path, lambda f: f.write(save(dict(state), metadata=meta)))
        elif os.path.exists(path):
            os.remove(path)

    def _load_task_state(self, directory: str) -> None:
        path = os.path.join(directory, TASK_STATE_NAME)
        mods = self.task_modules()
        expected = {f"{n}.{k}" for n, m in mods.items() for k in m.state_dict()}
        if not expected:
            return
        if not os.path.isfile(path):
            raise ValueError(f"adapter directory {directory!r} lacks {TASK_STATE_NAME} with this task's "
                             f"{sorted(expected)[:4]}")
        from safetensors.torch import load_file

        state = load_file(path)
        if set(state) != expected:
            raise ValueError(f"{path}: keys {sorted(state)[:6]} do not match the task's {sorted(expected)[:6]}")
        for name, module in mods.items():
            module.load_state_dict({k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")})

    # -- optimisation ----------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        """The injected optimizer over trainable parameters (adapters, extras, task modules) and its scheduler."""
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("nothing to train: no method configs and no trainable_extra")
        optimizer = self.optimizer(params)
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        from .schedulers import WarmupPolyLR

        if isinstance(scheduler, WarmupPolyLR) and scheduler.total_iters is None:
            if self._trainer is None:
                raise ValueError("WarmupPolyLR(total_iters=None) takes the run's length from the trainer; pass "
                                 "total_iters when building the optimizer outside Trainer.fit")
            scheduler.total_iters = int(self.trainer.estimated_stepping_batches)
        cfg = {"scheduler": scheduler, "interval": self.lr_scheduler_interval}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            cfg["monitor"] = scheduler.monitor if isinstance(scheduler, ReduceLROnPlateau) else "val/loss"
        return {"optimizer": optimizer, "lr_scheduler": cfg}

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Seed the global RNG (dropout, drop-path) from counters a checkpoint restores (see the module doc)."""
        torch.manual_seed(mix_seed(self.init_seed, self.current_epoch, batch_idx, self.global_rank))

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Parameters of the model and the task modules (each shared tensor once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
