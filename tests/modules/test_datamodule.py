"""``FewShotDataModule``: backbone-derived transforms, the manifest, test isolation, and a training pipeline that
is a pure function of (seed, epoch, index): equal across instances and worker counts, and DDP shards that add up
to the single-process batches."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("lightning")

import torch  # noqa: E402
from _train_helpers import BACKBONE, TINY, coop_root_fixture  # noqa: E402

from vpeft.datasets.datamodule import FewShotDataModule, backbone_data_config  # noqa: E402

coop_root = coop_root_fixture()


def dm(root: str, **kw) -> FewShotDataModule:
    args = dict(dataset="caltech101", root=root, shots=8, seed=1, batch_size=8, backbone=BACKBONE,
                backbone_kwargs=TINY)
    args.update(kw)
    return FewShotDataModule(**args)


def test_transforms_follow_the_backbone():
    import open_clip
    from conftest import TINY_CLIP, register_tiny_clip

    timm_cfg = backbone_data_config(BACKBONE, TINY)
    assert timm_cfg["input_size"] == (3, 16, 16) and timm_cfg["mean"] == (0.5, 0.5, 0.5)  # augreg ViT stats
    register_tiny_clip()
    clip_cfg = backbone_data_config(f"open_clip:{TINY_CLIP}")
    assert clip_cfg["input_size"] == (3, 32, 32) and clip_cfg["mean"] == tuple(open_clip.OPENAI_DATASET_MEAN)
    assert backbone_data_config("open_clip:ViT-B-16/openai")["input_size"] == (3, 224, 224)
    assert backbone_data_config(None)["input_size"] == (3, 224, 224)


def test_overrides_and_shapes(coop_root):
    data = dm(coop_root, image_size=12, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0], augment=False)
    data.setup("fit")
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (8, 3, 12, 12) and x.min() >= 0 and y.dtype == torch.long
    assert data.num_classes == 3 and len(data.splits.train) == 24 and len(data.splits.val) == 12
    base, new = dm(coop_root, subsample="base"), dm(coop_root, subsample="new")
    assert (base.num_classes, new.num_classes) == (2, 1)


def test_manifest_is_written_and_guarded(coop_root, tmp_path):
    data = dm(coop_root, manifest_dir=str(tmp_path))
    data.setup("fit")
    saved = json.loads(open(data.manifest_path).read())
    assert saved["hash"] == data.manifest_hash and len(saved["train"]) == 24
    assert dm(coop_root, seed=2).manifest_hash != data.manifest_hash
    saved["hash"] = "0" * 64  # a manifest from another subset under the same name
    with open(data.manifest_path, "w") as f:
        json.dump(saved, f)
    with pytest.raises(ValueError, match="hash"):
        dm(coop_root, manifest_dir=str(tmp_path)).setup("fit")


def test_test_split_only_through_test_dataloader(coop_root):
    data = dm(coop_root)
    data.setup("fit")
    assert data.test_set is None
    seen = {d.impath for d in data.train_set.items} | {d.impath for d in data.val_set.items}
    assert not seen & {d.impath for d in data.splits.test}
    assert len(data.test_dataloader().dataset) == 18


def _epoch(data: FewShotDataModule, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader = data.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return list(loader)


def test_pipeline_is_a_function_of_seed_epoch_and_index(coop_root):
    a, b = dm(coop_root), dm(coop_root, num_workers=1)
    a.setup("fit"), b.setup("fit")
    torch.manual_seed(123)  # the global RNG must not matter
    first = _epoch(a, 0)
    torch.manual_seed(456)
    for (xa, ya), (xb, yb) in zip(first, _epoch(b, 0)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(first[0][0], _epoch(a, 1)[0][0])  # a new order and new crops next epoch


def test_ddp_shards_add_up_to_the_single_process_batches(coop_root):
    single = dm(coop_root)
    single.setup("fit")
    shards = []
    for rank in (0, 1):
        d = dm(coop_root, batch_size=4)
        d.setup("fit")
        d._world = lambda rank=rank: (2, rank)  # what a 2-process trainer reports
        shards.append(_epoch(d, 0))
    for (x, y), (x0, y0), (x1, y1) in zip(_epoch(single, 0), *shards):
        # rank r takes perm[r::2]: interleave the two shards to get the single-process batch
        assert torch.equal(x, torch.stack([x0, x1], 1).flatten(0, 1))
        assert torch.equal(y, torch.stack([y0, y1], 1).flatten())
