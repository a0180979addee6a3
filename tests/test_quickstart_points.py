"""``vpeft quickstart --task points``: the --fast run end to end (outputs, table = JSON, official-key checkpoint,
cache) and the synthetic data (determinism, nested shots, disjoint splits, shapes on their surfaces)."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import vpeft
from vpeft import quickstart_points as qp

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EXPECTED = ("untrained + linear probe", "linear probe", "IDPT", "Point-PEFT", "VPT-deep", "LoRA", "DAPT")


def _table_rows(printed: str, shots: list[int]) -> dict[str, tuple[list[tuple[float, float]], int]]:
    # parse the printed table back: name, one "mean+-std" cell per shot count, trainable parameters
    cell = r"\s+(\d\.\d{3})\+-(\d\.\d{3})"
    pattern = re.compile(r"^(.+?)" + cell * len(shots) + r"\s+([\d,]+)\s+[\d.]+\s+\S+$")
    rows = {}
    for line in printed.splitlines():
        m = pattern.match(line)
        if m:
            g = m.groups()
            cells = [(float(g[1 + 2 * i]), float(g[2 + 2 * i])) for i in range(len(shots))]
            rows[g[0].strip()] = (cells, int(g[-1].replace(",", "")))
    return rows


def test_fast_run_outputs_match_the_printed_table(tmp_path, capsys):
    out, cache = str(tmp_path / "out"), str(tmp_path / "cache")
    assert qp.main(["--fast", "--out", out, "--cache-dir", cache]) == 0
    printed = capsys.readouterr().out
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    with open(os.path.join(out, "accuracy_vs_shots.png"), "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    shots = res["shots"]
    assert shots == [1, 2] and res["seeds"] == [0] and res["task"] == "points"
    # labelled synthetic and self-pretrained in the output and the JSON
    assert res["data"]["synthetic"] is True and "SYNTHETIC" in res["data"]["source"] and "SYNTHETIC" in printed
    assert res["backbone"]["weights"] == "self-pretrained" and "self-pretrained" in printed
    assert os.path.abspath(os.path.join(out, "results.json")) in printed
    names = list(res["methods"])
    assert len(names) == len(EXPECTED) and all(n.startswith(e) for n, e in zip(names, EXPECTED))
    # the numbers in the JSON are the ones the table printed, and the means/stds are those of the per-seed values
    table = _table_rows(printed, shots)
    assert set(table) == set(names)
    for name, row in res["methods"].items():
        cells, n_params = table[name]
        assert n_params == row["trainable_params"] > 0
        for k, (mean, std) in zip(shots, cells):
            acc = row["accuracy"][str(k)]
            assert len(acc["per_seed"]) == 1 and 0.0 <= acc["per_seed"][0] <= 1.0
            assert acc["mean"] == pytest.approx(float(np.mean(acc["per_seed"])), abs=1e-4)
            assert (mean, std) == (round(acc["mean"], 3), round(acc["std"], 3))
    m = res["methods"]
    assert m["linear probe"]["trainable_params"] == (2 * qp.FAST.embed_dim + 1) * len(qp.TARGET_SHAPES)
    # LoRA r=4 on q and v: 2 targets x r (C + C) per block, plus the linear head
    c, depth = qp.FAST.embed_dim, qp.FAST.depth
    assert m["LoRA (r=4, q,v)"]["trainable_params"] == depth * 2 * 4 * 2 * c + m["linear probe"]["trainable_params"]


def test_checkpoint_has_official_keys_and_is_reused(tmp_path, capsys):
    out, cache = str(tmp_path / "out"), str(tmp_path / "cache")
    argv = ["--fast", "--out", out, "--cache-dir", cache, "--shots", "1", "--seeds", "0", "1",
            "--methods", "linear probe", "full"]
    assert qp.main(argv) == 0
    with open(os.path.join(out, "results.json")) as f:
        first = json.load(f)
    # full fine-tuning is opt-in: it runs when named and trains every parameter of the loaded backbone plus the head
    assert list(first["methods"]) == ["untrained + linear probe", "linear probe", "full fine-tuning"]
    ckpt = first["backbone"]["checkpoint"]
    assert ckpt.startswith(cache) and first["backbone"]["pretraining"]["cached"] is False
    keys = set(load_file(ckpt))
    assert any(k.startswith("blocks.blocks.0.") for k in keys) and any(k.startswith("cls_head_finetune.") for k in keys)
    assert not any(k.startswith(("blocks.0.", "head.")) for k in keys)
    # the loader reads it back: the encoder equals the file, whatever the new head
    model = vpeft.create_backbone("point_mae:base", pretrained=ckpt, num_classes=3, **first["backbone"]["arch"])
    sd = load_file(ckpt)
    assert torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], sd["blocks.blocks.0.attn.qkv.weight"])
    n_body = sum(v.numel() for k, v in model.named_parameters() if not k.startswith("head."))
    n_lp = first["methods"]["linear probe"]["trainable_params"]
    assert first["methods"]["full fine-tuning"]["trainable_params"] == n_body + n_lp
    capsys.readouterr()
    assert qp.main(argv) == 0
    assert "reused from cache" in capsys.readouterr().out
    with open(os.path.join(out, "results.json")) as f:
        second = json.load(f)
    assert second["backbone"]["pretraining"]["cached"] is True
    for name in first["methods"]:  # same shots, seeds and checkpoint: the same accuracies
        assert first["methods"][name]["accuracy"] == second["methods"][name]["accuracy"], name


def test_synthetic_data_is_deterministic_nested_and_disjoint():
    a = qp.make_data(qp.FAST, seed=5, eval_split="val")
    b = qp.make_data(qp.FAST, seed=5, eval_split="val")
    assert torch.equal(a.x_source, b.x_source) and torch.equal(a.task.x, b.task.x)
    assert not torch.equal(a.x_source, qp.make_data(qp.FAST, seed=6).x_source)
    task = a.task
    x1, _ = task.shots(1, seed=3)
    x4, y4 = task.shots(4, seed=3)
    assert (y4.bincount() == 4).all()
    assert all(any(torch.equal(p, q) for q in x4) for p in x1)  # nested across K
    assert not any(torch.equal(p, q) for p in x4 for q in task.x_eval)  # shots never come from validation
    test = qp.make_data(qp.FAST, seed=5, eval_split="test").task
    assert not any(torch.equal(p, q) for p in task.x for q in test.x_eval)  # test is a separate draw
    # normalised clouds: inside the unit ball (scale <= 1, plus a few jitter std)
    assert a.x_source.shape[1:] == (qp.FAST.num_points, 3) and a.x_source.norm(dim=-1).max() < 1.06


@pytest.mark.parametrize("name, on_surface", [
    ("sphere", lambda p: np.abs(np.linalg.norm(p, axis=1) - 1)),
    ("cube", lambda p: np.abs(np.abs(p / np.abs(p).max(axis=0)).max(axis=1) - 1)),
    ("torus", lambda p: np.abs(np.hypot(np.hypot(p[:, 0], p[:, 1]) - 1, p[:, 2]) - np.hypot(
        np.hypot(p[:, 0], p[:, 1]) - 1, p[:, 2]).mean())),
])
def test_shapes_lie_on_their_surfaces(name, on_surface):
    p = qp.sample_shape(name, 500, np.random.default_rng(0))
    assert on_surface(p).max() < 1e-6
    with pytest.raises(ValueError, match="unknown synthetic shape"):
        qp.sample_shape("blob", 5, np.random.default_rng(0))
