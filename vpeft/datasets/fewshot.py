"""Few-shot sampling, base-to-new class splits and split manifests (CoOp's protocol, DESIGN section 6).

Sampling reproduces Dassl's ``DatasetBase.generate_fewshot_dataset`` exactly: group by label in order of first
appearance, then ``random.sample(items, K)`` per class from Python's global ``random``. ``fewshot_splits`` seeds it
once and samples train then validation (``min(K, 4)`` shots), which is the order of CoOp's dataset readers, so the
subset for a given (dataset, K, seed) equals the one CoOp trained on.

A manifest records the sampled subset (sample ids relative to the dataset directory, labels) and a hash of it,
so every run and every method can show that it saw the same subset.

Deviations from the reference implementation (KaiyangZhou/Dassl.pytorch, KaiyangZhou/CoOp):
    * A class with fewer than K items is an error by default (``on_short="error"``); Dassl silently keeps all of
      them (``on_short="all"`` here) or, in some versions whose default was ``repeat=True``, draws with
      replacement (``repeat=True`` here).
    * ``fewshot_splits`` restores the caller's ``random`` state afterwards; Dassl leaves it seeded. The sampled
      subset is the same.
    * CoOp caches sampled subsets as pickles under the data directory; here the subset is recomputed (it is cheap)
      and recorded as a JSON manifest wherever the caller writes it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Optional

from .._fileio import atomic_write
from .base import DatasetSplits, Datum

_ON_SHORT = ("error", "all")


def generate_fewshot(data: Sequence[Datum], num_shots: int, repeat: bool = False,
                     on_short: str = "error") -> list[Datum]:
    """Sample ``num_shots`` items per class, exactly as Dassl's ``generate_fewshot_dataset`` on one data source.

    Classes are visited in order of their first appearance in ``data``; each draws ``random.sample(items, K)``
    from Python's global ``random`` state, which the caller seeds.

    Args:
        data: The items to sample from (their order matters, as in Dassl).
        num_shots: Shots per class ``K``; ``K < 1`` returns all of ``data``.
        repeat: For a class with fewer than ``K`` items, draw ``random.choices(items, k=K)`` (with replacement),
            as Dassl's ``repeat=True``. Takes precedence over ``on_short``.
        on_short: For a class with fewer than ``K`` items and ``repeat=False``: ``"error"`` raises,
            ``"all"`` keeps all of its items (Dassl's ``repeat=False`` behaviour).

    Returns:
        The sampled items, class after class.

    Raises:
        ValueError: If ``on_short`` is unknown, or a class has fewer than ``K`` items under ``on_short="error"``
            (the message names the class and both counts).
    """
    if on_short not in _ON_SHORT:
        raise ValueError(f"on_short must be one of {_ON_SHORT}, got {on_short!r}")
    if num_shots < 1:
        return list(data)
    groups: dict[int, list[Datum]] = {}  # dicts keep insertion order: Dassl's defaultdict order
    for item in data:
        groups.setdefault(item.label, []).append(item)
    out: list[Datum] = []
    for label, items in groups.items():
        if len(items) >= num_shots:
            out.extend(random.sample(items, num_shots))
        elif repeat:
            out.extend(random.choices(items, k=num_shots))
        elif on_short == "all":
            out.extend(items)
        else:
            raise ValueError(
                f"class {items[0].classname!r} (label {label}) has {len(items)} items, fewer than the "
                f"{num_shots} shots requested; pass on_short='all' to keep all {len(items)} (Dassl's behaviour) "
                "or repeat=True to draw with replacement")
    return out


def fewshot_splits(splits: DatasetSplits, shots: int, seed: int, on_short: str = "error") -> DatasetSplits:
    """Apply CoOp's few-shot protocol: ``K`` training and ``min(K, 4)`` validation shots per class.

    ``random.seed(seed)``, then train, then validation are sampled with :func:`generate_fewshot` (CoOp's order);
    the test split is untouched. The caller's ``random`` state is restored afterwards.

    Args:
        splits: The full dataset.
        shots: Shots per class ``K``; ``K <= 0`` returns the full data.
        seed: The seed (CoOp uses 1, 2, 3).
        on_short: See :func:`generate_fewshot`.

    Returns:
        New splits with sampled ``train`` and ``val``.

    Raises:
        ValueError: If a class has fewer items than requested (under ``on_short="error"``); the message names the
            dataset and split.
    """
    if shots <= 0:
        return replace(splits, train=list(splits.train), val=list(splits.val), test=list(splits.test))
    state = random.getstate()
    try:
        random.seed(seed)
        sampled = {}
        for split, k in (("train", shots), ("val", min(shots, 4))):
            try:
                sampled[split] = generate_fewshot(getattr(splits, split), k, on_short=on_short)
            except ValueError as err:
                raise ValueError(f"{splits.name} {split} split, {k}-shot: {err}") from None
    finally:
        random.setstate(state)
    return replace(splits, train=sampled["train"], val=sampled["val"], test=list(splits.test))


def subsample_classes(splits: DatasetSplits, subsample: str) -> DatasetSplits:
    """Split the classes into base and new halves, as CoOp's ``subsample_classes`` (base-to-new generalisation).

    The labels present in ``train`` (all labels when ``train`` is empty) are sorted; with ``n`` of them and
    ``m = ceil(n / 2)``, ``"base"`` keeps the first ``m`` and ``"new"`` the rest, relabelled to ``0..``; every
    split is filtered and relabelled the same way and ``classnames`` follows.

    Args:
        splits: The dataset (usually already few-shot sampled, as in CoOp).
        subsample: ``"all"`` (unchanged), ``"base"`` or ``"new"``.

    Returns:
        New splits.

    Raises:
        ValueError: For an unknown ``subsample``.
    """
    if subsample not in ("all", "base", "new"):
        raise ValueError(f"subsample must be 'all', 'base' or 'new', got {subsample!r}")
    if subsample == "all":
        return replace(splits, train=list(splits.train), val=list(splits.val), test=list(splits.test))
    source = splits.train or [*splits.val, *splits.test]
    labels = sorted({item.label for item in source})
    m = math.ceil(len(labels) / 2)
    selected = labels[:m] if subsample == "base" else labels[m:]
    relabel = {old: new for new, old in enumerate(selected)}

    def _filter(items: list[Datum]) -> list[Datum]:
        return [Datum(d.impath, relabel[d.label], d.classname) for d in items if d.label in relabel]

    return replace(splits, train=_filter(splits.train), val=_filter(splits.val), test=_filter(splits.test),
                   classnames=[splits.classnames[y] for y in selected])


def _sample_id(impath: str, root: Optional[str]) -> str:
    """A portable id for an image: its path relative to the dataset directory when it lies inside it."""
    if root:
        root_abs = os.path.abspath(root)
        path_abs = os.path.abspath(impath)
        try:
            inside = os.path.commonpath([root_abs, path_abs]) == root_abs
        except ValueError:  # different drives on Windows
            inside = False
        if inside:
            return os.path.relpath(path_abs, root_abs).replace(os.sep, "/")
    return impath.replace(os.sep, "/")


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _manifest_hash(manifest: dict) -> str:
    # The hash covers what defines the subset (dataset, sampled ids and labels, test size), not run metadata:
    # two runs with different hyper-parameters on the same subset must report the same hash.
    payload = {k: manifest[k] for k in ("dataset", "train", "val", "test_count")}
    return hashlib.sha256(_canonical(payload)).hexdigest()


def build_manifest(splits: DatasetSplits, **meta: Any) -> dict:
    """Describe a (sampled) dataset by its sample ids and a hash of them.

    Args:
        splits: The splits actually used for training / validation.
        **meta: JSON-serialisable run metadata stored alongside (e.g. ``shots=16, seed=1, subsample="base"``);
            it does not enter the hash.

    Returns:
        ``{"dataset", "root", "meta", "train": [[id, label], ...], "val": [...], "test_count", "hash"}`` where an
        id is the image path relative to ``splits.root`` when it lies inside it (else the path as given), and
        ``hash`` is the SHA-256 of a canonical JSON of dataset name, train, val and test count.
    """
    manifest = {
        "dataset": splits.name,
        "root": splits.root,
        "meta": meta,
        "train": [[_sample_id(d.impath, splits.root), int(d.label)] for d in splits.train],
        "val": [[_sample_id(d.impath, splits.root), int(d.label)] for d in splits.val],
        "test_count": len(splits.test),
    }
    manifest["hash"] = _manifest_hash(manifest)
    return manifest


def write_manifest(manifest: dict, path: str) -> None:
    """Write a manifest as JSON atomically (temporary file in the same folder, then ``os.replace``).

    A crash mid-write leaves either the old file or none, never a truncated manifest.

    Args:
        manifest: As returned by :func:`build_manifest`.
        path: Destination file; missing parent folders are created.
    """
    def dump(f) -> None:
        json.dump(manifest, f, indent=1)
        f.write("\n")

    atomic_write(os.path.expanduser(path), dump, binary=False)


def read_manifest(path: str) -> dict:
    """Read a manifest written by :func:`write_manifest` and check its hash.

    Raises:
        ValueError: If the file is not a manifest or its content does not match its hash (edited or corrupted).
    """
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    missing = [k for k in ("dataset", "train", "val", "test_count", "hash") if k not in manifest]
    if missing:
        raise ValueError(f"{path} is not a vpeft split manifest (missing keys: {', '.join(missing)})")
    if _manifest_hash(manifest) != manifest["hash"]:
        raise ValueError(f"{path}: the sample list does not match the manifest hash (file edited or corrupted)")
    return manifest
