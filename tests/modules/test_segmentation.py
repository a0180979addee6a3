"""SAMed segmentation (vpeft.modules.segmentation): the loss against hand computations, the class-token decoder against
the official decoder, logit upsampling, the metrics, a CLI fit on a synthetic dataset (Dice improves over the untrained
model, ``vpeft test`` reloads the checkpoint) and the adapter's save / load / merge."""

from __future__ import annotations

import glob
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("lightning")
pytest.importorskip("segment_anything")

from vpeft.modules.segmentation import SamSegmenter, class_token_decoder, segmentation_loss, soft_dice_loss  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TINY = dict(img_size=64, embed_dim=64, depth=2, num_heads=4, window_size=2, global_attn_indexes=(1,))


def tiny_task(num_classes: int = 3, **kw) -> SamSegmenter:
    task = SamSegmenter("sam:vit_b", num_classes=num_classes, backbone_kwargs=dict(TINY), **kw)
    task.configure_model()
    return task


# -- loss ------------------------------------------------------------------------------------------------------------
def test_soft_dice_matches_hand_computation():
    # One image, 2 classes, 2 pixels: p = [[0.8, 0.4], [0.2, 0.6]] (class x pixel), target classes [0, 1].
    probs = torch.tensor([[0.8, 0.4], [0.2, 0.6]]).reshape(1, 2, 1, 2)
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 2, 1, 2)
    s = 1e-5
    # class 0: inter 0.8, sum p^2 = 0.64 + 0.16, sum t^2 = 1; class 1: inter 0.6, sum p^2 = 0.04 + 0.36, sum t^2 = 1
    d0 = 1 - (2 * 0.8 + s) / (0.80 + 1 + s)
    d1 = 1 - (2 * 0.6 + s) / (0.40 + 1 + s)
    assert soft_dice_loss(probs, target).item() == pytest.approx((d0 + d1) / 2, abs=1e-7)
    assert soft_dice_loss(target, target).item() == pytest.approx(0.0, abs=1e-6)


def test_segmentation_loss_weights_and_sigmoid():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 3, 4, 5), torch.randint(0, 3, (2, 4, 5))
    p = logits.exp() / logits.exp().sum(1, keepdim=True)
    ce = -torch.log(p.gather(1, target[:, None])).mean()
    onehot = torch.stack([(target == c).float() for c in range(3)], 1)
    dice = sum(1 - (2 * (p[:, c] * onehot[:, c]).sum() + 1e-5) / ((p[:, c] ** 2).sum() + onehot[:, c].sum() + 1e-5)
               for c in range(3)) / 3
    got = segmentation_loss(logits, target, dice_weight=0.8, ce_weight=0.2)
    assert got.item() == pytest.approx((0.8 * dice + 0.2 * ce).item(), abs=1e-6)
    assert segmentation_loss(logits, target, 0.0, 1.0).item() == pytest.approx(ce.item(), abs=1e-6)
    fg_logit, fg = torch.randn(2, 1, 4, 5), torch.randint(0, 2, (2, 4, 5))
    q = torch.sigmoid(fg_logit[:, 0])
    bce = -(fg * torch.log(q) + (1 - fg) * torch.log(1 - q)).mean()
    sdice = 1 - (2 * (q * fg).sum() + 1e-5) / ((q ** 2).sum() + fg.sum() + 1e-5)
    got = segmentation_loss(fg_logit, fg, 0.5, 0.5, sigmoid=True)
    assert got.item() == pytest.approx((0.5 * sdice + 0.5 * bce).item(), abs=1e-6)
    with pytest.raises(ValueError, match="same size"):
        segmentation_loss(logits, target[:, :2])


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        SamSegmenter("sam:vit_b", num_classes=1)
    with pytest.raises(ValueError, match="SAM backbone"):
        SamSegmenter("timm:vit_tiny_patch16_224", num_classes=2)
    with pytest.raises(ValueError, match="binary_mode='sigmoid' needs num_classes=2"):
        SamSegmenter("sam:vit_b", num_classes=3, binary_mode="sigmoid")
    with pytest.raises(ValueError, match="dice_weight must be a number >= 0"):
        SamSegmenter("sam:vit_b", num_classes=2, dice_weight=-1)
    with pytest.raises(ValueError, match="loss_resolution"):
        SamSegmenter("sam:vit_b", num_classes=2, loss_resolution="full")


# -- decoder and forward ---------------------------------------------------------------------------------------------
def test_class_token_decoder_shares_weights_and_matches_official_prompt_free_decoding():
    import vpeft

    torch.manual_seed(0)
    sam = vpeft.create_backbone("sam:vit_b", **TINY)
    old = {k: v.clone() for k, v in sam.mask_decoder.state_dict().items()}
    new, fresh = class_token_decoder(sam.mask_decoder, 5)
    assert new.num_mask_tokens == 5 and new.mask_tokens.weight.shape == (5, 256)
    want_fresh = {"mask_tokens.weight", "iou_prediction_head.layers.2.weight", "iou_prediction_head.layers.2.bias"}
    want_fresh |= {f"output_hypernetworks_mlps.{i}.layers.{j}.{w}" for i in range(5) for j in range(3)
                   for w in ("weight", "bias")}
    assert set(fresh) == want_fresh
    for k, v in new.state_dict().items():
        if k not in want_fresh:
            torch.testing.assert_close(v, old[k], rtol=0, atol=0)
    # With the official 4 tokens copied in, the task's prompt-free logits are the official decoder's masks:
    # token 0 = the single-mask output, tokens 1..3 = the multimask outputs.
    task = tiny_task(4, methods=[])
    dec = task.sam.mask_decoder
    with torch.no_grad():
        for k, v in dec.state_dict().items():
            v.copy_(old[k])
    task.sam.mask_decoder = dec
    images = torch.rand(2, 3, 64, 64) * 255
    ref = vpeft.create_backbone("sam:vit_b", **TINY)
    ref.load_state_dict({**{k: v for k, v in task.sam.state_dict().items() if not k.startswith("mask_decoder.")},
                         **{f"mask_decoder.{k}": v for k, v in old.items()}})
    with torch.no_grad():
        got = task.low_res_logits(images)
        single = ref(images, multimask_output=False).low_res_masks
        multi = ref(images, multimask_output=True).low_res_masks
    torch.testing.assert_close(got, torch.cat([single, multi], 1), rtol=1e-5, atol=1e-5)


def test_upsampling_crops_the_padded_area():
    task = tiny_task(2, methods=[])
    # Low-res logits over the padded 64x64 square (16x16): class 1 wins in the left half, where a 64x32 image lies;
    # class 0 wins in the zero padding. Cropped correctly, every label pixel is class 1.
    low = torch.zeros(1, 2, 16, 16)
    low[:, 1, :, :8] = 5.0
    low[:, 0, :, 8:] = 5.0
    out = task.upsample(low, (64, 32), (32, 16))
    assert out.shape == (1, 2, 32, 16) and bool((out.argmax(1) == 1).all())
    task.eval()
    with torch.no_grad():
        assert task(torch.rand(1, 3, 64, 32) * 255, (20, 10)).shape == (1, 2, 20, 10)


def test_metrics_against_hand_dice_and_iou():
    task = tiny_task(3, methods=[])
    pred = torch.tensor([[[0, 1, 1, 2], [0, 1, 2, 2]]])
    label = torch.tensor([[[0, 1, 2, 2], [0, 1, 1, 2]]])
    for m in task.metrics["val_"].values():
        m.update(pred, label)
    # class 1: |P|=3, |T|=3, |P&T|=2 -> Dice 2/3, IoU 2/4; class 2: |P|=3, |T|=3, overlap 2 -> same
    dice = task.metrics["val_"]["dice"].compute()
    torch.testing.assert_close(dice, torch.tensor([2 / 3, 2 / 3]))
    assert task.metrics["val_"]["miou"].compute().item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        task._check_labels(torch.tensor([[0, 3]]))
    # Optional HD95 (per image and class): equal to vpeft.metrics.hd95 on each image's class masks; an image where
    # class 1 is absent from the prediction does not enter the mean.
    from vpeft.metrics import hd95

    hd_task = SamSegmenter("sam:vit_b", num_classes=2, hausdorff=True)
    label = torch.zeros(3, 16, 16, dtype=torch.long)
    label[:, 4:8, 4:8] = 1
    label[1, 10:12, 2:5] = 1
    pred = torch.roll(label, 3, dims=2)
    pred[2] = 0
    hd_task.metrics["test_"]["hd95"].update(pred, label)
    want = [hd95((pred[i] == 1).numpy(), (label[i] == 1).numpy()) for i in range(2)]
    assert want[0] == pytest.approx(3.0)
    assert hd_task.metrics["test_"]["hd95"].compute().item() == pytest.approx(sum(want) / 2)


def test_volume_batches_are_scored_per_volume_like_samed():
    """Test batches with volume and slice ids (two 3-slice volumes, slices shuffled across batches) give per-volume
    3-D Dice / HD95 equal to vpeft.metrics.case_scores on the reassembled volumes, averaged over volumes."""
    import numpy as np

    from vpeft.metrics import case_scores

    task = tiny_task(3, methods=[], volume_convention="transunet").eval()
    logged = {}
    task.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 64, 64, generator=g) * 255
    labels = torch.zeros(6, 64, 64, dtype=torch.long)
    labels[:, 10:30, 10:30] = 1
    labels[3:, 40:60, 30:50] = 2  # class 2 only in volume 1
    vol = torch.tensor([0, 0, 0, 1, 1, 1])
    sl = torch.tensor([0, 1, 2, 0, 1, 2])
    order = torch.tensor([4, 0, 2, 5, 1, 3])
    with torch.no_grad():
        preds = task.predict_labels(task(images))
        for chunk in order.split(2):
            task.test_step((images[chunk], labels[chunk], vol[chunk], sl[chunk]), 0)
    task.on_test_epoch_end()
    scores = [case_scores(preds[v * 3:(v + 1) * 3].numpy(), labels[v * 3:(v + 1) * 3].numpy(), 3,
                          convention="transunet") for v in (0, 1)]
    dice = np.mean([s[0] for s in scores], axis=0)
    hd = np.mean([s[1] for s in scores], axis=0)
    assert logged["test/vol_dice"] == pytest.approx(float(dice.mean()))
    assert logged["test/vol_hd95"] == pytest.approx(float(hd.mean()))
    assert logged["test/vol_dice_2"] == pytest.approx(float(dice[1]))
    assert len(task.volumes["test"]) == 0  # reset for the next epoch
    with pytest.raises(ValueError, match="volume_convention"):
        SamSegmenter("sam:vit_b", num_classes=3, volume_convention="medpy")


def test_checkpoint_holds_adapters_decoder_and_no_metric_state():
    task = tiny_task(3)
    keys = set(task.state_dict())
    assert any(".lora_" in k for k in keys) and "model.mask_decoder.mask_tokens.weight" in keys
    assert any(k.startswith("model.prompt_encoder.") for k in keys)
    assert not any(k.startswith("model.image_encoder.") and ".lora" not in k for k in keys)
    assert not any(k.startswith("metrics.") for k in keys)
    # SAMed's LoRA: rank 4 on q and v of each block: 2 targets * depth * r * (d + d).
    lora = sum(p.numel() for n, p in task.named_parameters() if ".lora" in n)
    assert lora == 2 * 2 * 4 * (64 + 64)


# -- training on a synthetic dataset ---------------------------------------------------------------------------------
def synthetic_segmentation(root: Path, n_train: int, seed: int = 0, size: int = 64) -> None:
    """Noise images with one bright disc or square; mask 255 on the shape."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for split, n in (("train", n_train), ("val", 4), ("test", 4)):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "masks").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = rng.normal(60, 20, (size, size, 3))
            cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
            r = int(rng.integers(size // 8, size // 5))
            sel = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) if i % 2 else ((abs(yy - cy) <= r) & (abs(xx - cx) <= r))
            img[sel] = rng.normal(200, 20, (int(sel.sum()), 3))
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / split / "images" / f"{i:03d}.png")
            Image.fromarray((sel * 255).astype(np.uint8)).save(root / split / "masks" / f"{i:03d}.png")


def _card(out: Path, stage: str) -> dict:
    paths = sorted(glob.glob(str(out / "lightning_logs" / "version_*" / f"result_card_{stage}.json")))
    assert paths, f"no {stage} card under {out}"
    with open(paths[-1]) as f:
        return json.load(f)


def fit_preset_improves_dice(tmp_path: Path, preset: str) -> tuple[Path, list[str], dict]:
    """Validate the untrained model, fit 3 epochs with ``configs/experiment/<preset>`` on a synthetic binary dataset
    through the CLI, and check that the validation Dice rose by more than 0.3 to above 0.5.

    Returns:
        ``(data root, the common CLI arguments, the fit's result card)``.
    """
    from vpeft.modules.lightning_cli import run

    root = tmp_path / "data"
    synthetic_segmentation(root, 16)
    common = ["-c", str(REPO / "configs/trainer/cpu.yaml"), "-c", str(REPO / "configs/experiment" / preset),
              "--data.init_args.root", str(root), "--data.init_args.class_map", "{0: 0, 255: 1}",
              "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
              "--trainer.log_every_n_steps=1"]
    run(["validate", *common, "--trainer.default_root_dir", str(tmp_path / "untrained")])
    before = _card(tmp_path / "untrained", "validate")["metrics"]["val/dice"]
    run(["fit", *common, "--trainer.default_root_dir", str(tmp_path / "fit"), "--trainer.max_epochs=3"])
    fit = _card(tmp_path / "fit", "fit")
    after = fit["metrics"]["val/dice"]
    assert after > before + 0.3 and after > 0.5, (before, after)
    return root, common, fit


def test_cli_fit_improves_dice_and_adapter_round_trips(tmp_path):
    from vpeft.modules.lightning_cli import run

    root, common, fit = fit_preset_improves_dice(tmp_path, "sam_samed_tiny_cpu.yaml")
    assert fit["manifest"]["hash"] and fit["config"]["model"]["class_path"].endswith("SamSegmenter")

    # `vpeft test` from the adapter-only checkpoint: the model config comes from the checkpoint.
    last = Path(fit["checkpoints"]["dir"]) / "last.ckpt"
    run(["test", *common, "--trainer.default_root_dir", str(tmp_path / "test"), "--ckpt_path", str(last)])
    assert _card(tmp_path / "test", "test")["metrics"]["test/dice"] > 0.5

    # Adapter directory: reload into a fresh task, then merge (LoRA folds into qkv) == unmerged.
    adapter = Path(fit["checkpoints"]["dir"]).parent / "lightning_logs" / "version_0" / "adapter"
    if not adapter.is_dir():
        adapter = Path(glob.glob(str(tmp_path / "fit" / "**" / "adapter"), recursive=True)[0])
    task = tiny_task(2, adapter=str(adapter), init_seed=1).eval()
    from vpeft.datasets.segmentation import SegmentationDataModule

    dm = SegmentationDataModule(str(root), class_map={0: 0, 255: 1}, image_size=64, batch_size=4)
    dm.setup("test")
    x, y = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        logits = task(x)
        dice_reloaded = _dice(task.predict_labels(logits), y)
        task.model.merge()
        merged = task(x)
        task.model.unmerge()
    torch.testing.assert_close(merged, logits, rtol=1e-5, atol=1e-5)
    assert dice_reloaded > 0.5
    saved = tmp_path / "resaved"
    task.save_adapter(str(saved))
    again = tiny_task(2, adapter=str(saved), init_seed=1).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), logits, rtol=0, atol=0)


def _dice(pred: torch.Tensor, label: torch.Tensor) -> float:
    inter = ((pred == 1) & (label == 1)).sum().item()
    total = (pred == 1).sum().item() + (label == 1).sum().item()
    return 2 * inter / total if total else math.nan


def test_binary_sigmoid_mode_keeps_the_official_decoder():
    task = tiny_task(2, binary_mode="sigmoid", methods=[])
    assert task.new_decoder_tensors == [] and task.sam.mask_decoder.num_mask_tokens == 4
    x, y = torch.rand(2, 3, 64, 64) * 255, torch.randint(0, 2, (2, 64, 64))
    low = task.low_res_logits(x)
    assert low.shape == (2, 1, 16, 16)
    loss = task._step((x, y), "train")
    loss.backward()
    assert task.sam.mask_decoder.mask_tokens.weight.grad is not None


def test_vit_b_preset_parses_with_its_own_defaults(tmp_path):
    from lightning.pytorch import LightningDataModule

    from vpeft.datasets.segmentation import SegmentationDataModule
    from vpeft.modules.base import PeftTask
    from vpeft.modules.lightning_cli import VpeftCLI

    argv = ["-c", str(REPO / "configs/trainer/cpu.yaml"), "-c", str(REPO / "configs/experiment/sam_samed_vit_b.yaml"),
            "--trainer.logger=false", "--trainer.default_root_dir", str(tmp_path)]
    cli = VpeftCLI(PeftTask, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
                   auto_configure_optimizers=False, args=argv)
    task, dm = cli.model, cli.datamodule
    assert isinstance(task, SamSegmenter) and isinstance(dm, SegmentationDataModule)
    assert task.num_classes == 9 and dm.image_size == 512 and dm.format == "npz"
    assert task.backbone_kwargs == {"img_size": 512, "resample_pos_embed": True}  # SAMed's input size
    # The task's and data module's own defaults, not the default task's / FewShotDataModule's carried over.
    assert task.trainable_extra == ["mask_decoder", "prompt_encoder"] and dm.shots == 0
    assert [(c.method, c.r, list(c.targets)) for c in task.methods] == [("lora", 4, ["q", "v"])]
    assert (task.dice_weight, task.ce_weight) == (0.8, 0.2)


def synthetic_synapse(root: Path, n_train: int = 8, volumes: tuple = (3, 2), size: int = 32, seed: int = 0) -> None:
    """SAMed's Synapse layout: ``train/*.npz`` slices and ``test/*.npy.h5`` volumes (image in [0, 1], labels 0..2:
    a bright square is class 1, a dark one class 2)."""
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(seed)

    def slice_pair():
        img = rng.normal(0.4, 0.05, (size, size)).clip(0, 1)
        lab = np.zeros((size, size), np.float32)
        for cls, val in ((1, 0.9), (2, 0.05)):
            y, x = rng.integers(2, size - 12, 2)
            img[y:y + 10, x:x + 10], lab[y:y + 10, x:x + 10] = val, cls
        return img.astype(np.float32), lab

    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    for i in range(n_train):
        img, lab = slice_pair()
        np.savez(root / "train" / f"case0005_slice{i:03d}.npz", image=img, label=lab)
    for v, depth in enumerate(volumes):
        pairs = [slice_pair() for _ in range(depth)]
        with h5py.File(root / "test" / f"case{v:04d}.npy.h5", "w") as f:
            f["image"] = np.stack([p[0] for p in pairs])
            f["label"] = np.stack([p[1] for p in pairs])


def test_cli_synapse_protocol_reports_per_volume_scores(tmp_path):
    """fit on .npz slices, then `vpeft test` on .h5 volumes through the CLI: the card holds SAMed's per-volume 3-D
    Dice / HD95 (and the per-slice metrics), computed at the slices' own resolution."""
    from vpeft.modules.lightning_cli import run

    root = tmp_path / "synapse"
    synthetic_synapse(root)
    common = ["-c", str(REPO / "configs/trainer/cpu.yaml"),
              "-c", str(REPO / "configs/experiment/sam_samed_tiny_cpu.yaml"),
              "--data.init_args.root", str(root), "--data.init_args.format", "npz",
              "--data.init_args.num_classes", "3", "--data.init_args.native_eval_labels", "true",
              "--model.init_args.hausdorff", "true",
              "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    run(["fit", *common, "--trainer.default_root_dir", str(tmp_path / "fit"), "--trainer.max_epochs=1"])
    last = next((tmp_path / "fit").rglob("last.ckpt"))
    run(["test", *common, "--trainer.default_root_dir", str(tmp_path / "test"), "--ckpt_path", str(last)])
    metrics = _card(tmp_path / "test", "test")["metrics"]
    for key in ("test/vol_dice", "test/vol_hd95", "test/vol_dice_1", "test/vol_dice_2", "test/vol_hd95_2",
                "test/dice", "test/hd95"):
        assert key in metrics, sorted(metrics)
    assert 0.0 <= metrics["test/vol_dice"] <= 1.0 and metrics["test/vol_hd95"] >= 0.0
