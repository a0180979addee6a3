"""VTAB-1k list parsing and task groups; FGVC with VPT-style split JSONs."""

import json
import os
import re

import pytest
from PIL import Image

from vpeft.datasets import VTAB_GROUPS, VTAB_NUM_CLASSES, VTAB_TASKS, build_dataset, summarize_vtab


def _touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (8, 8)).save(path, format="PNG")


def test_vtab_task_table():
    # VTAB-1k: 7 natural, 4 specialized, 8 structured tasks.
    assert [len(VTAB_GROUPS[g]) for g in ("natural", "specialized", "structured")] == [7, 4, 8]
    assert len(VTAB_TASKS) == 19 and set(VTAB_TASKS) == set(VTAB_NUM_CLASSES)
    assert VTAB_TASKS["cifar"] == "natural" and VTAB_TASKS["eurosat"] == "specialized"
    assert VTAB_TASKS["smallnorb_ele"] == "structured"
    assert VTAB_NUM_CLASSES["cifar"] == 100 and VTAB_NUM_CLASSES["dsprites_loc"] == 16


def test_summarize_vtab_group_and_flat_means():
    scores = {t: float(i) for i, t in enumerate(VTAB_TASKS)}  # natural 0..6, specialized 7..10, structured 11..18
    s = summarize_vtab(scores)
    assert s["natural"] == 3.0 and s["specialized"] == 8.5 and s["structured"] == 14.5
    assert s["group_mean"] == pytest.approx((3.0 + 8.5 + 14.5) / 3) and s["mean"] == 9.0
    partial = summarize_vtab({t: 1.0 for t in VTAB_GROUPS["specialized"]})
    assert partial == {"specialized": 1.0}
    with pytest.raises(ValueError, match="unknown VTAB-1k tasks"):
        summarize_vtab({"imagenet": 1.0})


@pytest.fixture
def vtab_root(tmp_path):
    task = tmp_path / "vtab-1k" / "dtd"
    lists = {
        "train800.txt": [("images/train/0.png", 0), ("images/train/1.png", 46)],
        "val200.txt": [("images/val/0 copy.png", 3)],  # a path with a space
        "train800val200.txt": [("images/train/0.png", 0), ("images/train/1.png", 46), ("images/val/0 copy.png", 3)],
        "test.txt": [("images/test/0.png", 5), ("images/test/1.png", 5)],
    }
    for fname, rows in lists.items():
        for rel, _ in rows:
            _touch(str(task / rel))
        (task / fname).write_text("".join(f"{rel} {y}\n" for rel, y in rows) + "\n")
    return tmp_path / "vtab-1k"


def test_vtab_lists_are_parsed(vtab_root):
    task = str(vtab_root / "dtd")
    ds = build_dataset("vtab1k", str(vtab_root), task="dtd", split="train800")
    assert ds.name == "vtab1k/dtd" and ds.root == task and len(ds.classnames) == 47
    assert [(d.impath, d.label) for d in ds.train] == [(f"{task}/images/train/0.png", 0),
                                                       (f"{task}/images/train/1.png", 46)]
    assert [(d.impath, d.label, d.classname) for d in ds.val] == [(f"{task}/images/val/0 copy.png", 3, "3")]
    assert [d.label for d in ds.test] == [5, 5]
    full = build_dataset("vtab1k", str(vtab_root), task="dtd")  # train800val200 by default
    assert len(full.train) == 3 and full.val == ds.val and full.test == ds.test
    assert build_dataset("vtab1k", str(vtab_root), task="dtd", split="train1000").train == full.train


def test_vtab_errors(vtab_root):
    with pytest.raises(ValueError, match="unknown VTAB-1k task 'cifar100'"):
        build_dataset("vtab1k", str(vtab_root), task="cifar100")
    with pytest.raises(ValueError, match="split must be one of"):
        build_dataset("vtab1k", str(vtab_root), task="dtd", split="train")
    with pytest.raises(ValueError, match=re.escape(f"expected the dataset directory {vtab_root}/cifar")):
        build_dataset("vtab1k", str(vtab_root), task="cifar")
    test_list = vtab_root / "dtd" / "test.txt"
    test_list.write_text("images/test/0.png 5\nimages/test/1.png\n")
    with pytest.raises(ValueError, match=re.escape(f"{test_list}:2: expected '<relpath> <label>'")):
        build_dataset("vtab1k", str(vtab_root), task="dtd")
    test_list.write_text("images/test/0.png 47\n")
    with pytest.raises(ValueError, match=r"test.txt:1: label 47 outside 0..46"):
        build_dataset("vtab1k", str(vtab_root), task="dtd")
    os.remove(test_list)
    with pytest.raises(ValueError, match=re.escape(f"missing split file {test_list}")):
        build_dataset("vtab1k", str(vtab_root), task="dtd")


def _write_fgvc(ddir, image_folder, splits):
    for split, anno in splits.items():
        for rel in anno:
            _touch(os.path.join(ddir, image_folder, rel))
        os.makedirs(ddir, exist_ok=True)
        with open(os.path.join(ddir, f"{split}.json"), "w") as f:
            json.dump(anno, f)


def test_fgvc_cub_contiguous_labels_and_folder_names(tmp_path):
    ddir = tmp_path / "CUB_200_2011"
    # VPT's json: relpath -> 1-based class id; a later class listed first.
    _write_fgvc(str(ddir), "images", {
        "train": {"200.Common_Yellowthroat/a.jpg": 200, "001.Black_footed_Albatross/b.jpg": 1},
        "val": {"001.Black_footed_Albatross/c.jpg": 1},
        "test": {"200.Common_Yellowthroat/d.jpg": 200},
    })
    ds = build_dataset("cub", str(tmp_path))
    assert ds.classnames == ["Black footed Albatross", "Common Yellowthroat"]
    assert [(os.path.basename(d.impath), d.label) for d in ds.train] == [("a.jpg", 1), ("b.jpg", 0)]
    assert ds.train[0].impath == str(ddir / "images" / "200.Common_Yellowthroat" / "a.jpg")
    assert [d.label for d in ds.val] == [0] and [d.label for d in ds.test] == [1]


def test_fgvc_flat_folder_override_and_errors(tmp_path):
    ddir = tmp_path / "my_cars"
    _write_fgvc(str(ddir), "", {"train": {"cars_train/1.jpg": 7, "cars_train/2.jpg": 3}, "val": {},
                                "test": {"cars_test/3.jpg": 7}})
    with pytest.raises(ValueError, match="pass dataset_dir="):
        build_dataset("stanford_cars_fgvc", str(tmp_path))
    ds = build_dataset("stanford_cars_fgvc", str(tmp_path), dataset_dir="my_cars")
    assert ds.classnames == ["3", "7"]  # one shared folder: the class ids as names
    assert [d.label for d in ds.train] == [1, 0] and ds.val == []
    assert build_dataset("stanford_cars_fgvc", "/nonexistent", dataset_dir=str(ddir)).train == ds.train
    with open(ddir / "test.json", "w") as f:
        json.dump({"cars_test/3.jpg": 9}, f)
    with pytest.raises(ValueError, match=r"test.json uses class ids \[9\]"):
        build_dataset("stanford_cars_fgvc", str(tmp_path), dataset_dir="my_cars")
    os.remove(ddir / "val.json")
    with pytest.raises(ValueError, match=re.escape(f"missing split file {ddir / 'val.json'}")):
        build_dataset("stanford_cars_fgvc", str(tmp_path), dataset_dir="my_cars")
