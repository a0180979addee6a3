"""The benchmark suite measures what it says: saved-for-backward bytes counted once per live storage, FLOPs that
match the ViT formula with attention included, and one JSON row per method with exactly the documented keys."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import methods as bench
from benchmarks._measure import LiveSavedCounter

KEYS = {"method", "model", "batch_size", "threads", "saved_bytes", "train_flops", "infer_flops", "merged_infer_flops",
        "step_time", "trainable_params", "adapter_bytes"}


def test_saved_counter_counts_each_storage_once_and_excludes_resident():
    a = torch.randn(1000, requires_grad=True)
    with LiveSavedCounter(set()) as c:
        y = (a * a).sum()  # mul saves `a` twice (self and other): one storage of 4,000 bytes
    assert c.tensors == 2 and c.live_acts() == 4000
    with LiveSavedCounter({a.untyped_storage().data_ptr()}) as c:
        y = (a * a).sum()
    assert c.live_acts() == 0 and c.live_total() == 4000  # resident: in the total, not in the activations
    b = torch.randn(10, 1000)
    with LiveSavedCounter(set()) as c:
        y = (b.exp() * a).sum()  # a's gradient needs exp(b) (40,000 B); nothing needs a (exp(b) has no gradient)
    assert c.live_acts() == 40000
    del y


def _vit_flops(batch: int, tokens: int, patches: int, width: int, depth: int, heads: int, mlp: int, patch_in: int,
               classes: int) -> int:
    """Forward FLOPs (2 per multiply-add) of a pre-norm ViT's matmuls and patch convolution."""
    head_dim = width // heads
    block = (2 * tokens * width * 3 * width + 2 * 2 * heads * tokens * tokens * head_dim
             + 2 * tokens * width * width + 2 * 2 * tokens * width * mlp)
    return batch * (2 * patches * patch_in * width + depth * block + 2 * width * classes)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    pytest.importorskip("timm")
    out = tmp_path_factory.mktemp("bench") / "sub" / "out.json"
    rows = bench.main(["--model", "timm:vit_tiny_patch16_224", "--img-size", "32", "--batch-size", "2", "--reps", "1",
                       "--threads", "1", "--methods", "linear_probe", "lora", "ssf", "lst", "unipt",
                       "--json", str(out)])
    return rows, json.loads(out.read_text()), json.loads(out.with_name("out.ratios.json").read_text())


def test_rows_have_exactly_the_documented_keys(tiny_run):
    rows, written, side = tiny_run
    assert written == rows
    assert [r["method"] for r in rows] == ["full_ft", "linear_probe", "lora", "lst", "ssf", "unipt"]
    for r in rows:
        assert set(r) == KEYS, r["method"]
        assert (r["model"], r["batch_size"], r["threads"]) == ("timm:vit_tiny_patch16_224", 2, 1)
        assert r["step_time"] > 0 and r["adapter_bytes"] > 0
    assert {r["method"] for r in side["ratios"]} == {r["method"] for r in rows}


def test_numbers_match_independent_expectations(tiny_run):
    import timm

    rows = {r["method"]: r for r in tiny_run[0]}
    # 32 px, patch 16: 4 patches + class token; ViT-Ti: width 192, 12 blocks, 3 heads, MLP 768; 100 classes.
    expected = _vit_flops(batch=2, tokens=5, patches=4, width=192, depth=12, heads=3, mlp=768, patch_in=3 * 16 * 16,
                          classes=100)
    assert rows["full_ft"]["infer_flops"] == expected
    for name in ("lora", "ssf"):  # mergeable: merged inference is exactly the plain backbone's
        assert rows[name]["merged_infer_flops"] == expected
    for name in ("full_ft", "linear_probe", "lst", "unipt"):
        assert rows[name]["merged_infer_flops"] is None
    # training = forward + backward; full fine-tuning's backward computes input and weight gradients (2x forward,
    # except the patch conv's input gradient, which nothing needs)
    patch_fwd = 2 * 2 * 4 * 768 * 192
    assert rows["full_ft"]["train_flops"] == 3 * expected - patch_fwd
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=100)
    assert rows["full_ft"]["trainable_params"] == sum(p.numel() for p in model.parameters())
    assert rows["linear_probe"]["trainable_params"] == 192 * 100 + 100
    # side-tuning never backpropagates through the backbone; LoRA does
    full = rows["full_ft"]["saved_bytes"]
    assert rows["lst"]["saved_bytes"] < 0.15 * full and rows["unipt"]["saved_bytes"] < 0.15 * full
    assert rows["linear_probe"]["saved_bytes"] < rows["lst"]["saved_bytes"] < rows["lora"]["saved_bytes"] < full


def test_adapter_family_rows(tmp_path):
    """Every adapter-family, mask and sparse method gets a benchmark row; NOLA, mask tuning and SPT merge to exactly
    the backbone's FLOPs, the others (nonlinear adapters) report no merged cost and add inference FLOPs."""
    pytest.importorskip("timm")
    methods = ["adaptformer", "mosa", "compacter", "nola", "earth_adapter", "mask", "spt"]
    rows = bench.main(["--model", "timm:vit_tiny_patch16_224", "--img-size", "32", "--batch-size", "2", "--reps", "1",
                       "--threads", "1", "--methods", "linear_probe", *methods, "--set", "spt.budget=20000",
                       "--json", str(tmp_path / "out.json")])
    by = {r["method"]: r for r in rows}
    assert set(methods) <= set(by)
    plain = by["full_ft"]["infer_flops"]
    for m in ("nola", "mask", "spt"):  # weight deltas and masks merge: exactly the backbone's FLOPs
        assert by[m]["merged_infer_flops"] == plain, m
    # SPT (budget 20,000 here: ViT-Ti cannot take the 400k default, see its error) trains exactly the budget + head
    assert by["spt"]["trainable_params"] == 20_000 + by["linear_probe"]["trainable_params"]
    for m in ("adaptformer", "mosa", "compacter", "earth_adapter"):
        assert by[m]["merged_infer_flops"] is None and by[m]["infer_flops"] > plain, m
    # MoSA at inference is one dense adapter of AdaptFormer's size: the same FLOPs, the same parameter count.
    assert by["mosa"]["infer_flops"] == by["adaptformer"]["infer_flops"]
    assert by["mosa"]["trainable_params"] == by["adaptformer"]["trainable_params"]


def test_segmentation_metrics_benchmark_row(capsys):
    """The HD95 benchmark prints one JSON row whose scores are vpeft.metrics' on the same volumes."""
    pytest.importorskip("scipy")
    from benchmarks import segmentation_metrics as seg
    from vpeft.metrics import case_scores

    row = seg.main(["--depth", "8", "--size", "64", "--repeats", "1"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == row
    pred, gt = seg.volumes(8, 64)
    dice, hd = case_scores(pred, gt, 3)
    assert row["dice"] == [round(float(d), 4) for d in dice] and row["hd95"] == [round(float(h), 4) for h in hd]
    assert row["hd95_class1_voxels"] == row["hd95"][0] and row["hd95_seconds"] >= 0
