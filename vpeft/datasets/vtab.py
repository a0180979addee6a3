"""VTAB-1k in the common preprocessed folder layout (as distributed with NOAH and used by VPT, SSF and others).

``root`` is the folder holding one directory per task (``$DATA/vtab-1k``)::

    vtab-1k/<task>/train800.txt  val200.txt  train800val200.txt  test.txt   ("<relpath> <label>" a line)
    vtab-1k/<task>/images/...                                               (relpath is relative to <task>/)

``build_dataset("vtab1k", root, task="cifar", split="train800val200")`` reads training data from the chosen list,
validation from ``val200.txt`` and test from ``test.txt``. The protocol: select hyper-parameters training on
``train800`` and validating on ``val200``; then train the final model on ``train800val200`` (``train1000``) and
report test accuracy. In that final run the validation images are part of the training data, so validation
accuracy there is not a held-out score.

Results are reported as the mean over each group (natural / specialized / structured), the mean of the three
group means, and the flat mean over the 19 tasks (:func:`summarize_vtab`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from ._io import dataset_dir, read_lines
from .base import DatasetSplits, Datum
from .registry import register_dataset

#: Task folder name -> number of classes, in VTAB's canonical order.
VTAB_NUM_CLASSES: dict[str, int] = {
    "cifar": 100, "caltech101": 102, "dtd": 47, "oxford_flowers102": 102, "oxford_iiit_pet": 37, "svhn": 10,
    "sun397": 397,
    "patch_camelyon": 2, "eurosat": 10, "resisc45": 45, "diabetic_retinopathy": 5,
    "clevr_count": 8, "clevr_dist": 6, "dmlab": 6, "kitti": 4, "dsprites_loc": 16, "dsprites_ori": 16,
    "smallnorb_azi": 18, "smallnorb_ele": 9,
}

#: Group name -> its tasks.
VTAB_GROUPS: dict[str, tuple[str, ...]] = {
    "natural": ("cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397"),
    "specialized": ("patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"),
    "structured": ("clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori", "smallnorb_azi",
                   "smallnorb_ele"),
}

#: Task -> its group, for all 19 tasks in canonical order.
VTAB_TASKS: dict[str, str] = {task: group for group, tasks in VTAB_GROUPS.items() for task in tasks}

_SPLIT_FILES = {"train800": "train800.txt", "train800val200": "train800val200.txt", "train1000": "train800val200.txt"}


def read_vtab_list(path: str, task_dir: str, classnames: list[str], name: str) -> list[Datum]:
    """Parse a ``<relpath> <label>`` list (relpath relative to ``task_dir``; it may contain spaces).

    Raises:
        ValueError: If the file is missing, or a line is malformed or has a label out of range (naming the line).
    """
    items = []
    for lineno, line in read_lines(path, name):
        relpath, _, label = line.rpartition(" ")
        if not relpath or not label.lstrip("-").isdigit():
            raise ValueError(f"{name}: {path}:{lineno}: expected '<relpath> <label>', got {line!r}")
        y = int(label)
        if not 0 <= y < len(classnames):
            raise ValueError(f"{name}: {path}:{lineno}: label {y} outside 0..{len(classnames) - 1}")
        items.append(Datum(os.path.join(task_dir, relpath.strip()), y, classnames[y]))
    return items


@register_dataset("vtab1k")
def vtab1k(root: str, task: str = "cifar", split: str = "train800val200") -> DatasetSplits:
    """One VTAB-1k task.

    Args:
        root: Folder holding the task folders (``vtab-1k/``).
        task: One of :data:`VTAB_TASKS`.
        split: Training list: ``"train800val200"`` (alias ``"train1000"``; the final-run protocol) or
            ``"train800"`` (hyper-parameter search against ``val200``).

    Returns:
        Splits named ``vtab1k/<task>``; class names are the label indices as strings (the lists carry no names).

    Raises:
        ValueError: For an unknown task or split, a missing task folder or list file, or a malformed line.
    """
    if task not in VTAB_TASKS:
        raise ValueError(f"unknown VTAB-1k task {task!r}; tasks: {', '.join(VTAB_TASKS)}")
    if split not in _SPLIT_FILES:
        raise ValueError(f"VTAB-1k split must be one of {', '.join(_SPLIT_FILES)}, got {split!r}")
    name = f"vtab1k/{task}"
    task_dir = dataset_dir(root, task, name, "the preprocessed vtab-1k folder with one folder per task")
    classnames = [str(i) for i in range(VTAB_NUM_CLASSES[task])]

    def read(fname: str) -> list[Datum]:
        return read_vtab_list(os.path.join(task_dir, fname), task_dir, classnames, name)

    return DatasetSplits(name, read(_SPLIT_FILES[split]), read("val200.txt"), read("test.txt"), classnames,
                         root=task_dir)


def summarize_vtab(results: Mapping[str, float]) -> dict[str, float]:
    """Aggregate per-task VTAB-1k scores the two ways papers report them.

    Args:
        results: ``{task: score}`` for some or all of the 19 tasks.

    Returns:
        ``{group: mean}`` for every group whose tasks are all present; when all 19 are present also
        ``"group_mean"`` (mean of the three group means, as in VPT/NOAH tables) and ``"mean"`` (flat 19-task mean).

    Raises:
        ValueError: For a task name that is not a VTAB-1k task.
    """
    unknown = [t for t in results if t not in VTAB_TASKS]
    if unknown:
        raise ValueError(f"unknown VTAB-1k tasks {unknown}; tasks: {', '.join(VTAB_TASKS)}")
    out = {}
    for group, tasks in VTAB_GROUPS.items():
        if all(t in results for t in tasks):
            out[group] = sum(results[t] for t in tasks) / len(tasks)
    if len(out) == len(VTAB_GROUPS):
        out["group_mean"] = sum(out[g] for g in VTAB_GROUPS) / len(VTAB_GROUPS)
        out["mean"] = sum(results[t] for t in VTAB_TASKS) / len(VTAB_TASKS)
    return out
