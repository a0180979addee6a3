"""``VpeftCLI``: LightningCLI with vpeft's forced callbacks, argument links and default CSV logger."""

from __future__ import annotations

import importlib
import json
import os
import sys
from typing import Any, Optional

import yaml
from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger

from .callbacks import AdapterCheckpoint, ResultCard

#: Config keys that do not change results, left out of the result card's config hash.
_UNHASHED = ("config", "ckpt_path", "card", "checkpoint")
_UNHASHED_TRAINER = ("logger", "default_root_dir", "enable_progress_bar", "enable_model_summary",
                     "log_every_n_steps", "callbacks", "plugins")
# Paths and the worker count do not change results either (the manifest hash pins the data itself).
_UNHASHED_DATA = ("root", "num_workers", "manifest_dir")
#: The task of configs that set no ``model.class_path``.
DEFAULT_TASK = "vpeft.modules.classification.FewShotClassifier"
#: The data module of configs that set no ``data.class_path``.
DEFAULT_DATA = "vpeft.datasets.datamodule.FewShotDataModule"


class VpeftCLI(LightningCLI):
    """``vpeft fit|validate|test``.

    Adds two always-present, configurable callbacks (``--checkpoint.*``: :class:`AdapterCheckpoint`, ``--card.*``:
    :class:`ResultCard`), links ``model.backbone``/``model.backbone_kwargs`` into the data module (transforms follow
    the backbone) and ``data.num_classes`` into the model, and logs to CSV under ``default_root_dir`` unless a logger
    is configured.

    In subclass mode (what :func:`run` uses) the task is any :class:`~vpeft.modules.base.PeftTask` chosen with
    ``model.class_path`` (e.g. ``vpeft.modules.clip_tasks.ClipPromptTask``); without one it is
    :data:`DEFAULT_TASK`, so configs that only set ``model.<arg>`` keep working. Every task must accept
    ``num_classes`` (the link target). Likewise the data module is any ``LightningDataModule`` chosen with
    ``data.class_path`` (e.g. ``vpeft.datasets.segmentation.SegmentationDataModule``), :data:`DEFAULT_DATA` without
    one; it must accept ``backbone`` and ``backbone_kwargs`` and expose ``num_classes``.
    """

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit``, ``validate``, ``test`` (no ``predict``: there is no prediction split to serve)."""
        return {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:  # noqa: D102
        parser.add_lightning_class_args(AdapterCheckpoint, "checkpoint")
        parser.add_lightning_class_args(ResultCard, "card")
        model = "model.init_args." if self.subclass_mode_model else "model."
        data = "data.init_args." if self.subclass_mode_data else "data."
        if self.subclass_mode_model:
            parser.set_defaults({"model": {"class_path": DEFAULT_TASK}})
        if self.subclass_mode_data:
            parser.set_defaults({"data": {"class_path": DEFAULT_DATA}})
        parser.link_arguments(model + "backbone", data + "backbone")
        parser.link_arguments(model + "backbone_kwargs", data + "backbone_kwargs")
        parser.link_arguments("data.num_classes", model + "num_classes", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse ``args`` (``sys.argv[1:]`` when ``None``). With ``--ckpt_path FILE`` the checkpoint's model
        hyper-parameters are appended as ``--model <json>``, so ``vpeft test --ckpt_path ...`` needs no model or method
        config (as in Lightning, they take precedence over the config files)."""
        if isinstance(args, (dict, Namespace)):
            self.config = parser.parse_object(args)
            return
        argv = list(sys.argv[1:] if args is None else args)
        path = _ckpt_path_arg(argv)
        if path is not None and os.path.isfile(path):
            import torch

            hparams = torch.load(path, weights_only=True, map_location="cpu").get("hyper_parameters", {})
            # num_classes is a link target (it comes from the data module) and may not be given as a value.
            class_path = hparams.get("_class_path")
            hparams = {k: v for k, v in hparams.items() if k not in ("_instantiator", "_class_path", "num_classes")}
            if self.subclass_mode_model and class_path:
                hparams = {"class_path": class_path, "init_args": hparams}
            if hparams:
                argv += ["--model", json.dumps(hparams)]
        if self.subclass_mode_model:
            # The first pass only finds the chosen task; --print_config (which prints and exits) waits for the second.
            self.config = parser.parse_args(_without_print_config(argv))
            self._reparse_with_chosen_task(parser, argv)
        else:
            self.config = parser.parse_args(argv)

    def _reparse_with_chosen_task(self, parser: LightningArgumentParser, argv: list[str]) -> None:
        """Parse again with the chosen task as the default ``model.class_path``.

        On a ``class_path`` change jsonargparse keeps the previous ``init_args`` the new class accepts, defaults
        included: a config choosing another task than :data:`DEFAULT_TASK` would inherit the default task's defaults
        (e.g. its ``trainable_extra=["head"]``) instead of its own.
        """
        sub = self.config.get("subcommand")
        cfg = self.config.get(sub) if sub else self.config
        for key, default in (("model", DEFAULT_TASK), ("data", DEFAULT_DATA)):
            group = cfg.get(key) if cfg is not None else None
            class_path = group.get("class_path") if isinstance(group, Namespace) else None
            if class_path is not None and _import_class(class_path) is not _import_class(default):
                self._parser(sub).set_defaults({key: {"class_path": class_path}})
        self.config = parser.parse_args(argv)

    def _parse_ckpt_path(self) -> None:
        """Done in :meth:`parse_arguments` (Lightning's version runs after required arguments were checked)."""

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:  # noqa: D102
        cfg = self._get(self.config_init, "trainer", default={})
        if cfg.get("logger") in (None, True) and "logger" not in kwargs:
            kwargs["logger"] = CSVLogger(save_dir=cfg.get("default_root_dir") or ".", name="lightning_logs")
        extra = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        if cfg.get("enable_checkpointing") is False:  # Lightning refuses a checkpoint callback then
            extra = [c for c in extra if not isinstance(c, AdapterCheckpoint)]
        trainer = self._instantiate_trainer({**cfg, **kwargs}, extra)
        for cb in trainer.callbacks:
            if isinstance(cb, ResultCard):
                cb.config = self._hashable_config()
        return trainer

    def _hashable_config(self) -> Optional[dict]:
        sub = self.subcommand
        cfg = self.config.get(sub, self.config) if sub else self.config
        data = yaml.safe_load(self._parser(sub).dump(cfg, skip_none=False, skip_link_targets=False))
        model = data.get("model")
        if isinstance(model, dict) and "class_path" in model:  # subclass mode: flat, as in non-subclass mode
            flat = {**(model.get("init_args") or {}), **(model.get("dict_kwargs") or {})}
            task = _import_class(model["class_path"])
            if task is not _import_class(DEFAULT_TASK):
                flat["class_path"] = model["class_path"]  # the default task's configs hash as before
            if getattr(task, "zero_shot", False):  # training-free tasks: how result-card tables label them
                flat["zero_shot"] = True
            data["model"] = flat
        dm = data.get("data")
        if isinstance(dm, dict) and "class_path" in dm:  # subclass-mode data: flat too
            flat = {**(dm.get("init_args") or {}), **(dm.get("dict_kwargs") or {})}
            if _import_class(dm["class_path"]) is not _import_class(DEFAULT_DATA):
                flat["class_path"] = dm["class_path"]
            data["data"] = flat
        for key in _UNHASHED:
            data.pop(key, None)
        for key in _UNHASHED_TRAINER:
            data.get("trainer", {}).pop(key, None)
        for key in _UNHASHED_DATA:
            data.get("data", {}).pop(key, None)
        return data


def run(args: Optional[list[str]] = None) -> VpeftCLI:
    """Run ``vpeft fit|validate|test`` with ``args`` (``sys.argv[1:]`` when ``None``); the task is any ``PeftTask``
    (``model.class_path``, default :data:`DEFAULT_TASK`), the data module any ``LightningDataModule``
    (``data.class_path``, default :data:`DEFAULT_DATA`)."""
    from lightning.pytorch import LightningDataModule

    from .base import PeftTask

    return VpeftCLI(PeftTask, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                    seed_everything_default=0,
                    auto_configure_optimizers=False, save_config_kwargs={"overwrite": True}, args=args)


def _import_class(path: str) -> Any:
    """The object ``module.Name`` names (``None`` when it cannot be imported)."""
    module, _, name = str(path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, None) if module else None
    except ImportError:
        return None


def _without_print_config(argv: list[str]) -> list[str]:
    """``argv`` without ``--print_config[=flags]`` (and its separate ``flags`` value)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            if a and not a.startswith("-") and set(a.split(",")) <= {"skip_null", "skip_default", "comments"}:
                continue
        if a == "--print_config":
            skip = True
            continue
        if a.startswith("--print_config="):
            continue
        out.append(a)
    return out


def _ckpt_path_arg(argv: list[str]) -> Optional[str]:
    """The value of the last ``--ckpt_path`` on a command line, if any."""
    found = None
    for i, a in enumerate(argv):
        if a == "--ckpt_path" and i + 1 < len(argv):
            found = argv[i + 1]
        elif a.startswith("--ckpt_path="):
            found = a.split("=", 1)[1]
    return found
