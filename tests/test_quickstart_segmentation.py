"""``vpeft quickstart --task segmentation``: the --fast run end to end, split, masks and checkpoint format."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import vpeft
from vpeft import quickstart_segmentation as qs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EXPECTED = ("self-pretrained, no fine-tuning", "untrained SAM, full", "decoder only", "LoRA r=4 q,v + decoder (SAMed)",
            "SSF + decoder", "AdaptFormer + decoder", "DoRA r=4 q,v + auto prompts + decoder (MapSAM)")


def _table_cells(printed: str, names) -> dict[str, list[str]]:
    # the printed table rows: method name, then its cells separated by whitespace
    rows = {}
    for line in printed.splitlines():
        for name in names:
            if line.startswith(name + "  "):
                rows[name] = line[len(name):].split()
    return rows


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("out"))
    cache = str(tmp_path_factory.mktemp("cache"))
    # synthetic data: the test must not depend on scikit-image being installed; one thread keeps it predictable
    argv = ["--fast", "--data", "synthetic", "--out", out, "--cache-dir", cache, "--threads", "1"]
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert qs.main(argv) == 0
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    return res, buf.getvalue(), out, cache, argv


def test_fast_run_outputs_methods_and_table_match_json(fast_run):
    res, printed, out, cache, _ = fast_run
    assert res["task"] == "segmentation" and res["shots"] == [1] and res["seeds"] == [0]
    assert res["backbone"]["weights"] == "self-pretrained" and res["backbone"]["id"] == "sam:vit_b"
    assert res["data"]["name"] == "synthetic" and "SYNTHETIC" in res["data"]["source"]
    assert tuple(res["methods"]) == EXPECTED
    rows = res["methods"]
    for name, row in rows.items():
        for key in ("dice", "miou"):
            cell = row[key]["1"]
            assert len(cell["per_seed"]) == 1 and 0.0 <= cell["per_seed"][0] <= 1.0, (name, key)
            assert cell["mean"] == pytest.approx(cell["per_seed"][0], abs=1e-4) and cell["std"] == 0.0
    # trainable parameters: none without training; decoder-only < every adapter + decoder < full
    dec = rows["decoder only"]["trainable_params"]
    assert rows["self-pretrained, no fine-tuning"]["trainable_params"] == 0
    for name in ("LoRA r=4 q,v + decoder (SAMed)", "SSF + decoder", "AdaptFormer + decoder"):
        assert dec < rows[name]["trainable_params"] < rows["untrained SAM, full"]["trainable_params"], name
    # LoRA r=4 on q and v of every block: 2 targets * depth * r * (d_in + d_out), independent formula
    d, depth = res["backbone"]["arch"]["embed_dim"], res["backbone"]["arch"]["depth"]
    assert rows["LoRA r=4 q,v + decoder (SAMed)"]["trainable_params"] - dec == 2 * depth * 4 * (d + d)
    # MapSAM: DoRA r=4 on q and v (LoRA's count plus one magnitude per output row) + the prompt generator
    # (1x1 convs 256->64->16->1 with two channel LayerNorms)
    head = (256 * 64 + 64) + 2 * 64 + (64 * 16 + 16) + 2 * 16 + (16 + 1)
    mapsam = rows["DoRA r=4 q,v + auto prompts + decoder (MapSAM)"]["trainable_params"]
    assert mapsam - dec == 2 * depth * (4 * (d + d) + d) + head
    # the printed table carries exactly the JSON's numbers
    cells = _table_cells(printed, EXPECTED)
    assert set(cells) == set(EXPECTED)
    for name, row in rows.items():
        want = [f"{row[k]['1']['mean']:.3f}+-{row[k]['1']['std']:.3f}" for k in ("dice", "miou")]
        want += [f"{row['trainable_params']:,}", f"{row['train_seconds_per_run']:.2f}"]
        assert cells[name] == want, name
    assert qs.format_table(res) in printed
    with open(os.path.join(out, "segmentation_examples.png"), "rb") as f:
        png = f.read()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000
    assert os.path.abspath(os.path.join(out, "results.json")) in printed
    assert res["backbone"]["pretraining"]["cached"] is False
    assert res["backbone"]["checkpoint"].startswith(cache)


def test_checkpoint_is_official_format_and_reused(fast_run, capsys):
    res, _, out, _, argv = fast_run
    path = res["backbone"]["checkpoint"]
    sd = torch.load(path, map_location="cpu", weights_only=True)
    # official SAM keys: encoder MLP named lin1/lin2, the official 4-token decoder
    assert any(k.startswith("image_encoder.blocks.0.mlp.lin1.") for k in sd)
    assert not any(".mlp.fc1." in k for k in sd)
    assert sd["mask_decoder.mask_tokens.weight"].shape[0] == 4
    model = vpeft.create_backbone("sam:vit_b", pretrained=path, **res["backbone"]["arch"])
    assert torch.equal(model.official_state_dict()["mask_decoder.mask_tokens.weight"],
                       sd["mask_decoder.mask_tokens.weight"])
    # second run (one method, to stay fast): cache hit and, with the same shots and seed, the same numbers
    assert qs.main([*argv, "--methods", "SSF"]) == 0
    with open(os.path.join(out, "results.json")) as f:
        again = json.load(f)
    assert again["backbone"]["pretraining"]["cached"] is True and "reused from cache" in capsys.readouterr().out
    assert list(again["methods"]) == ["SSF + decoder"]
    assert again["methods"]["SSF + decoder"]["dice"] == res["methods"]["SSF + decoder"]["dice"]


def test_split_regions_are_disjoint():
    def pixels(corners):
        return {(y + dy, x + dx) for y, x in corners for dy in (0, qs.TILE - 1) for dx in (0, qs.TILE - 1)}

    shots = qs.shot_corners(8, seed=1)
    assert shots[:2] == qs.shot_corners(2, seed=1)  # nested across N
    test = qs._region_tiles(qs.TEST_REGION, 32)
    val = qs._region_tiles(qs.VAL_REGION, 32)
    assert len(test) == 40 and len(val) == 10
    # every tile lies inside its region (corner pixels suffice for axis-aligned squares), regions are disjoint
    for corners, ((r0, r1), (c0, c1)) in ((shots, qs.POOL_REGION), (test, qs.TEST_REGION), (val, qs.VAL_REGION)):
        assert all(r0 <= y < r1 and c0 <= x < c1 for y, x in pixels(corners))
    assert qs.POOL_REGION[0][1] <= qs.VAL_REGION[0][0] and qs.POOL_REGION[1][1] <= qs.TEST_REGION[1][0]


def test_scores_against_hand_counts():
    pred = torch.tensor([[1, 1, 0, 0]])
    target = torch.tensor([[1, 0, 1, 0]])
    s = qs.scores(pred, target)
    # tp=1, fp=1, fn=1, tn=1: Dice 2/4; IoU fg 1/3, bg 1/3
    assert s["dice"] == pytest.approx(0.5) and s["miou"] == pytest.approx(1 / 3)


def test_otsu_and_minority_mask():
    rng = np.random.default_rng(0)
    grey = np.full((40, 40), 50.0) + rng.normal(0, 2, (40, 40))
    grey[10:20, 10:25] = 200.0  # 150 bright pixels: the minority side
    t = qs.otsu_threshold(grey)
    assert 55 < t < 200
    mask = qs.minority_otsu_mask(grey)
    expected = np.zeros((40, 40), np.uint8)
    expected[10:20, 10:25] = 1
    assert np.array_equal(mask, expected)
    # inverted polarity: dark objects on a bright background give the same mask
    assert np.array_equal(qs.minority_otsu_mask(255 - grey), expected)


def test_skimage_coins_mask():
    pytest.importorskip("skimage")
    data = qs.load_skimage()
    m = data.target.mask
    assert data.target.name == "coins" and m.shape == (303, 384)
    from scipy import ndimage as ndi

    # the gallery procedure finds the 24 coins, covering a plausible fraction of the image
    assert ndi.label(m)[1] == 24 and 0.2 < m.mean() < 0.5


def test_bad_arguments_refused(tmp_path):
    with pytest.raises(SystemExit):
        qs.main(["--fast", "--data", "synthetic", "--shots", "0", "--out", str(tmp_path),
                 "--cache-dir", str(tmp_path / "c")])
    with pytest.raises(SystemExit, match="matches none"):
        qs.main(["--fast", "--data", "synthetic", "--methods", "nope", "--out", str(tmp_path),
                 "--cache-dir", str(tmp_path / "c")])
    with pytest.raises(ValueError, match="unknown dataset"):
        qs.load_data("mnist")
    assert not os.path.exists(tmp_path / "c")  # refused before any data, training or cache write
