"""The Lightning-free machinery every vpeft data module shares: seeded per-sample augmentation, the epoch-seeded
(DDP-shardable) sampler, the split loaders and the split manifest record.

Kept out of :mod:`vpeft.datasets.datamodule` (which needs Lightning) so the segmentation and point-cloud readers
import without Lightning; see that module's doc for the determinism contract.
"""

from __future__ import annotations

import hashlib
import os
import random
from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


# -- deterministic sampling ------------------------------------------------------------------------------------------
def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python versions, unlike ``hash``)."""
    h = hashlib.blake2b(repr(tuple(int(v) for v in values)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


class SeededAugmentDataset(Dataset):
    """Serves ``base[index]`` for key ``epoch * len(base) + index`` under RNGs seeded from ``(seed, epoch, index)``.

    Python's ``random`` (timm's crops) and torch's CPU generator (torchvision's flips) are seeded per sample and
    restored afterwards, so the caller's RNG streams are untouched and a sample's augmentation does not depend on
    which worker or rank loads it, or on what was loaded before.
    """

    def __init__(self, base: Dataset, seed: int) -> None:
        self.base = base
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: int):
        epoch, index = divmod(int(key), len(self.base))
        s = mix_seed(self.seed, epoch, index)
        py_state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s)
                random.seed(s)
                return self.base[index]
        finally:
            random.setstate(py_state)


class EpochSeededSampler(DistributedSampler):
    """``DistributedSampler`` (shuffle with ``seed + epoch``, rank ``r`` takes ``indices[r::N]``) whose indices carry
    their epoch (``epoch * len(dataset) + index``) for :class:`SeededAugmentDataset`.

    It is a ``DistributedSampler``, so Lightning leaves it in place under DDP and calls ``set_epoch`` each epoch;
    with one replica it gives the same permutation, which is what makes DDP and single-process runs comparable.
    """

    def __iter__(self):
        n = len(self.dataset)
        return iter([self.epoch * n + int(i) for i in super().__iter__()])


class SplitLoaders:
    """The train / validation / test loaders every vpeft data module shares (a mixin before ``LightningDataModule``).

    The host sets ``train_set``, ``val_set`` and ``test_set`` in ``setup`` and has ``seed``, ``batch_size``,
    ``eval_batch_size`` and ``num_workers``; :attr:`collate_fn` batches samples (``None``: torch's default). Training
    batches are shuffled by :class:`EpochSeededSampler` (sharded over the trainer's ranks) and augmented per sample by
    :class:`SeededAugmentDataset`; evaluation batches keep the split's order. Each loader runs the matching ``setup``
    stage first when it has not run.
    """

    collate_fn: Optional[Callable] = None

    def train_dataloader(self) -> DataLoader:
        """Shuffled by :class:`EpochSeededSampler`, augmented by :class:`SeededAugmentDataset`."""
        if self.train_set is None:
            self.setup("fit")
        return seeded_train_loader(self.train_set, self.seed, self.batch_size, self.num_workers, self._world(),
                                   collate_fn=self.collate_fn)

    def _world(self) -> tuple[int, int]:
        """``(replicas, rank)`` the training sampler shards over (the trainer's)."""
        return trainer_world(self.trainer)

    def _eval_loader(self, data) -> DataLoader:
        return DataLoader(data, batch_size=self.eval_batch_size, shuffle=False, num_workers=self.num_workers,
                          collate_fn=self.collate_fn)

    def val_dataloader(self) -> DataLoader:
        """The validation split, in order."""
        if self.val_set is None:
            self.setup("validate")
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        """The test split, in order: the only way to it (Lightning calls this from ``trainer.test`` alone)."""
        if self.test_set is None:
            self.setup("test")
        return self._eval_loader(self.test_set)


# -- shared by every vpeft data module (few-shot images, segmentation, point clouds) --------------------------------


def record_manifest(manifest: dict, manifest_hash: str, manifest_dir: Optional[str], trainer, name: str,
                    what: str) -> Optional[str]:
    """Write ``manifest`` as ``<folder>/<name>`` on rank 0, or check it against the one already there.

    The folder is ``manifest_dir``, else ``<trainer.default_root_dir>/manifests``; with neither nothing is written.
    Returns the manifest's path (``None`` when nothing is recorded).

    Raises:
        ValueError: a manifest at that path records another subset (the data on disk changed).
    """
    from . import read_manifest, write_manifest

    folder = manifest_dir or (os.path.join(trainer.default_root_dir, "manifests") if trainer else None)
    if folder is None:
        return None
    path = os.path.abspath(os.path.join(folder, name))
    if trainer is not None and not trainer.is_global_zero:
        return path
    if os.path.exists(path):
        old = read_manifest(path)
        if old["hash"] != manifest_hash:
            raise ValueError(f"{what} (hash {manifest_hash[:12]}) differs from the manifest {path} (hash "
                             f"{old['hash'][:12]}): the data on disk changed; move the old manifest away to accept "
                             "the new subset")
        return path
    write_manifest(manifest, path)
    return path


def trainer_world(trainer) -> tuple[int, int]:
    """``(world size, global rank)`` of ``trainer``; ``(1, 0)`` without one."""
    return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)


def seeded_train_loader(train_set, seed: int, batch_size: int, num_workers: int, world: tuple[int, int],
                        collate_fn: Optional[Callable] = None) -> DataLoader:
    """The training loader of every vpeft data module: :class:`EpochSeededSampler` shuffling (sharded over
    ``world = (replicas, rank)``) and :class:`SeededAugmentDataset` per-sample augmentation."""
    data = SeededAugmentDataset(train_set, seed)
    replicas, rank = world
    sampler = EpochSeededSampler(data, num_replicas=replicas, rank=rank, shuffle=True, seed=seed)
    return DataLoader(data, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=collate_fn,
                      persistent_workers=num_workers > 0, drop_last=False)
