"""Split manifests: stable hash of the sampled subset, portable ids, atomic writes."""

import hashlib
import json
import os
import shutil

import pytest
from fake_coop import make_fake_coop

from vpeft.datasets import build_dataset, build_manifest, fewshot_splits, read_manifest, write_manifest


@pytest.fixture
def pets(tmp_path):
    make_fake_coop(tmp_path / "data", "oxford_pets", per_class=(6, 4, 1))
    return tmp_path / "data"


def _manifest(root, sample_seed, **meta):
    return build_manifest(fewshot_splits(build_dataset("oxford_pets", str(root)), 2, seed=sample_seed), **meta)


def test_hash_identifies_the_subset(pets, tmp_path):
    a = _manifest(pets, 1, shots=2, seed=1)
    b = _manifest(pets, 1, shots=2, seed=1, method="lora")  # run metadata does not enter the hash
    assert a["hash"] == b["hash"] and a["train"] == b["train"]
    assert _manifest(pets, 2)["hash"] != a["hash"]
    # Ids are relative to the dataset folder: the same data mounted elsewhere gives the same hash.
    moved = tmp_path / "elsewhere"
    shutil.copytree(pets, moved)
    assert _manifest(moved, 1)["hash"] == a["hash"]
    assert all(not os.path.isabs(i) and i.startswith("images/") for i, _ in a["train"])


def test_hash_is_sha256_of_canonical_json(pets):
    m = _manifest(pets, 1, shots=2)
    payload = {"dataset": "oxford_pets", "train": m["train"], "val": m["val"], "test_count": m["test_count"]}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert m["hash"] == hashlib.sha256(canonical.encode()).hexdigest()
    assert m["meta"] == {"shots": 2} and m["test_count"] == 3 and len(m["val"]) == 2 * 3


def test_write_is_atomic_and_read_checks_the_hash(pets, tmp_path):
    path = tmp_path / "out" / "manifest.json"
    m = _manifest(pets, 1, shots=2)
    write_manifest(m, str(path))
    assert read_manifest(str(path)) == m
    assert os.listdir(path.parent) == ["manifest.json"]  # no temporary file left behind

    # A failing write (meta that JSON cannot encode) leaves the previous manifest intact.
    with pytest.raises(TypeError):
        write_manifest({**m, "meta": {"bad": object()}}, str(path))
    assert read_manifest(str(path)) == m and os.listdir(path.parent) == ["manifest.json"]

    tampered = json.loads(path.read_text())
    tampered["train"] = tampered["train"][1:]
    path.write_text(json.dumps(tampered))
    with pytest.raises(ValueError, match="does not match the manifest hash"):
        read_manifest(str(path))
