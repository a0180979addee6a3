"""Atomic checkpoint writes and ``AdapterCheckpoint``'s folder and ``last.ckpt`` refresh."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("lightning")

import torch  # noqa: E402
from _train_helpers import BACKBONE, TINY  # noqa: E402
from lightning.pytorch import Trainer  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import vpeft  # noqa: E402
from vpeft.modules import AdapterCheckpoint, AtomicCheckpointIO, FewShotClassifier  # noqa: E402
from vpeft.modules import callbacks as cb_module  # noqa: E402


def test_interrupted_write_leaves_the_previous_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())

    def dies_halfway(obj, f):
        f.write(b"PK\x03\x04 truncated")
        raise KeyboardInterrupt  # what a kill during torch.save looks like to the writer

    monkeypatch.setattr(cb_module.torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert os.listdir(tmp_path) == ["last.ckpt"]  # no temporary file left behind


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_last_checkpoint_refreshes_every_epoch_and_writes_atomically(tmp_path):
    task = FewShotClassifier(BACKBONE, 3, methods=[vpeft.SSFConfig()], backbone_kwargs=TINY, init_seed=0)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 3, (8,), generator=g))
    # mode="max" on a falling loss: only epoch 0 is "best", so Lightning alone would leave last.ckpt at epoch 0.
    ckpt = AdapterCheckpoint(monitor="val/loss", mode="max")
    trainer = Trainer(max_epochs=3, callbacks=[ckpt], logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0)
    trainer.fit(task, DataLoader(data, batch_size=4), DataLoader(data, batch_size=8))
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert ckpt.dirpath == str(tmp_path / "checkpoints")
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 2 and last["global_step"] == 6
    assert torch.load(ckpt.best_model_path, weights_only=True)["epoch"] == 0
