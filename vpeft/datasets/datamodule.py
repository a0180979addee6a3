"""``FewShotDataModule``: a registered dataset, CoOp few-shot sampling, a split manifest and backbone transforms.

The training pipeline is a pure function of ``(seed, epoch, sample index)``: the shuffle order of an epoch comes
from a generator seeded with ``seed + epoch`` (the permutation ``torch.utils.data.DistributedSampler`` draws), and
each sample's augmentation runs under an RNG seeded from ``(seed, epoch, index)``. Nothing depends on the global RNG
state or on the number of data-loader workers, so a run resumed from an epoch-boundary checkpoint sees exactly the
batches an uninterrupted run sees, and ``N`` DDP ranks with per-rank batch ``B`` see, together, the same global
batches as one process with batch ``N * B``.

Needs Lightning (``pip install vpeft[lightning]``).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch
from lightning.pytorch import LightningDataModule

from ._loaders import (  # noqa: F401  (EpochSeededSampler, SeededAugmentDataset, mix_seed: re-exported)
    EpochSeededSampler,
    SeededAugmentDataset,
    SplitLoaders,
    mix_seed,
    record_manifest,
)

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# -- transforms --------------------------------------------------------------------------------------------------------
def backbone_data_config(backbone: Optional[str], backbone_kwargs: Optional[dict] = None) -> dict[str, Any]:
    """The preprocessing a backbone was pretrained with: ``input_size``, ``mean``, ``std``, ``interpolation``,
    ``crop_pct`` and ``family``.

    timm: ``timm.data.resolve_data_config`` on the model built on the meta device (no weights are allocated or
    loaded), with ``input_size`` taken from the model's actual patch-embedding size (``img_size=`` overrides change
    it, the pretrained config does not follow). open_clip: the architecture's image size and the pretrained tag's
    mean/std/interpolation (OpenAI's statistics when the tag has none). No backbone: ImageNet statistics at 224.
    """
    kw = dict(backbone_kwargs or {})
    if backbone is None:
        return dict(family=None, input_size=(3, 224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                    interpolation="bicubic", crop_pct=0.875)
    family, _, name = backbone.partition(":")
    if family == "timm":
        from timm.data import resolve_data_config

        import vpeft

        kw.pop("pretrained_cfg_overlay", None)
        with torch.device("meta"):
            model = vpeft.create_backbone(backbone, pretrained=False, **kw)
        cfg = resolve_data_config(model=model)
        img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if img_size is not None:
            cfg["input_size"] = (cfg["input_size"][0], *tuple(img_size))
        return dict(family="timm", input_size=tuple(cfg["input_size"]), mean=tuple(cfg["mean"]),
                    std=tuple(cfg["std"]), interpolation=cfg["interpolation"], crop_pct=cfg["crop_pct"])
    if family == "open_clip":
        import open_clip

        arch, _, tag = name.partition("/")
        mcfg = open_clip.get_model_config(arch)
        if mcfg is None:
            raise ValueError(f"open_clip has no model config {arch!r} (needed for its image size)")
        size = kw.get("force_image_size") or mcfg.get("vision_cfg", {}).get("image_size", 224)
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        pcfg = (open_clip.get_pretrained_cfg(arch, tag) if tag else None) or {}
        return dict(family="open_clip", input_size=(3, *size),
                    mean=tuple(pcfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
                    std=tuple(pcfg.get("std", open_clip.OPENAI_DATASET_STD)),
                    interpolation=pcfg.get("interpolation", "bicubic"), crop_pct=1.0,
                    resize_mode=pcfg.get("resize_mode", "shortest"))
    raise ValueError(f"no data config for backbone family {family!r} (id {backbone!r}); pass image_size/mean/std")


def build_transforms(cfg: dict[str, Any], augment: bool = True) -> tuple[Callable, Callable]:
    """``(train_transform, eval_transform)`` for a data config from :func:`backbone_data_config`.

    timm (and no backbone): timm's ``create_transform``; training is CoOp's recipe (random resized crop with scale
    (0.08, 1), horizontal flip, no colour jitter). open_clip: its own ``image_transform_v2`` for both (its training
    crop keeps 90-100% of the image). ``augment=False`` uses the evaluation transform for training too.
    """
    if cfg.get("family") == "open_clip":
        from open_clip.transform import PreprocessCfg, image_transform_v2

        pp = PreprocessCfg(size=tuple(cfg["input_size"][1:]), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                           interpolation=cfg["interpolation"], resize_mode=cfg.get("resize_mode", "shortest"))
        ev = image_transform_v2(pp, is_train=False)
        return (image_transform_v2(pp, is_train=True) if augment else ev), ev
    from timm.data import create_transform

    common = dict(input_size=tuple(cfg["input_size"]), interpolation=cfg["interpolation"], mean=tuple(cfg["mean"]),
                  std=tuple(cfg["std"]))
    ev = create_transform(**common, is_training=False, crop_pct=cfg["crop_pct"])
    if not augment:
        return ev, ev
    return create_transform(**common, is_training=True, color_jitter=None), ev


# -- the data module -------------------------------------------------------------------------------------------------
class FewShotDataModule(SplitLoaders, LightningDataModule):
    """A registered dataset under CoOp's few-shot protocol, with transforms from the backbone's pretrained config.

    Train and validation are sampled with ``vpeft.datasets.fewshot_splits`` (``K`` and ``min(K, 4)`` shots per class
    after ``random.seed(seed)``), then ``subsample_classes`` (base-to-new). The sampled subset is described by a
    manifest (sample ids + hash, :attr:`manifest_hash`) written on global rank 0 during ``setup``; an existing
    manifest with another hash is an error (the data on disk changed), never silently replaced. The test split is
    served only by :meth:`test_dataloader` (Lightning calls it only from ``trainer.test``).

    Args:
        dataset: A name from ``vpeft.datasets.list_datasets()`` (``"imagefolder"``, ``"caltech101"``, ...).
        root: The reader's root (CoOp's ``$DATA``; the dataset folder itself for ``imagefolder``).
        shots: Training shots per class ``K``; ``<= 0`` uses the full splits.
        seed: Few-shot sampling seed (CoOp: 1, 2, 3); also seeds the shuffle order and augmentations.
        subsample: ``"all"``, ``"base"`` or ``"new"`` classes (base-to-new generalisation).
        batch_size: Per-process training batch size (the global batch is ``batch_size * world_size``).
        eval_batch_size: Validation/test batch size; defaults to ``batch_size``.
        num_workers: Data-loader worker processes (results do not depend on it).
        backbone: Backbone id whose pretrained preprocessing to use (linked from ``model.backbone`` by the CLI).
        backbone_kwargs: The backbone's creation kwargs (``img_size=`` changes the input size).
        image_size: Override of the input size (square).
        mean: Override of the normalisation mean.
        std: Override of the normalisation std.
        interpolation: Override of the resize interpolation (``"bicubic"``, ``"bilinear"``).
        crop_pct: Override of timm's evaluation centre-crop fraction.
        augment: Random resized crop + flip for training (CoOp's recipe); ``False`` uses the evaluation transform.
        manifest_dir: Folder for the manifest; default ``<trainer.default_root_dir>/manifests`` (none without a
            trainer).
        skip_corrupt: Drop unreadable images up front (logged with a count) instead of failing when one is read.
        on_short: What the sampler does when a class has fewer than ``K`` images (see ``fewshot_splits``).
        dataset_kwargs: Extra reader arguments (e.g. VTAB's ``task=``).
    """

    def __init__(
            self,
            dataset: str,
            root: str,
            shots: int = 16,
            seed: int = 1,
            subsample: str = "all",
            batch_size: int = 32,
            eval_batch_size: Optional[int] = None,
            num_workers: int = 0,
            backbone: Optional[str] = None,
            backbone_kwargs: Optional[dict[str, Any]] = None,
            image_size: Optional[int] = None,
            mean: Optional[list[float]] = None,
            std: Optional[list[float]] = None,
            interpolation: Optional[str] = None,
            crop_pct: Optional[float] = None,
            augment: bool = True,
            manifest_dir: Optional[str] = None,
            skip_corrupt: bool = False,
            on_short: str = "error",
            dataset_kwargs: Optional[dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        if subsample not in ("all", "base", "new"):
            raise ValueError(f"subsample must be 'all', 'base' or 'new', got {subsample!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.save_hyperparameters()
        self.dataset, self.root, self.shots, self.seed, self.subsample = dataset, root, shots, seed, subsample
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers = num_workers
        self.backbone, self.backbone_kwargs = backbone, dict(backbone_kwargs or {})
        self.overrides = dict(image_size=image_size, mean=mean, std=std, interpolation=interpolation,
                              crop_pct=crop_pct)
        self.augment, self.manifest_dir, self.skip_corrupt = augment, manifest_dir, skip_corrupt
        self.on_short, self.dataset_kwargs = on_short, dict(dataset_kwargs or {})
        self._splits = None
        self._manifest: Optional[dict] = None
        self._transforms: Optional[tuple[Callable, Callable]] = None
        self.manifest_path: Optional[str] = None
        self.train_set = self.val_set = self.test_set = None

    # -- data ------------------------------------------------------------------------------------------------------
    @property
    def splits(self):
        """The sampled ``DatasetSplits`` (read and sampled once, on first use)."""
        if self._splits is None:
            from . import build_dataset, fewshot_splits, subsample_classes

            full = build_dataset(self.dataset, self.root, **self.dataset_kwargs)
            sampled = fewshot_splits(full, self.shots, self.seed, on_short=self.on_short) if self.shots > 0 else full
            self._splits = subsample_classes(sampled, self.subsample)
        return self._splits

    @property
    def num_classes(self) -> int:
        """Number of classes after base/new subsampling (the CLI links it to ``model.num_classes``)."""
        return len(self.splits.classnames)

    @property
    def classnames(self) -> list[str]:
        """Class names in label order."""
        return list(self.splits.classnames)

    @property
    def manifest(self) -> dict:
        """The few-shot manifest (sample ids, labels, test size, hash)."""
        if self._manifest is None:
            from . import build_manifest

            self._manifest = build_manifest(self.splits, shots=self.shots, seed=self.seed, subsample=self.subsample,
                                            dataset_kwargs=self.dataset_kwargs)
        return self._manifest

    @property
    def manifest_hash(self) -> str:
        """SHA-256 of the sampled subset (identical for every run and method on the same subset)."""
        return self.manifest["hash"]

    def data_config(self) -> dict[str, Any]:
        """The backbone's preprocessing config with this module's overrides applied."""
        cfg = backbone_data_config(self.backbone, self.backbone_kwargs)
        o = self.overrides
        if o["image_size"] is not None:
            cfg["input_size"] = (cfg["input_size"][0], int(o["image_size"]), int(o["image_size"]))
        for key in ("mean", "std"):
            if o[key] is not None:
                cfg[key] = tuple(float(v) for v in o[key])
        for key in ("interpolation", "crop_pct"):
            if o[key] is not None:
                cfg[key] = o[key]
        return cfg

    @property
    def transforms(self) -> tuple[Callable, Callable]:
        """``(train_transform, eval_transform)``."""
        if self._transforms is None:
            self._transforms = build_transforms(self.data_config(), self.augment)
        return self._transforms

    # -- Lightning hooks -------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Build the datasets the stage needs; on global rank 0 write (or check) the manifest."""
        from . import ImageListDataset

        train_tf, eval_tf = self.transforms
        if stage == "fit":
            self.train_set = ImageListDataset(self.splits.train, train_tf, skip_corrupt=self.skip_corrupt)
        if stage in ("fit", "validate"):
            self.val_set = ImageListDataset(self.splits.val, eval_tf, skip_corrupt=self.skip_corrupt)
            if not len(self.val_set):
                logger.warning("%s has no validation split: checkpoint selection cannot use validation data",
                               self.dataset)
        if stage == "test":
            self.test_set = ImageListDataset(self.splits.test, eval_tf, skip_corrupt=self.skip_corrupt)
        self._write_manifest()

    def _write_manifest(self) -> None:
        name = f"{self.dataset}_{self.subsample}_{self.shots}shot_seed{self.seed}.json"
        self.manifest_path = record_manifest(self.manifest, self.manifest_hash, self.manifest_dir, self.trainer, name,
                                             f"the sampled {self.dataset} subset")
