"""Registry and the errors users meet first: unknown name, wrong root, missing split file or image."""

import json
import os
import re

import pytest
from fake_coop import make_fake_coop

from vpeft.datasets import DatasetSplits, build_dataset, list_datasets, register_dataset


def test_unknown_name_lists_the_datasets():
    with pytest.raises(ValueError, match="unknown dataset 'caltech'; registered datasets: caltech101, .*vtab1k"):
        build_dataset("caltech", "/tmp")
    for name in ("imagefolder", "imagenet", "imagenet_a", "imagenet_r", "imagenet_sketch", "imagenetv2", "vtab1k",
                 "cub", "nabirds", "oxford_flowers_fgvc", "stanford_dogs", "stanford_cars_fgvc"):
        assert name in list_datasets()


def test_wrong_root_names_the_expected_path(tmp_path):
    with pytest.raises(ValueError, match=re.escape(f"expected the dataset directory {tmp_path}/caltech-101")):
        build_dataset("caltech101", str(tmp_path))
    make_fake_coop(tmp_path, "caltech101", per_class=(1, 1, 1))
    # Passing the dataset folder itself instead of its parent gets a hint.
    with pytest.raises(ValueError, match=re.escape(f"pass its parent {tmp_path}")):
        build_dataset("caltech101", str(tmp_path / "caltech-101"))


def test_missing_split_file_is_named(tmp_path):
    fake = make_fake_coop(tmp_path, "eurosat", per_class=(1, 1, 1))
    os.remove(fake.split_path)
    with pytest.raises(ValueError, match=re.escape(f"missing split file {fake.split_path}")):
        build_dataset("eurosat", str(tmp_path))
    fake = make_fake_coop(tmp_path, "fgvc_aircraft", per_class=(1, 1, 1))
    os.remove(os.path.join(fake.dataset_dir, "images_variant_val.txt"))
    with pytest.raises(ValueError, match="images_variant_val.txt"):
        build_dataset("fgvc_aircraft", str(tmp_path))


def test_missing_image_and_malformed_split_are_named(tmp_path):
    fake = make_fake_coop(tmp_path, "food101", per_class=(2, 1, 1))
    os.remove(fake.test[0][0])
    with pytest.raises(ValueError, match=f"(?s)1 image file.*missing.*{re.escape(fake.test[0][0])}"):
        build_dataset("food101", str(tmp_path))
    with open(fake.split_path, "w") as f:
        json.dump({"train": [["a.png", 0]], "val": [], "test": []}, f)
    with pytest.raises(ValueError, match=r"\['train'\]\[0\] should be \[relpath, label, classname\]"):
        build_dataset("food101", str(tmp_path))


def test_unknown_aircraft_variant_names_file_and_line(tmp_path):
    fake = make_fake_coop(tmp_path, "fgvc_aircraft", classes=("707-320", "Boeing 717"), per_class=(1, 1, 1))
    path = os.path.join(fake.dataset_dir, "images_variant_test.txt")
    with open(path, "a") as f:
        f.write("1234567 Concorde\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: variant 'Concorde'")):
        build_dataset("fgvc_aircraft", str(tmp_path))


def test_register_custom_dataset():
    @register_dataset("toy_for_registry_test")
    def toy(root, n=2):
        return DatasetSplits("toy_for_registry_test", [], [], [], [str(i) for i in range(n)], root=root)

    assert build_dataset("toy_for_registry_test", "/x", n=3).classnames == ["0", "1", "2"]
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("toy_for_registry_test")(lambda root: None)
