"""The generic imagefolder reader, and the prompt-template / class-name data modules."""

import os
import re

import pytest
from PIL import Image

from vpeft.datasets import COOP_DATASETS, IMAGENET_VARIANTS, build_dataset, templates


def _touch(path, fmt="PNG"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (8, 8)).save(path, format=fmt)


def test_imagefolder_reads_sorted_classes(tmp_path):
    for split, cls, name in [("train", "zebra", "1.png"), ("train", "ant", "2.JPG"), ("train", "ant", "1.jpeg"),
                             ("test", "zebra", "t.png")]:
        _touch(str(tmp_path / split / cls / name), "JPEG" if name.lower().endswith(("jpg", "jpeg")) else "PNG")
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    ds = build_dataset("imagefolder", str(tmp_path))
    assert ds.classnames == ["ant", "zebra"] and ds.val == [] and ds.root == str(tmp_path)
    assert [(os.path.relpath(d.impath, tmp_path), d.label, d.classname) for d in ds.train] == [
        ("train/ant/1.jpeg", 0, "ant"), ("train/ant/2.JPG", 0, "ant"), ("train/zebra/1.png", 1, "zebra")]
    assert [(d.label, d.classname) for d in ds.test] == [(1, "zebra")]

    _touch(str(tmp_path / "val" / "ant" / "v.png"))
    assert [d.label for d in build_dataset("imagefolder", str(tmp_path)).val] == [0]
    _touch(str(tmp_path / "val" / "yak" / "v.png"))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'val' / 'yak'} has no counterpart in train/")):
        build_dataset("imagefolder", str(tmp_path))


def test_imagefolder_missing_train_names_the_path(tmp_path):
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "train"))):
        build_dataset("imagefolder", str(tmp_path))


def test_templates():
    from open_clip import zero_shot_metadata

    assert templates.OPENAI_IMAGENET_TEMPLATES is zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES
    assert len(templates.OPENAI_IMAGENET_TEMPLATES) == 80 and len(templates.IMAGENET_CLASSNAMES) == 1000
    assert templates.CUSTOM_TEMPLATES["oxford_pets"] == "a photo of a {}, a type of pet."
    assert templates.CUSTOM_TEMPLATES["dtd"] == "{} texture."
    assert set(COOP_DATASETS) | set(IMAGENET_VARIANTS) == set(templates.CUSTOM_TEMPLATES)
    assert templates.dataset_prompts("ucf101", ["Apply_Eye_Makeup"]) == ["a photo of a person doing Apply Eye Makeup."]
    assert templates.dataset_template("cub") == "a photo of a {}."
