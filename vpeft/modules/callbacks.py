"""Callbacks and plugins of vpeft's training runs: atomic checkpoint writes, adapter checkpoints in a stable folder
(so ``--ckpt_path last`` finds them after a restart) and the JSON result card."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
import time
from typing import Any, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

import vpeft
from vpeft._fileio import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes to a temporary file in the target folder, fsyncs it, then ``os.replace``\\ s it
    over the target (and fsyncs the folder).

    A process killed at any moment leaves either the previous complete file or the new complete file under the
    target name, never a truncated one. (Lightning's own writer goes through an fsspec transaction whose temporary
    file lives in the system temp folder: the final move can be a non-atomic copy across file systems, unsynced.)
    Remote URLs fall back to Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically."""
        path = os.fspath(path)
        if "://" in path:
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        atomic_write(path, lambda f: torch.save(checkpoint, f))
        return None


class AdapterCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` with vpeft's defaults: adapter-only files (the task's ``state_dict``), written atomically,
    at epoch ends, into ``<trainer.default_root_dir>/checkpoints`` (not the logger's versioned folder, so a restarted
    run finds ``last.ckpt`` with ``--ckpt_path last``), keeping ``last.ckpt`` and the best by validation accuracy.

    Exact resumption needs epoch-boundary checkpoints: the data pipeline is reproducible per epoch (see
    ``FewShotDataModule``), not per batch, so keep ``every_n_train_steps`` at 0 when exact resumption matters.

    Args:
        dirpath: Folder; default ``<default_root_dir>/checkpoints``.
        filename: Name pattern of the best checkpoint.
        monitor: Metric to select on (a validation metric; ``None`` keeps only ``last.ckpt`` semantics).
        mode: ``"max"`` or ``"min"``.
        save_last: Also write ``last.ckpt``.
        save_top_k: Best checkpoints to keep.
        every_n_epochs: Epochs between checkpoints.
        every_n_train_steps: Steps between checkpoints (0: off; mid-epoch checkpoints do not resume exactly).
        atomic: Install :class:`AtomicCheckpointIO` when the strategy uses Lightning's default writer.
        **kwargs: Other ``ModelCheckpoint`` arguments.
    """

    def __init__(self, dirpath: Optional[str] = None, filename: str = "best-{epoch:03d}",
                 monitor: Optional[str] = "val/acc", mode: str = "max", save_last: bool = True,
                 save_top_k: int = 1, every_n_epochs: int = 1, every_n_train_steps: int = 0,
                 atomic: bool = True, **kwargs: Any) -> None:
        super().__init__(dirpath=dirpath, filename=filename, monitor=monitor, mode=mode, save_last=save_last,
                         save_top_k=save_top_k, every_n_epochs=every_n_epochs,
                         every_n_train_steps=every_n_train_steps or None, auto_insert_metric_name=False, **kwargs)
        self.atomic = atomic

    def _resolve_dirpath(self, trainer: Trainer) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.abspath(os.path.join(trainer.default_root_dir, "checkpoints"))

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:  # noqa: D102
        self._resolve_dirpath(trainer)
        if self.atomic and type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        super().setup(trainer, pl_module, stage)

    # Lightning (2.5+) refreshes last.ckpt only when a top-k checkpoint was saved in the same step: with a monitor,
    # an epoch that does not improve leaves a stale last.ckpt, and a resumed run would repeat epochs. Resumption
    # needs last.ckpt at every checkpoint opportunity, so save it whenever the parent did not.
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:  # noqa: D102
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:  # noqa: D102
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def _refresh_last(self, trainer: Trainer) -> None:
        due = self._every_n_epochs >= 1 and (trainer.current_epoch + 1) % self._every_n_epochs == 0
        if self.save_last and due and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _find_last_checkpoints(self, trainer: Trainer) -> set[str]:
        # Lightning resolves ckpt_path="last" before setup(); the folder must be known by then.
        self._resolve_dirpath(trainer)
        return super()._find_last_checkpoints(trainer)


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def config_hash(config: Any) -> str:
    """SHA-256 of a canonical JSON of ``config``."""
    return hashlib.sha256(_canonical(config)).hexdigest()


def git_state(paths: tuple[str, ...] = ()) -> dict[str, Any]:
    """``{"commit", "dirty"}`` of the first git checkout among ``paths`` (vpeft's source, then the working
    directory); ``None`` values when git or a checkout is not available."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(vpeft.__file__)))
    for path in (*paths, here, os.getcwd()):
        try:
            commit = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True,
                                    timeout=10)
            if commit.returncode != 0:
                continue
            status = subprocess.run(["git", "-C", path, "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10)
            return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip()), "path": path}
        except (OSError, subprocess.SubprocessError):
            break
    return {"commit": None, "dirty": None, "path": None}


def _to_number(v: Any) -> Any:
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    return v if isinstance(v, (int, float)) else str(v)


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return len(batch)
    if isinstance(batch, (list, tuple)) and batch:
        return _batch_size(batch[0])
    if isinstance(batch, dict) and batch:
        return _batch_size(next(iter(batch.values())))
    return 0


class ResultCard(Callback):
    """Writes ``result_card_<stage>.json`` at the end of each ``fit``/``validate``/``test`` (global rank 0).

    The card holds: ``config_hash`` (of the CLI config without the keys that cannot change results, such as paths,
    logging and worker counts, when the CLI set :attr:`config`; else of the task's and data module's
    hyper-parameters plus the trainer settings that change results), ``config``, git commit and dirty
    flag, seeds, the few-shot manifest hash and path, metrics, trainable/total parameters, peak memory (CUDA
    ``max_memory_allocated`` and the process's max RSS), throughput (images per second of training and evaluation
    step time, and per wall-clock second), checkpoint paths, the exported adapter and the resumed-from path.

    Args:
        dirpath: Output folder; default the logger's ``log_dir`` (else ``default_root_dir``).
        export_adapter: After ``fit``, save the final adapter to ``<dirpath>/adapter`` (``task.save_adapter``).
    """

    def __init__(self, dirpath: Optional[str] = None, export_adapter: bool = True) -> None:
        self.dirpath = dirpath
        self.export_adapter = export_adapter
        #: The run's full configuration, set by the CLI (plain data).
        self.config: Optional[dict[str, Any]] = None
        self._reset()

    def _reset(self) -> None:
        self._t0 = time.perf_counter()
        self._timer: Optional[float] = None
        self._counts = {"train": [0, 0.0], "eval": [0, 0.0]}

    # -- measurements ----------------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:  # noqa: D102
        self._reset()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def _start(self) -> None:
        self._timer = time.perf_counter()

    def _stop(self, trainer: Trainer, kind: str, batch: Any) -> None:
        if self._timer is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        c = self._counts[kind]
        c[0] += _batch_size(batch) * trainer.world_size
        c[1] += time.perf_counter() - self._timer
        self._timer = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: D102
        self._start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: D102
        self._stop(trainer, "train", batch)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: D102
        self._start()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,  # noqa: D102
                                dataloader_idx=0) -> None:
        self._stop(trainer, "eval", batch)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: D102
        self._start()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: D102
        self._stop(trainer, "eval", batch)

    # -- writing ---------------------------------------------------------------------------------------------------
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:  # noqa: D102
        folder = self._dir(trainer)  # on every rank: trainer.log_dir is a collective under DDP
        adapter_dir = None
        if self.export_adapter and hasattr(pl_module, "save_adapter"):
            adapter_dir = os.path.join(folder, "adapter")
            if trainer.is_global_zero:
                pl_module.save_adapter(adapter_dir)
                rank_zero_info(f"vpeft: final adapter saved to {adapter_dir}")
        self.write(trainer, pl_module, "fit", folder, adapter_dir=adapter_dir)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:  # noqa: D102
        if trainer.state.fn == "validate":
            self.write(trainer, pl_module, "validate", self._dir(trainer))

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:  # noqa: D102
        self.write(trainer, pl_module, "test", self._dir(trainer))

    def _dir(self, trainer: Trainer) -> str:
        return os.path.abspath(self.dirpath or trainer.log_dir or trainer.default_root_dir)

    def card(self, trainer: Trainer, pl_module: LightningModule, stage: str, **extra: Any) -> dict[str, Any]:
        """The card as a dict (what :meth:`write` saves)."""
        dm = trainer.datamodule
        hparams = {"model": dict(pl_module.hparams), "data": dict(dm.hparams) if dm is not None else None,
                   "trainer": {"max_epochs": trainer.max_epochs, "max_steps": trainer.max_steps,
                               "accumulate_grad_batches": trainer.accumulate_grad_batches,
                               "precision": str(trainer.precision), "world_size": trainer.world_size,
                               "gradient_clip_val": trainer.gradient_clip_val}}
        config = self.config if self.config is not None else hparams
        metrics = {k: _to_number(v) for k, v in sorted(trainer.callback_metrics.items())}
        ckpt = trainer.checkpoint_callback
        train_n, train_t = self._counts["train"]
        eval_n, eval_t = self._counts["eval"]
        wall = time.perf_counter() - self._t0
        peak = {"cpu_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        if torch.cuda.is_available():
            peak["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        model = getattr(pl_module, "model", None)
        return {
            "stage": stage,
            "vpeft_version": vpeft.__version__,
            "config_hash": config_hash(config),
            "config": config,
            "git": git_state(),
            "seed": {"global": os.environ.get("PL_GLOBAL_SEED"), "init_seed": getattr(pl_module, "init_seed", None),
                     "data_seed": getattr(dm, "seed", None)},
            "manifest": {"hash": getattr(dm, "manifest_hash", None), "path": getattr(dm, "manifest_path", None)},
            "backbone": getattr(pl_module, "backbone_id", None),
            "methods": [c.to_dict() for c in model.configs] if model is not None else None,
            "metrics": metrics,
            "params": {"trainable": pl_module.num_parameters(True) if hasattr(pl_module, "num_parameters") else None,
                       "total": pl_module.num_parameters() if hasattr(pl_module, "num_parameters") else None},
            "peak_memory": peak,
            "throughput": {
                "train_images": train_n, "train_images_per_s": train_n / train_t if train_t else None,
                "eval_images": eval_n, "eval_images_per_s": eval_n / eval_t if eval_t else None,
                "images_per_wall_s": (train_n + eval_n) / wall if wall else None, "wall_s": wall,
            },
            "epochs": trainer.current_epoch, "global_step": trainer.global_step,
            "world_size": trainer.world_size, "device": str(pl_module.device), "precision": str(trainer.precision),
            "checkpoints": {"dir": getattr(ckpt, "dirpath", None), "last": getattr(ckpt, "last_model_path", None),
                            "best": getattr(ckpt, "best_model_path", None),
                            "best_score": _to_number(getattr(ckpt, "best_model_score", None))},
            "ckpt_path": trainer.ckpt_path,
            **extra,
        }

    @rank_zero_only
    def write(self, trainer: Trainer, pl_module: LightningModule, stage: str, folder: str, **extra: Any) -> str:
        """Write the card atomically into ``folder``; return its path."""
        card = self.card(trainer, pl_module, stage, **extra)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"result_card_{stage}.json")
        atomic_write(path, lambda f: json.dump(card, f, indent=2, sort_keys=True, default=str), binary=False)
        self.last_path = path
        rank_zero_info(f"vpeft: result card written to {path}")
        return path
