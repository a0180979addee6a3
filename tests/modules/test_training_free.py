"""TrainingFreeClassifier: features from Lightning passes, closed-form head fitted and tuned on validation only,
checkpoint round trip, test accuracy equal to the head applied by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from open_clip.factory import _MODEL_CONFIGS

import vpeft

lightning = pytest.importorskip("lightning")

TINY = "vpeft-tiny-bpe-tf"
_MODEL_CONFIGS.setdefault(TINY, dict(
    embed_dim=32, vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=8, head_width=16),
    text_cfg=dict(context_length=32, vocab_size=49408, width=32, heads=2, layers=1)))


@pytest.fixture(scope="module")
def coop_root(tmp_path_factory) -> str:
    from fake_coop import make_fake_coop

    root = tmp_path_factory.mktemp("coop_tf")
    make_fake_coop(root, "caltech101", per_class=(8, 4, 6), size=32)
    return str(root)


def _dm(root):
    from vpeft.datasets.datamodule import FewShotDataModule

    return FewShotDataModule("caltech101", root, shots=4, seed=1, batch_size=8, backbone=f"open_clip:{TINY}")


def _trainer(tmp_path, epochs=2):
    from lightning.pytorch import Trainer

    return Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=True,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                   num_sanity_val_steps=0)


@pytest.mark.parametrize("head", ["gda", "tip_adapter"])
def test_fit_searches_on_val_and_test_matches_hand(head, coop_root, tmp_path):
    from vpeft.modules.training_free import TrainingFreeClassifier

    task = TrainingFreeClassifier(f"open_clip:{TINY}", head=head, init_seed=0)
    dm = _dm(coop_root)
    trainer = _trainer(tmp_path)
    trainer.fit(task, dm)
    assert task.head is not None and set(task.search_result) == {"best_params", "best_acc"}
    # the search saw the validation split only: its best accuracy is the logged val/acc
    assert trainer.callback_metrics["val/acc"].item() == pytest.approx(task.search_result["best_acc"])
    out = trainer.test(task, dm)[0]
    # hand: the fitted head on the test images' normalised features
    dm.setup("test")
    hits = n = 0
    with torch.no_grad():
        for x, y in dm.test_dataloader():
            f = F.normalize(task.model.encode_image(x), dim=-1)
            hits += (task.head(f).argmax(-1) == y).sum().item()
            n += len(y)
    assert out["test/acc"] == pytest.approx(hits / n)
    # checkpoint round trip: a fresh task rebuilds the head from the stored tensors
    ckpt = tmp_path / "head.ckpt"
    trainer.save_checkpoint(str(ckpt))
    fresh = TrainingFreeClassifier(f"open_clip:{TINY}", head=head, init_seed=0)
    out2 = _trainer(tmp_path).test(fresh, _dm(coop_root), ckpt_path=str(ckpt))[0]
    assert out2["test/acc"] == pytest.approx(out["test/acc"])


def test_bad_arguments():
    from vpeft.modules.training_free import TrainingFreeClassifier

    with pytest.raises(ValueError, match="head must be one of"):
        TrainingFreeClassifier(f"open_clip:{TINY}", head="knn")
    with pytest.raises(ValueError, match="open_clip backbone"):
        TrainingFreeClassifier("timm:vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="templates"):
        TrainingFreeClassifier(f"open_clip:{TINY}", templates="fancy")
    assert vpeft.build_zero_shot_classifier  # the zero-shot builder the task uses is public


@pytest.mark.parametrize("preset", ["gda", "tip_adapter"])
def test_presets_through_the_cli(preset, coop_root, tmp_path):
    """`vpeft fit` then `vpeft test --ckpt_path` with the shipped preset, on the tiny CLIP, writing result cards."""
    import glob
    import json
    from pathlib import Path

    from vpeft.cli import main

    configs = Path(__file__).resolve().parents[2] / "configs"
    base = ["-c", str(configs / "trainer/cpu.yaml"), "-c", str(configs / "data/caltech101.yaml"),
            "-c", str(configs / f"method/clip/training_free/{preset}.yaml"), "--model.backbone", f"open_clip:{TINY}",
            "--data.root", coop_root, "--data.shots", "4", "--data.num_workers", "0", "--data.batch_size", "8",
            "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(tmp_path),
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    assert main(["fit", *base]) == 0
    last = glob.glob(str(tmp_path / "**" / "last.ckpt"), recursive=True)
    assert last
    assert main(["test", *base, "--ckpt_path", last[0]]) == 0
    cards = glob.glob(str(tmp_path / "**" / "result_card_test.json"), recursive=True)
    card = json.loads(Path(cards[0]).read_text())
    assert 0.0 <= card["metrics"]["test/acc"] <= 1.0
    assert card["config"]["model"]["head"] == preset
