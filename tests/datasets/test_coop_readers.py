"""CoOp-layout readers against fake datasets written from CoOp's DATASETS.md, and the Dassl few-shot subset."""

import os

import pytest
from fake_coop import ALL_COOP, dassl_coop_subset, make_fake_coop

from vpeft.datasets import COOP_DATASETS, Datum, build_dataset, build_manifest, fewshot_splits


def _datums(items):
    return [Datum(p, y, c) for p, y, c in items]


@pytest.mark.parametrize("name", ALL_COOP)
def test_reader_and_16shot_seed1_equal_dassl(tmp_path, name):
    # 17 train images per class: 16-shot sampling must choose, not take everything.
    fake = make_fake_coop(tmp_path, name, per_class=(17, 5, 2))
    full = build_dataset(name, str(tmp_path))
    assert full.classnames == fake.classnames
    assert full.train == _datums(fake.train)  # split-file order is kept: Dassl's sampling depends on it
    assert full.val == _datums(fake.val)
    assert full.test == _datums(fake.test)
    assert full.root == fake.dataset_dir

    got = fewshot_splits(full, 16, seed=1)
    want_train, want_val = dassl_coop_subset(fake, 16, 1)
    assert got.train == _datums(want_train)
    assert got.val == _datums(want_val)
    assert got.test == full.test
    assert len(got.train) == 16 * len(fake.classnames)

    # The manifest (what every run records) lists exactly Dassl's subset, by path inside the dataset folder.
    manifest = build_manifest(got, shots=16, seed=1)
    assert manifest["train"] == [[os.path.relpath(p, fake.dataset_dir).replace(os.sep, "/"), y]
                                 for p, y, _ in want_train]


def test_coop_dataset_list_is_the_eleven():
    assert len(COOP_DATASETS) == 11 and set(COOP_DATASETS) == set(ALL_COOP)


def test_seeds_give_dassl_subsets_and_differ(tmp_path):
    fake = make_fake_coop(tmp_path, "oxford_pets", per_class=(10, 6, 1))
    full = build_dataset("oxford_pets", str(tmp_path))
    subsets = []
    for seed in (1, 2, 3):
        got = fewshot_splits(full, 4, seed=seed)
        want_train, want_val = dassl_coop_subset(fake, 4, seed)
        assert got.train == _datums(want_train) and got.val == _datums(want_val)
        subsets.append(got.train)
    assert subsets[0] != subsets[1] != subsets[2]


def test_shots_larger_than_val_uses_min_k_4(tmp_path):
    make_fake_coop(tmp_path, "dtd", per_class=(8, 4, 1))
    got = fewshot_splits(build_dataset("dtd", str(tmp_path)), 8, seed=1)
    assert len(got.train) == 8 * 3 and len(got.val) == 4 * 3


def test_imagenet_has_no_val_unless_asked(tmp_path):
    fake = make_fake_coop(tmp_path, "imagenet", per_class=(3, 0, 2))
    plain = build_dataset("imagenet", str(tmp_path))
    assert plain.val == [] and plain.test == _datums(fake.test)
    coop_like = build_dataset("imagenet", str(tmp_path), val_from_test=True)
    assert coop_like.val == coop_like.test


def _write_classnames(path, pairs):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("".join(f"{w} {c}\n" for w, c in pairs))


def _touch_image(path):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (8, 8)).save(path, format="PNG")


def test_imagenet_a_and_r_use_their_200_class_subset(tmp_path):
    wnids = [("n01", "goldfish"), ("n02", "great white shark"), ("n03", "tiger shark"), ("n04", "hammerhead")]
    # classnames.txt only in imagenet/: the variants fall back to it, as CoOp's instructions copy it.
    _write_classnames(tmp_path / "imagenet" / "classnames.txt", wnids)
    for name, folder, sub in (("imagenet_a", "imagenet-adversarial", "imagenet-a"),
                              ("imagenet_r", "imagenet-rendition", "imagenet-r")):
        img_dir = tmp_path / folder / sub
        for wnid in ("n04", "n02"):  # a subset, written out of order
            _touch_image(str(img_dir / wnid / "a.png"))
        (img_dir / "README.txt").write_text("not a class")
        ds = build_dataset(name, str(tmp_path))
        assert ds.classnames == ["great white shark", "hammerhead"]  # sorted folders n02, n04 -> labels 0, 1
        assert [(os.path.basename(os.path.dirname(d.impath)), d.label) for d in ds.test] == [("n02", 0), ("n04", 1)]
        assert ds.train == [] and ds.val == []


def test_imagenetv2_folders_are_class_indices(tmp_path):
    pairs = [("n01", "goldfish"), ("n02", "great white shark"), ("n03", "tiger shark")]
    _write_classnames(tmp_path / "imagenetv2" / "classnames.txt", pairs)
    img_dir = tmp_path / "imagenetv2" / "imagenetv2-matched-frequency-format-val"
    for k in (2, 0):
        _touch_image(str(img_dir / str(k) / "x.jpeg"))
    ds = build_dataset("imagenetv2", str(tmp_path))
    assert ds.classnames == ["goldfish", "great white shark", "tiger shark"]
    assert [(d.label, d.classname) for d in ds.test] == [(0, "goldfish"), (2, "tiger shark")]


def test_imagenet_sketch_and_missing_classnames(tmp_path):
    _touch_image(str(tmp_path / "imagenet-sketch" / "images" / "n02" / "s.png"))
    with pytest.raises(ValueError, match="classnames.txt"):
        build_dataset("imagenet_sketch", str(tmp_path))
    _write_classnames(tmp_path / "imagenet-sketch" / "classnames.txt", [("n01", "goldfish"), ("n02", "shark")])
    ds = build_dataset("imagenet_sketch", str(tmp_path))
    assert [(d.label, d.classname) for d in ds.test] == [(0, "shark")]
