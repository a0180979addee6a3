"""Dataset readers, few-shot samplers, split manifests, class names and prompt templates (DESIGN section 6).

Typical use::

    from vpeft.datasets import build_dataset, fewshot_splits, build_manifest, write_manifest
    full = build_dataset("caltech101", "/data")            # /data/caltech-101/ in CoOp's layout
    splits = fewshot_splits(full, shots=16, seed=1)         # the subset CoOp trains on
    write_manifest(build_manifest(splits, shots=16, seed=1), "out/manifest.json")

Readers register by name (:func:`list_datasets`); ``FewShotDataModule`` (needs Lightning) is imported on first use.
"""

from . import coop, fgvc, folder, imagenet, templates, vtab  # noqa: F401  (importing registers the readers)
from .base import DatasetSplits, Datum
from .coop import COOP_DATASETS, read_split_json
from .fewshot import build_manifest, fewshot_splits, generate_fewshot, read_manifest, subsample_classes, write_manifest
from .fgvc import FGVC_DATASETS
from .folder import ImageListDataset
from .imagenet import IMAGENET_VARIANTS
from .registry import build_dataset, list_datasets, register_dataset
from .vtab import VTAB_GROUPS, VTAB_NUM_CLASSES, VTAB_TASKS, summarize_vtab

__all__ = ["COOP_DATASETS", "FGVC_DATASETS", "IMAGENET_VARIANTS", "VTAB_GROUPS", "VTAB_NUM_CLASSES", "VTAB_TASKS",
           "DatasetSplits", "Datum", "ImageListDataset", "build_dataset", "build_manifest", "fewshot_splits",
           "generate_fewshot", "list_datasets", "read_manifest", "read_split_json", "register_dataset",
           "subsample_classes", "summarize_vtab", "templates", "write_manifest"]


def __getattr__(name: str):
    # Lightning is optional for ``import vpeft``: the data module is imported only when asked for.
    if name == "FewShotDataModule":
        from .datamodule import FewShotDataModule

        return FewShotDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
