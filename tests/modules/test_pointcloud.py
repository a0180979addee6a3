"""PointCloudClassifier (vpeft.modules.pointcloud): a ``vpeft fit`` on a synthetic dataset in the ModelNet txt layout
(accuracy improves over the untrained model, Point-PEFT's memory bank is built before training, ``vpeft test``
reloads the adapter-only checkpoint), voting against a hand-averaged expectation, the adapter's save / load."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("lightning")

from vpeft.datasets.pointcloud import scale_translate  # noqa: E402
from vpeft.modules.pointcloud import PointCloudClassifier  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TINY = dict(num_group=16, group_size=16, embed_dim=64, depth=2, num_heads=4, drop_path_rate=0.0,
            head_style="point_bert", head_dropout=0.0)
CLASSES = ["ball", "disk", "rod"]


def shape_cloud(kind: str, rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` points ``x,y,z,nx,ny,nz`` filling a ball (3-D), a flat disk (2-D) or a thin rod (1-D); normals zero."""
    if kind == "ball":
        p = rng.normal(size=(n, 3))
        p *= rng.uniform(0, 1, (n, 1)) ** (1 / 3) / np.linalg.norm(p, axis=1, keepdims=True)
    elif kind == "disk":
        p = rng.normal(size=(n, 3)) * np.array([1.0, 0.02, 1.0])
    else:
        p = np.concatenate([rng.uniform(-1, 1, (n, 1)), rng.normal(0, 0.03, (n, 2))], axis=1)
    p = p * rng.uniform(0.7, 1.3) + rng.normal(0, 0.1, 3)
    return np.concatenate([p, np.zeros_like(p)], axis=1)


def write_modelnet_txt(root: Path, n_train: int = 12, n_test: int = 6, points: int = 300, seed: int = 0) -> None:
    """The ``modelnet40_normal_resampled`` layout with the 3 classes above (lists named modelnet40_* as the reader
    expects)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "modelnet40_shape_names.txt").write_text("\n".join(CLASSES) + "\n")
    lists = {"train": [], "test": []}
    for c in CLASSES:
        (root / c).mkdir(exist_ok=True)
        for i in range(n_train + n_test):
            sid = f"{c}_{i + 1:04d}"
            np.savetxt(root / c / f"{sid}.txt", shape_cloud(c, rng, points), fmt="%.6f", delimiter=",")
            lists["train" if i < n_train else "test"].append(sid)
    for split, ids in lists.items():
        (root / f"modelnet40_{split}.txt").write_text("\n".join(ids) + "\n")


def _card(out: Path, stage: str) -> dict:
    paths = sorted(glob.glob(str(out / "lightning_logs" / "version_*" / f"result_card_{stage}.json")))
    assert paths, f"no {stage} card under {out}"
    with open(paths[-1]) as f:
        return json.load(f)


def test_cli_fit_improves_accuracy_and_reloads(tmp_path):
    from vpeft.modules.lightning_cli import run

    root = tmp_path / "modelnet"
    write_modelnet_txt(root)
    common = ["-c", str(REPO / "configs/trainer/cpu.yaml"),
              "-c", str(REPO / "configs/pointcloud/point_mae_tiny_cpu.yaml"),
              "--data.init_args.root", str(root), "--trainer.enable_progress_bar=false",
              "--trainer.enable_model_summary=false", "--trainer.log_every_n_steps=1"]
    run(["validate", *common, "--trainer.default_root_dir", str(tmp_path / "untrained")])
    before = _card(tmp_path / "untrained", "validate")["metrics"]["val/acc"]
    run(["fit", *common, "--trainer.default_root_dir", str(tmp_path / "fit")])
    fit = _card(tmp_path / "fit", "fit")
    after = fit["metrics"]["val/acc"]
    # 3 balanced classes: chance is 1/3; the untrained head sits near it.
    assert after >= 0.75 and after > before + 0.3, (before, after)
    assert fit["config"]["model"]["class_path"].endswith("PointCloudClassifier") and fit["manifest"]["hash"]

    # Adapter-only checkpoint: LoRA factors and the head, no frozen backbone tensor.
    last = Path(fit["checkpoints"]["dir"]) / "last.ckpt"
    keys = set(torch.load(last, weights_only=True, map_location="cpu")["state_dict"])
    assert any("lora" in k for k in keys) and any(".head." in k for k in keys)
    assert not any(k.endswith("attn.qkv.weight") or "encoder.first_conv" in k for k in keys)

    # `vpeft test` from the adapter-only checkpoint: single-view and 3-vote accuracy on the untouched test split.
    run(["test", *common, "--trainer.default_root_dir", str(tmp_path / "test"), "--ckpt_path", str(last)])
    metrics = _card(tmp_path / "test", "test")["metrics"]
    assert metrics["test/acc"] >= 0.7 and metrics["test/vote_acc"] >= 0.7, metrics

    # Adapter directory: reload into a fresh task, same logits; save again and reload bit-identically.
    adapter = glob.glob(str(tmp_path / "fit" / "**" / "adapter"), recursive=True)
    assert adapter, "no exported adapter directory"
    task = PointCloudClassifier("point_mae:base", num_classes=3, backbone_kwargs=dict(TINY), adapter=adapter[0],
                                init_seed=1, votes=3)
    task.configure_model()
    task.eval()
    from vpeft.datasets.pointcloud import PointCloudDataModule

    dm = PointCloudDataModule(root=str(root), num_points=128, batch_size=18)
    dm.setup("test")
    x, y = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        logits = task(x)
    assert (logits.argmax(-1) == y).float().mean() >= 0.7
    task.save_adapter(str(tmp_path / "resaved"))
    again = PointCloudClassifier("point_mae:base", num_classes=3, backbone_kwargs=dict(TINY),
                                 adapter=str(tmp_path / "resaved"), init_seed=1)
    again.configure_model()
    again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), logits, rtol=0, atol=0)


def test_voting_is_the_mean_over_augmented_views():
    task = PointCloudClassifier("point_mae:base", num_classes=5, backbone_kwargs=dict(TINY), methods=[], votes=4,
                                init_seed=0)
    task.configure_model()
    task.eval()
    x = torch.randn(2, 256, 3, generator=torch.Generator().manual_seed(3))
    from vpeft.datasets.datamodule import mix_seed

    with torch.no_grad():
        voted = task.vote_logits(x, batch_idx=7)
        # Independent expectation: pass 0 on the clouds as given, passes 1..3 on scale-and-translate copies drawn by
        # hand (s in [2/3, 3/2]^3, t in [-0.2, 0.2]^3 per cloud) from the documented seeds.
        views = [task.model(x)]
        for k in range(1, 4):
            g = torch.Generator().manual_seed(mix_seed(0, 7, k))
            s = torch.rand(2, 1, 3, generator=g) * (1.5 - 2 / 3) + 2 / 3
            t = (torch.rand(2, 1, 3, generator=g) * 2 - 1) * 0.2
            views.append(task.model(x * s + t))
        want = torch.stack(views).mean(0)
        torch.testing.assert_close(voted, want, rtol=1e-5, atol=1e-5)
        # Voting differs from the single view only through the augmentation: with one vote it is the single view.
        task.votes = 1
        torch.testing.assert_close(task.vote_logits(x), task(x), rtol=0, atol=0)
        assert not torch.allclose(voted, task(x))
    # scale_translate touches xyz only and keeps normals.
    cloud = torch.randn(10, 6)
    out = scale_translate(cloud, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out[:, 3:], cloud[:, 3:])


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="point backbone"):
        PointCloudClassifier("timm:vit_tiny_patch16_224", num_classes=3)
    with pytest.raises(ValueError, match="votes must be an int >= 1"):
        PointCloudClassifier(num_classes=3, votes=0)
    with pytest.raises(ValueError, match="vote_stages"):
        PointCloudClassifier(num_classes=3, vote_stages=["train"])
    with pytest.raises(ValueError, match="label_smoothing"):
        PointCloudClassifier(num_classes=3, label_smoothing=1.5)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        PointCloudClassifier(num_classes=0)


def test_paper_presets_parse_with_their_data_module(tmp_path):
    from lightning.pytorch import LightningDataModule

    from vpeft.datasets.pointcloud import PointCloudDataModule
    from vpeft.modules.base import PeftTask
    from vpeft.modules.lightning_cli import VpeftCLI

    for name, n_cls, groups in (("point_mae_modelnet40_point_peft", 40, 64), ("point_mae_scanobjectnn_idpt", 15, 128),
                                ("point_mae_modelnet40_lora", 40, 64), ("point_mae_scanobjectnn_dapt", 15, 128)):
        argv = ["-c", str(REPO / "configs/trainer/cpu.yaml"), "-c", str(REPO / f"configs/pointcloud/{name}.yaml"),
                "--trainer.logger=false", "--trainer.default_root_dir", str(tmp_path)]
        root = tmp_path / "modelnet"
        if "modelnet" in name and not root.exists():
            write_modelnet_txt(root, n_train=2, n_test=1, points=8)
            lines = (root / "modelnet40_shape_names.txt").read_text().split()
            (root / "modelnet40_shape_names.txt").write_text("\n".join(lines + [f"c{i}" for i in range(37)]) + "\n")
        if "modelnet" in name:
            argv += ["--data.init_args.root", str(root)]
        cli = VpeftCLI(PeftTask, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
                       auto_configure_optimizers=False, args=argv)
        task, dm = cli.model, cli.datamodule
        assert isinstance(task, PointCloudClassifier) and isinstance(dm, PointCloudDataModule)
        assert task.num_classes == n_cls and task.backbone_kwargs["num_group"] == groups and task.votes == 10
        assert task.label_smoothing == 0.0 and dm.batch_size == 32
        if "dapt" in name:  # the official optimiser's extra tensors
            assert task.trainable_extra == ["cls_token", "cls_pos"] and cli.trainer.gradient_clip_val == 10.0


def test_point_peft_memory_bank_is_built_when_fit_starts_and_restored(tmp_path):
    from lightning.pytorch import Trainer

    import vpeft
    from vpeft.datasets.pointcloud import PointCloudDataModule
    from vpeft.methods.point_peft import build_memory_bank

    root = tmp_path / "modelnet"
    write_modelnet_txt(root, n_train=4, n_test=1, points=64)

    def task() -> PointCloudClassifier:
        cfg = vpeft.PointPEFTConfig(num_tokens=2, adapter_dim=4, k=4, top_k=3)  # bank_size 0: no bank yet
        return PointCloudClassifier(num_classes=3, backbone_kwargs=dict(TINY), methods=[cfg], init_seed=0, votes=1)

    def dm() -> PointCloudDataModule:
        # 12 training clouds, 3 carved out for validation (one per class): the bank holds the other 9.
        return PointCloudDataModule(root=str(root), num_points=64, val_fraction=0.25, batch_size=4, augment=[],
                                    manifest_dir=str(tmp_path / "manifests"))

    t = task()
    trainer = Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(tmp_path), limit_val_batches=0)
    trainer.fit(t, datamodule=dm())
    bank = t.model.shared["point_peft"]
    assert bool(bank.built) and bank.memory.shape == (9, 64)
    assert t.hparams["methods"][0]["init_args"]["bank_size"] == 9 and t.model.configs[0].bank_size == 9
    # Independent expectation: the bank of the frozen backbone's features of the same 9 clouds (order aside), here
    # recomputed with the method's own builder on a plain copy of the training set (no augmentation).
    d = dm()
    d.setup("fit")
    ref = task()
    ref.configure_model()
    # Same init_seed, same frozen backbone; the bank is computed with all adapters disabled.
    xs = torch.stack([d.train_set[i][0] for i in range(len(d.train_set))])
    build_memory_bank(ref.model, [xs])
    got = sorted(map(tuple, bank.memory.tolist()))
    want = sorted(map(tuple, ref.model.shared["point_peft"].memory.tolist()))
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-5)

    # The checkpoint carries the bank; a task built from a config with bank_size=0 resizes it before loading.
    ckpt = tmp_path / "bank.ckpt"
    trainer.save_checkpoint(str(ckpt))
    fresh = task()
    fresh.configure_model()
    assert fresh.model.shared["point_peft"].memory is None
    state = torch.load(ckpt, weights_only=True, map_location="cpu")
    fresh.on_load_checkpoint(state)
    fresh.load_state_dict(state["state_dict"])
    torch.testing.assert_close(fresh.model.shared["point_peft"].memory, bank.memory)
    assert bool(fresh.model.shared["point_peft"].built) and fresh.model.configs[0].bank_size == 9
    # A second fit does not rebuild a built bank.
    before = bank.memory.clone()
    t.on_fit_start()
    torch.testing.assert_close(t.model.shared["point_peft"].memory, before, rtol=0, atol=0)
