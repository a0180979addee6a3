"""Segmentation data (vpeft.datasets.segmentation): folder and npz readers, class maps, few-shot subsets, manifests,
the data module, and the errors for bad data (size mismatch, unknown class ids, empty folders)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vpeft.datasets.segmentation import (
    SegmentationDataModule,
    SegmentationDataset,
    collate_segmentation,
    fewshot_items,
    read_mask,
    read_segmentation_splits,
)


def write_pair(folder, stem: str, image: np.ndarray, mask: np.ndarray, mode: str = "L") -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / "images" / f"{stem}.png")
    Image.fromarray(mask.astype(np.uint8), mode=mode).save(folder / "masks" / f"{stem}.png")


def make_root(tmp_path, n_train: int = 5, size=(12, 10)):
    rng = np.random.default_rng(0)
    root = tmp_path / "seg"
    for split, n in (("train", n_train), ("val", 2), ("test", 2)):
        for i in range(n):
            img = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            mask = np.zeros(size, np.uint8)
            mask[2:6, 3:7] = 255
            mask[7:9, 1:3] = 128
            write_pair(root / split, f"{split}{i:02d}", img, mask)
    return root


CLASS_MAP = {0: 0, 128: 2, 255: 1}


def test_class_map_and_identity(tmp_path):
    root = make_root(tmp_path, 1)
    path = str(root / "train" / "masks" / "train00.png")
    lab = read_mask(path, CLASS_MAP, 3)
    want = np.zeros((12, 10), np.int64)
    want[2:6, 3:7] = 1
    want[7:9, 1:3] = 2
    np.testing.assert_array_equal(lab, want)
    with pytest.raises(ValueError, match=r"\[128\].*missing from class_map"):
        read_mask(path, {0: 0, 255: 1}, 2)
    with pytest.raises(ValueError, match=r"class ids \[128, 255\] outside \[0, 3\)"):
        read_mask(path, None, 3)


def test_palette_mask_reads_indices(tmp_path):
    m = np.zeros((4, 4), np.uint8)
    m[1, 1] = 2
    im = Image.fromarray(m, mode="P")
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    im.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_mask(str(tmp_path / "p.png"), None, 3), m.astype(np.int64))
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="mode RGB"):
        read_mask(str(tmp_path / "rgb.png"), None, 3)


def test_size_mismatch_and_missing_mask_and_empty(tmp_path):
    root = tmp_path / "bad"
    write_pair(root / "train", "a", np.zeros((8, 8, 3), np.uint8), np.zeros((8, 6), np.uint8))
    ds = SegmentationDataset(read_segmentation_splits(str(root))["train"], 2)
    with pytest.raises(ValueError, match=r"sizes differ.*image \(8, 8\), mask \(8, 6\)"):
        ds[0]
    (root / "train" / "images").joinpath("b.png").write_bytes((root / "train" / "images" / "a.png").read_bytes())
    with pytest.raises(ValueError, match=r"have no PNG mask.*\['b'\]"):
        read_segmentation_splits(str(root))
    (tmp_path / "empty" / "train" / "images").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        read_segmentation_splits(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="no 'train' folder"):
        read_segmentation_splits(str(tmp_path / "nothing"))


def test_square_resize_keeps_classes_and_longest_side(tmp_path):
    root = make_root(tmp_path, 1)
    items = read_segmentation_splits(str(root))["train"]
    img, lab = SegmentationDataset(items, 3, CLASS_MAP, image_size=24, resize="square")[0]
    assert img.shape == (3, 24, 24) and img.dtype == torch.float32 and lab.shape == (24, 24)
    assert 0 <= float(img.min()) and float(img.max()) <= 255
    # Nearest-exact doubling (12x10 -> 24x24 is not integer in width; check the classes present and the height map).
    assert set(lab.unique().tolist()) == {0, 1, 2}
    img, lab = SegmentationDataset(items, 3, CLASS_MAP, image_size=24, resize="longest")[0]
    assert img.shape == (3, 24, 20) and lab.shape == (12, 10)  # SAM: the longer side to 24, the mask untouched


def test_npz_reader(tmp_path):
    (tmp_path / "syn" / "train").mkdir(parents=True)
    image = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    label = np.zeros((8, 8), np.uint8)
    label[2:4, 2:4] = 8
    np.savez(tmp_path / "syn" / "train" / "case0001_slice000.npz", image=image, label=label)
    items = read_segmentation_splits(str(tmp_path / "syn"), fmt="npz")["train"]
    img, lab = SegmentationDataset(items, 9, fmt="npz")[0]
    torch.testing.assert_close(img, torch.from_numpy(image * 255)[None].repeat(3, 1, 1))
    assert lab.dtype == torch.int64 and int(lab.max()) == 8
    with pytest.raises(ValueError, match=r"outside \[0, 8\)"):
        SegmentationDataset(items, 8, fmt="npz")[0]


def test_fewshot_is_seeded_subset():
    items = list(range(20))
    a, b, c = fewshot_items(items, 5, 1), fewshot_items(items, 5, 1), fewshot_items(items, 5, 2)
    assert a == b and a != c and len(a) == 5 and set(a) <= set(items) and a == sorted(a)
    assert fewshot_items(items, 0, 1) == items
    with pytest.raises(ValueError, match="shots=21"):
        fewshot_items(items, 21, 1)


def test_datamodule_batches_and_manifest(tmp_path):
    root = make_root(tmp_path, 5)
    dm = SegmentationDataModule(str(root), class_map=CLASS_MAP, shots=3, seed=1, batch_size=2, image_size=16,
                                manifest_dir=str(tmp_path / "man"), augment=True)
    assert dm.num_classes == 3
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 16, 16) and y.shape == (2, 16, 16) and y.dtype == torch.int64
    assert len(dm.train_set) == 3 and len(dm.val_set) == 2
    man = dm.manifest
    assert len(man["train"]) == 3 and man["test_count"] == 2 and all(i.startswith("train/images/") for i, _ in
                                                                        man["train"])
    again = SegmentationDataModule(str(root), class_map=CLASS_MAP, shots=3, seed=1)
    assert again.manifest_hash == dm.manifest_hash
    assert SegmentationDataModule(str(root), class_map=CLASS_MAP, shots=3, seed=2).manifest_hash != dm.manifest_hash
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        SegmentationDataModule(str(root))
    with pytest.raises(ValueError, match="class ids up to 2, but num_classes is 2"):
        SegmentationDataModule(str(root), class_map=CLASS_MAP, num_classes=2)
    with pytest.raises(ValueError, match="different sizes"):
        collate_segmentation([(torch.zeros(3, 4, 4), torch.zeros(4, 4)), (torch.zeros(3, 4, 5), torch.zeros(4, 5))])


# -- Synapse .h5 volumes -------------------------------------------------------------------------------------------
def write_volume(path, depth: int, size=(8, 6), seed: int = 0, **override) -> tuple[np.ndarray, np.ndarray]:
    """A SAMed-style test volume: ``image`` (D, H, W) in [0, 1], ``label`` (D, H, W) class ids stored as float32."""
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(seed)
    image = rng.random((depth, *size)).astype(np.float32)
    label = rng.integers(0, 4, (depth, *size)).astype(np.float32)
    data = {"image": image, "label": label, **override}
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for k, v in data.items():
            if v is not None:
                f[k] = v
    return image, label.astype(np.int64)


def samed_root(tmp_path, depths=(3, 2)):
    """SAMed's layout: train/ holds .npz slices (train_npz), test/ .h5 volumes (test_vol_h5, sorted by name)."""
    root = tmp_path / "synapse"
    (root / "train").mkdir(parents=True)
    for i in range(4):
        np.savez(root / "train" / f"case0005_slice{i:03d}.npz", image=np.full((8, 6), 0.5, np.float32),
                 label=np.zeros((8, 6), np.float32))
    vols = [write_volume(root / "test" / f"case{n:04d}.npy.h5", d, seed=n) for n, d in zip((2, 1), depths)]
    return root, vols[::-1]  # sorted order: case0001 (depth 2), case0002 (depth 3)


def test_h5_volumes_expand_into_slices_with_ids(tmp_path):
    from vpeft.metrics import VolumeAccumulator

    root, vols = samed_root(tmp_path)
    splits = read_segmentation_splits(str(root), fmt="npz")
    assert [p.rsplit("/", 1)[-1] for p in splits["test"]] == ["case0001.npy.h5", "case0002.npy.h5"]
    assert len(SegmentationDataset(splits["train"], 4, fmt="npz")[0]) == 2  # .npz slices stay (image, label)
    ds = SegmentationDataset(splits["test"], 4, fmt="npz")
    assert len(ds) == 5 and ds.volume_names == ["case0001", "case0002"]
    want = [(v, z) for v, (img, _) in enumerate(vols) for z in range(len(img))]
    for i, (v, z) in enumerate(want):
        img, lab, vid, sid = ds[i]
        assert vid.dtype == sid.dtype == torch.int64 and vid.dim() == sid.dim() == 0 and (int(vid), int(sid)) == (v, z)
        torch.testing.assert_close(img, torch.from_numpy(vols[v][0][z] * 255)[None].repeat(3, 1, 1))
        assert lab.dtype == torch.int64 and torch.equal(lab, torch.from_numpy(vols[v][1][z]))
    # Batched in a shuffled order, the slices reassemble into the original label volumes.
    loader = torch.utils.data.DataLoader(ds, batch_size=2, shuffle=True, collate_fn=collate_segmentation,
                                         generator=torch.Generator().manual_seed(0))
    acc = VolumeAccumulator(4)
    for x, y, vid, sid in loader:
        assert x.shape[1:] == (3, 8, 6) and vid.shape == sid.shape == (len(x),) and vid.dtype == torch.int64
        acc.update(y, y, vid, sid)
    for v, (_, label) in enumerate(vols):
        np.testing.assert_array_equal(acc.volume(v)[1], label)
    assert acc.compute().mean_dice == 1.0


def test_h5_resize_keep_label_size_and_workers(tmp_path):
    root, vols = samed_root(tmp_path)
    items = read_segmentation_splits(str(root), fmt="npz")["test"]
    img, lab, _, _ = SegmentationDataset(items, 4, image_size=16, fmt="npz")[0]
    assert img.shape == (3, 16, 16) and lab.shape == (16, 16)
    img, lab, _, _ = SegmentationDataset(items, 4, image_size=16, fmt="npz", keep_label_size=True)[0]
    assert img.shape == (3, 16, 16) and torch.equal(lab, torch.from_numpy(vols[0][1][0]))
    # Files are opened per access, so forked workers read them safely.
    loader = torch.utils.data.DataLoader(SegmentationDataset(items, 4, fmt="npz"), batch_size=5, num_workers=2,
                                         collate_fn=collate_segmentation)
    (_, y, vid, sid), = list(loader)
    assert vid.tolist() == [0, 0, 1, 1, 1] and sid.tolist() == [0, 1, 0, 1, 2]
    assert torch.equal(y[2:], torch.from_numpy(vols[1][1]))


def test_h5_errors(tmp_path):
    d = tmp_path / "bad"
    write_volume(d / "nolabel.h5", 2, label=None)
    with pytest.raises(ValueError, match=r"has no \['label'\] \(keys: \['image'\]\)"):
        SegmentationDataset([str(d / "nolabel.h5")], 4, fmt="npz")
    write_volume(d / "shape.h5", 2, label=np.zeros((2, 8, 5), np.float32))
    with pytest.raises(ValueError, match=r"'image' \(2, 8, 6\) and 'label' \(2, 8, 5\) must have the same shape"):
        SegmentationDataset([str(d / "shape.h5")], 4, fmt="npz")
    write_volume(d / "flat.h5", 2, image=np.zeros((8, 6), np.float32), label=np.zeros((8, 6), np.float32))
    with pytest.raises(ValueError, match=r"must be a 3-D volume \(D x H x W\), got shape \(8, 6\)"):
        SegmentationDataset([str(d / "flat.h5")], 4, fmt="npz")
    write_volume(d / "ids.h5", 2)  # labels 0..3
    ds = SegmentationDataset([str(d / "ids.h5")], 3, fmt="npz")
    with pytest.raises(ValueError, match=r"ids.h5' slice 0: label holds class ids \[3\] outside \[0, 3\)"):
        ds[0]
    write_volume(d / "frac.h5", 1, label=np.full((1, 8, 6), 0.5, np.float32))
    with pytest.raises(ValueError, match="must hold integer class ids"):
        SegmentationDataset([str(d / "frac.h5")], 4, fmt="npz")[0]
    np.savez(d / "a.npz", image=np.zeros((8, 6), np.float32), label=np.zeros((8, 6)))
    with pytest.raises(ValueError, match="mix 1 .npz slices and 1 .h5 volumes"):
        SegmentationDataset([str(d / "a.npz"), str(d / "ids.h5")], 4, fmt="npz")
    with pytest.raises(ValueError, match="must be .npz slice or .h5 volume paths"):
        SegmentationDataset([str(d / "x.png")], 4, fmt="npz")
    # Split folders: both kinds in one folder, and neither.
    root = tmp_path / "mixed"
    (root / "train").mkdir(parents=True)
    np.savez(root / "train" / "s.npz", image=np.zeros((8, 6), np.float32), label=np.zeros((8, 6)))
    write_volume(root / "train" / "v.npy.h5", 2)
    with pytest.raises(ValueError, match=r"both .npz slices \(1\) and .h5 volumes \(1\): a split is either"):
        read_segmentation_splits(str(root), fmt="npz")
    (root / "train" / "v.npy.h5").unlink()
    (root / "test").mkdir()
    with pytest.raises(ValueError, match="no .npz slices or .h5 volumes in"):
        read_segmentation_splits(str(root), fmt="npz")
    with pytest.raises(ValueError, match="one kind, got sample lengths"):
        collate_segmentation([(torch.zeros(3, 4, 4), torch.zeros(4, 4)),
                              (torch.zeros(3, 4, 4), torch.zeros(4, 4), torch.tensor(0), torch.tensor(1))])


def test_datamodule_volume_train_split_samples_volumes(tmp_path):
    root = tmp_path / "vols"
    for n, depth in enumerate((2, 3, 4, 2)):
        write_volume(root / "train" / f"case{n:04d}.npy.h5", depth, seed=n)
    write_volume(root / "test" / "case0100.npy.h5", 3, seed=9)
    dm = SegmentationDataModule(str(root), num_classes=4, format="npz", shots=2, seed=1, batch_size=2,
                                image_size=16, manifest_dir=str(tmp_path / "man"), native_eval_labels=True)
    picked = fewshot_items(sorted(str(p) for p in (root / "train").iterdir()), 2, 1)
    assert dm.splits["train"] == picked  # shots count volumes
    dm.setup("fit")
    assert len(dm.train_set) == sum(SegmentationDataset([p], 4, fmt="npz").__len__() for p in picked)
    x, y, vid, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 16, 16) and y.shape == (2, 16, 16) and vid.shape == (2,)
    dm.setup("test")
    _, y, vid, sid = next(iter(dm.test_dataloader()))
    assert y.shape == (2, 8, 6) and vid.tolist() == [0, 0] and sid.tolist() == [0, 1]  # labels at the files' size
    assert all(i.startswith("train/case") for i, _ in dm.manifest["train"])


def test_readers_import_without_lightning():
    """``import vpeft`` and the segmentation / point-cloud readers work without Lightning (DESIGN section 1); only the
    data modules need it."""
    import subprocess
    import sys

    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "lightning" or name.startswith("lightning."):
            raise ImportError("blocked " + name)
sys.meta_path.insert(0, Block())
import vpeft
from vpeft.datasets.pointcloud import PointCloudDataset
from vpeft.datasets.segmentation import SegmentationDataset, read_segmentation_splits
from vpeft.metrics import hd95
assert "lightning" not in sys.modules
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
