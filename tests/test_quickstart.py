"""``vpeft quickstart``: the --fast run end to end (results.json structure, PNG, cache) and the idx reader."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest
import torch

from vpeft import quickstart
from vpeft.datasets import fashion_mnist as fmnist

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _idx_bytes(array: np.ndarray, magic: int) -> bytes:
    # big-endian header: magic (0x0000 + type code 0x08 + ndim), then one uint32 per dimension, then the bytes
    return np.array([magic, *array.shape], dtype=">u4").tobytes() + array.astype(np.uint8).tobytes()


def _check_results(out: str, n_seeds: int, shots: list[int], min_methods: int) -> dict:
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    assert res["shots"] == shots and len(res["seeds"]) == n_seeds
    assert res["backbone"]["weights"] == "self-pretrained"
    assert len(res["methods"]) >= min_methods
    for name, row in res["methods"].items():
        assert set(row["accuracy"]) == {str(k) for k in shots}, name
        assert row["trainable_params"] > 0
        for cell in row["accuracy"].values():
            assert len(cell["per_seed"]) == n_seeds
            assert all(0.0 <= a <= 1.0 for a in cell["per_seed"])
            assert cell["mean"] == pytest.approx(float(np.mean(cell["per_seed"])), abs=1e-3)
    with open(os.path.join(out, "accuracy_vs_shots.png"), "rb") as f:
        png = f.read()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000
    return res


def test_fast_run_writes_results_and_plot(tmp_path, capsys):
    out, cache = str(tmp_path / "out"), str(tmp_path / "cache")
    assert quickstart.main(["--fast", "--out", out, "--cache-dir", cache, "--offline"]) == 0
    res = _check_results(out, n_seeds=1, shots=[1, 4], min_methods=9)
    names = set(res["methods"])
    for expected in ("untrained + linear probe", "linear probe", "full fine-tuning", "VPT-deep", "SSF", "LoRA",
                     "Block-LoRA", "LST", "UniPT"):
        assert any(n.startswith(expected) for n in names), expected
    # the linear probes train the head only; full fine-tuning trains everything
    assert res["methods"]["linear probe"]["trainable_params"] < res["methods"]["LoRA (r=4, q,v)"]["trainable_params"]
    assert res["methods"]["full fine-tuning"]["trainable_params"] > 10 * res["methods"]["SSF"]["trainable_params"]
    printed = capsys.readouterr().out
    assert "data: " in printed and res["data"]["source"] in printed
    assert "self-pretrained" in printed and os.path.abspath(os.path.join(out, "results.json")) in printed
    assert res["backbone"]["pretraining"]["cached"] is False
    assert os.path.isfile(res["backbone"]["checkpoint"]) and res["backbone"]["checkpoint"].startswith(cache)


def test_digits_fallback_and_cache_reuse(tmp_path, capsys):
    out, cache = str(tmp_path / "out"), str(tmp_path / "cache")
    argv = ["--fast", "--data", "digits", "--out", out, "--cache-dir", cache, "--shots", "2", "--seeds", "0", "1",
            "--methods", "linear probe", "LoRA"]
    assert quickstart.main(argv) == 0
    first = _check_results(out, n_seeds=2, shots=[2], min_methods=3)
    assert first["data"]["name"] == "digits" and "digits" in first["data"]["source"]
    assert first["backbone"]["arch"]["img_size"] == 8
    capsys.readouterr()
    assert quickstart.main(argv) == 0
    second = _check_results(out, n_seeds=2, shots=[2], min_methods=3)
    assert second["backbone"]["pretraining"]["cached"] is True
    assert "reused from cache" in capsys.readouterr().out
    # same shots, seeds and checkpoint: the same accuracies
    for name in first["methods"]:
        assert first["methods"][name]["accuracy"] == second["methods"][name]["accuracy"]


def test_shots_are_nested_and_disjoint_from_validation():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, size=(400, 8, 8)).astype(np.float64)
    y = np.repeat(np.arange(10), 40)
    data = quickstart.Data(quickstart._to_tensor(x, 255.0), torch.from_numpy(y),
                           quickstart._to_tensor(x[:100], 255.0), torch.from_numpy(y[:100]),
                           "toy", "toy", tuple(map(str, range(10))))
    task = quickstart.make_task(data, quickstart.FAST, "val")
    x1, _ = task.shots(1, seed=3)
    x4, y4 = task.shots(4, seed=3)
    assert (y4.bincount() == 4).all()
    assert all(any((a == b).all() for b in x4) for a in x1)  # the 1-shot images are among the 4-shot images
    assert not any((a == b).all() for a in x4 for b in task.x_eval)  # shots never come from validation


def test_read_idx_roundtrip(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    labels = np.array([7, 1], dtype=np.uint8)
    (tmp_path / "img-idx3-ubyte").write_bytes(_idx_bytes(images, 2051))
    with gzip.open(tmp_path / "lab-idx1-ubyte.gz", "wb") as f:
        f.write(_idx_bytes(labels, 2049))
    got = fmnist.read_idx(str(tmp_path / "img-idx3-ubyte"))
    assert got.dtype == np.uint8 and got.shape == (2, 3, 4) and np.array_equal(got, images)
    assert np.array_equal(fmnist.read_idx(str(tmp_path / "lab-idx1-ubyte.gz")), labels)


@pytest.mark.parametrize("content, match", [
    (b"\x00\x00\x08", "not an idx file"),
    (b"PK\x03\x04" + b"\x00" * 16, "not an idx file"),
    (np.array([2051, 2, 3, 4], dtype=">u4").tobytes() + b"\x00" * 5, "payload"),
    (np.array([2051, 2], dtype=">u4").tobytes(), "truncated idx header"),
])
def test_read_idx_rejects_bad_files_naming_them(tmp_path, content, match):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match) as e:
        fmnist.read_idx(str(path))
    assert str(path) in str(e.value)


def test_missing_files_error_lists_searched_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(fmnist, "DEBIAN_DIR", str(tmp_path / "nowhere"))
    monkeypatch.delenv("VPEFT_FASHION_MNIST", raising=False)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        fmnist.load_fashion_mnist(cache_dir=str(tmp_path / "cache"))
