"""Point-cloud data (vpeft.datasets.pointcloud): readers on tiny files in each official layout, pickle refusal,
malformed files, few-shot folds and the validation carve, augmentations, the data module's manifest."""

from __future__ import annotations

import builtins
import json
import math

import numpy as np
import pytest
import torch

from vpeft.datasets.pointcloud import (
    PointCloudDataModule,
    PointCloudDataset,
    check_cloud,
    fewshot_fold,
    point_dropout,
    read_modelnet,
    read_scanobjectnn,
    rotate,
    scale_translate,
    stratified_val_split,
)

CLASSES = ["airplane", "bathtub", "bed"]


def write_txt_layout(root, n_train=3, n_test=2, points=20, seed=0, classes=CLASSES):
    """modelnet40_normal_resampled: shape names, split lists, <class>/<id>.txt with x,y,z,nx,ny,nz rows."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "modelnet40_shape_names.txt").write_text("\n".join(classes) + "\n")
    lists = {"train": [], "test": []}
    clouds = {}
    for c in classes:
        (root / c).mkdir(exist_ok=True)
        for i in range(n_train + n_test):
            sid = f"{c}_{i + 1:04d}"
            arr = rng.normal(size=(points, 6)).astype(np.float32)
            np.savetxt(root / c / f"{sid}.txt", arr, fmt="%.6f", delimiter=",")
            clouds[sid] = np.loadtxt(root / c / f"{sid}.txt", delimiter=",", dtype=np.float32)
            lists["train" if i < n_train else "test"].append(sid)
    for split, ids in lists.items():
        (root / f"modelnet40_{split}.txt").write_text("\n".join(ids) + "\n")
    return clouds


# -- readers -----------------------------------------------------------------------------------------------------------
def test_txt_layout_first_points_normalised_by_hand(tmp_path):
    clouds = write_txt_layout(tmp_path)
    train = read_modelnet(str(tmp_path), "train")
    assert len(train) == 9 and train.classnames == CLASSES
    assert train.ids[:2] == ["airplane/airplane_0001.txt", "airplane/airplane_0002.txt"]
    assert train.labels == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    ds = PointCloudDataset(train, num_points=8)
    x, y = ds[4]
    raw = clouds["bathtub_0002"][:8, :3]
    # Hand normalisation: subtract the centroid, divide by the largest distance to it.
    c = raw - raw.mean(0)
    want = c / max(math.sqrt(float((p ** 2).sum())) for p in c)
    assert y == 1 and x.shape == (8, 3)
    np.testing.assert_allclose(x.numpy(), want, rtol=1e-5, atol=1e-6)
    xn, _ = PointCloudDataset(train, num_points=8, use_normals=True)[4]
    assert xn.shape == (8, 6)
    np.testing.assert_allclose(xn[:, 3:].numpy(), clouds["bathtub_0002"][:8, 3:], rtol=1e-6)
    assert len(read_modelnet(str(tmp_path), "test")) == 6


def test_npz_layout_and_pickle_refusal(tmp_path):
    pts = np.random.default_rng(1).normal(size=(4, 16, 3)).astype(np.float32)
    np.savez(tmp_path / "train.npz", points=pts, label=np.array([0, 1, 2, 1]))
    np.savez(tmp_path / "test.npz", points=pts[:2], label=np.array([[2], [0]]))
    (tmp_path / "shape_names.txt").write_text("a\nb\nc\n")
    train = read_modelnet(str(tmp_path), "train")
    assert train.ids == ["train.npz#0", "train.npz#1", "train.npz#2", "train.npz#3"] and train.labels == [0, 1, 2, 1]
    np.testing.assert_array_equal(train.load(2), pts[2])
    assert read_modelnet(str(tmp_path), "test").labels == [2, 0]  # (M, 1) labels flattened

    dat = tmp_path / "dat"
    dat.mkdir()
    (dat / "modelnet40_train_8192pts_fps.dat").write_bytes(b"\x80\x04not read")
    with pytest.raises(ValueError, match="pickles; vpeft never unpickles.*np.savez"):
        read_modelnet(str(dat), "train")


def test_h5_layouts_need_h5py(tmp_path, monkeypatch):
    (tmp_path / "ply_data_train0.h5").write_bytes(b"")
    (tmp_path / "shape_names.txt").write_text("a\n")
    real_import = builtins.__import__

    def no_h5py(name, *args, **kwargs):
        if name == "h5py":
            raise ImportError("No module named 'h5py'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_h5py)
    with pytest.raises(ImportError, match="needs h5py.*pip install h5py"):
        read_modelnet(str(tmp_path), "train")
    folder = tmp_path / "so" / "main_split"
    folder.mkdir(parents=True)
    (folder / "training_objectdataset_augmentedrot_scale75.h5").write_bytes(b"")
    with pytest.raises(ImportError, match="needs h5py"):
        read_scanobjectnn(str(tmp_path / "so"), "train", "pb_t50_rs")


def test_h5_readers_on_tiny_files(tmp_path):
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(2)
    for i in range(2):
        with h5py.File(tmp_path / f"ply_data_train{i}.h5", "w") as f:
            f["data"] = rng.normal(size=(3, 32, 3)).astype(np.float32)
            f["label"] = np.array([[0], [1], [i]])
    (tmp_path / "shape_names.txt").write_text("a\nb\n")
    train = read_modelnet(str(tmp_path), "train")
    assert train.ids[3] == "ply_data_train1.h5#0" and train.labels == [0, 1, 0, 0, 1, 1]
    files = {"obj_bg": ("main_split", "training_objectdataset.h5"),
             "obj_only": ("main_split_nobg", "training_objectdataset.h5"),
             "pb_t50_rs": ("main_split", "training_objectdataset_augmentedrot_scale75.h5")}
    for variant, (folder, tr) in files.items():
        (tmp_path / "so" / folder).mkdir(parents=True, exist_ok=True)
        with h5py.File(tmp_path / "so" / folder / tr, "w") as f:
            f["data"] = rng.normal(size=(2, 64, 3)).astype(np.float32)
            f["label"] = np.array([14, 3])
        s = read_scanobjectnn(str(tmp_path / "so"), "train", variant)
        assert s.labels == [14, 3] and len(s.classnames) == 15 and s.load(0).shape == (64, 3)


def test_malformed_clouds_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"c1: expected a \(points, 3\+\) array.*shape \(5, 2\)"):
        check_cloud(np.zeros((5, 2)), "c1")
    bad = np.zeros((5, 3))
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="c2: the cloud holds NaN"):
        check_cloud(bad, "c2")
    with pytest.raises(ValueError, match="c3: 5 points, fewer than the 8 requested"):
        check_cloud(np.zeros((5, 3)), "c3", num_points=8)
    with pytest.raises(ValueError, match=r"\(points, 6\)"):
        check_cloud(np.zeros((5, 3)), "c4", use_normals=True)
    # Through the dataset: a short file and a bad npz.
    write_txt_layout(tmp_path / "m", points=6)
    ds = PointCloudDataset(read_modelnet(str(tmp_path / "m"), "train"), num_points=8)
    with pytest.raises(ValueError, match="airplane_0001.txt.*6 points, fewer than the 8"):
        ds[0]
    np.savez(tmp_path / "train.npz", points=np.zeros((3, 8, 3)), label=np.array([0, 1]))
    (tmp_path / "shape_names.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match=r"labels must be \(3,\) for 3 clouds"):
        read_modelnet(str(tmp_path), "train")
    (tmp_path / "m" / "modelnet40_train.txt").write_text("chair_0001\n")
    with pytest.raises(ValueError, match="'chair_0001'.*names no class"):
        read_modelnet(str(tmp_path / "m"), "train")
    with pytest.raises(ValueError, match="holds no ModelNet layout"):
        read_modelnet(str(tmp_path / "m" / "airplane"), "train")


# -- few-shot and validation -------------------------------------------------------------------------------------------
def test_fewshot_fold_protocol_and_determinism():
    train = [c for c in range(10) for _ in range(30)]
    test = [c for c in range(10) for _ in range(25)]
    a = fewshot_fold(train, test, way=5, shot=10, fold=3, seed=0)
    assert a == fewshot_fold(train, test, way=5, shot=10, fold=3, seed=0)
    assert a != fewshot_fold(train, test, way=5, shot=10, fold=4, seed=0)
    assert len(set(a["classes"])) == 5 and len(a["train"]) == 50 and len(a["test"]) == 100
    for c in a["classes"]:
        assert sum(train[i] == c for i in a["train"]) == 10 and sum(test[i] == c for i in a["test"]) == 20
    with pytest.raises(ValueError, match="needs 10 / 20"):
        fewshot_fold(train, [c for c in range(10) for _ in range(5)], 5, 10, 0)
    with pytest.raises(ValueError, match="way=11"):
        fewshot_fold(train, test, 11, 10, 0)


def test_validation_is_carved_from_train_per_class():
    labels = [0] * 10 + [1] * 4 + [2] * 1
    tr, va = stratified_val_split(labels, 0.25, seed=5)
    assert sorted(tr + va) == list(range(15)) and not set(tr) & set(va)
    assert [sum(labels[i] == c for i in va) for c in range(3)] == [2, 1, 0]  # round(2.5)=2, 1, a lone cloud stays
    assert (tr, va) == stratified_val_split(labels, 0.25, seed=5)
    assert stratified_val_split(labels, 0.0, seed=5) == (list(range(15)), [])


def test_datamodule_fewshot_manifest_and_no_test_leak(tmp_path):
    write_txt_layout(tmp_path / "m", n_train=4, n_test=20, points=8, classes=[f"k{i}" for i in range(4)])
    kw = dict(dataset="modelnet_fewshot", root=str(tmp_path / "m"), num_points=8, way=3, shot=4, fold=2,
              val_fraction=0.25, batch_size=4, manifest_dir=str(tmp_path / "man"))
    dm = PointCloudDataModule(**kw)
    assert dm.num_classes == 3
    dm.setup("fit")
    dm.setup("test")
    man = json.loads(next((tmp_path / "man").glob("*.json")).read_text())
    assert len(man["train"]) == 9 and len(man["val"]) == 3 and man["test_count"] == 60
    assert sorted({lab for _, lab in man["train"]}) == [0, 1, 2]
    train_ids = {i for i, _ in man["train"]} | {i for i, _ in man["val"]}
    assert not train_ids & set(man["meta"]["test_ids"])
    assert all(i.rsplit("_", 1)[1] <= "0004.txt" for i in train_ids)  # training-list clouds only
    assert PointCloudDataModule(**kw).manifest_hash == dm.manifest_hash
    assert PointCloudDataModule(**{**kw, "fold": 3}).manifest_hash != dm.manifest_hash
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 8, 3) and set(y.tolist()) <= {0, 1, 2}
    assert len(dm.test_set) == 60 and {dm.test_set[i][1] for i in range(60)} == {0, 1, 2}
    # Changed data behind an existing manifest is an error, not a silent replacement.
    path = next((tmp_path / "man").glob("*.json"))
    man["train"] = man["train"][:-1]
    from vpeft.datasets.fewshot import _manifest_hash

    man["hash"] = _manifest_hash(man)
    path.write_text(json.dumps(man))
    with pytest.raises(ValueError, match="differs from the manifest"):
        PointCloudDataModule(**kw).setup("fit")


def test_datamodule_bad_arguments():
    with pytest.raises(ValueError, match="dataset must be one of"):
        PointCloudDataModule(dataset="shapenet")
    with pytest.raises(ValueError, match="unknown augmentations"):
        PointCloudDataModule(augment=["jitter"])
    with pytest.raises(ValueError, match="val_fraction"):
        PointCloudDataModule(val_fraction=1.0)
    with pytest.raises(ValueError, match="variant"):
        PointCloudDataModule(dataset="scanobjectnn", variant="hardest")
    assert PointCloudDataModule(dataset="scanobjectnn", root="/nonexistent").num_classes == 15


# -- augmentations -----------------------------------------------------------------------------------------------------
def test_augmentations_by_hand():
    pts = torch.randn(50, 6)
    g = torch.Generator().manual_seed(0)
    out = scale_translate(pts, generator=g)
    g = torch.Generator().manual_seed(0)
    s = torch.rand(1, 1, 3, generator=g) * (1.5 - 2 / 3) + 2 / 3
    t = (torch.rand(1, 1, 3, generator=g) * 2 - 1) * 0.2
    torch.testing.assert_close(out[:, :3], pts[:, :3] * s[0] + t[0])
    assert bool(((s >= 2 / 3) & (s <= 1.5)).all()) and bool((t.abs() <= 0.2).all())
    r = rotate(pts, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(r[:, :3].norm(dim=1), pts[:, :3].norm(dim=1))  # a rotation keeps lengths
    torch.testing.assert_close(r[:, 1], pts[:, 1])  # about the up axis y
    torch.testing.assert_close(r[:, 4], pts[:, 4])
    d = point_dropout(pts, generator=torch.Generator().manual_seed(2))
    assert d.shape == pts.shape
    changed = (d != pts).any(dim=1)
    assert bool((d[changed] == pts[0]).all())
