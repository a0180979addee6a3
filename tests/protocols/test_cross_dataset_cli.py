"""Cross-dataset transfer through the real CLI: an adapter trained on one dataset is tested on another with
``--model.adapter`` and ``--model.source_dataset``; the result cards then form the cross-dataset table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("lightning")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "modules"))
from _clip_helpers import CLASSES, make_clip_coop_root, register_tiny_bpe_clip  # noqa: E402
from _train_helpers import card  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TEXTURES = ("banded", "dotted", "striped")


def test_adapter_transfers_to_another_dataset_and_aggregates(tmp_path):
    from fake_coop import make_fake_coop

    from vpeft.cli import main
    from vpeft.protocols.aggregate import collect_cards, cross_dataset_table, render

    backbone = register_tiny_bpe_clip()
    root = make_clip_coop_root(tmp_path / "data")
    make_fake_coop(tmp_path / "data", "dtd", classes=TEXTURES, per_class=(4, 2, 5), size=32)
    common = ["-c", str(CONFIGS / "trainer/cpu.yaml"), "-c", str(CONFIGS / "method/clip/coop.yaml"),
              "--model.backbone", backbone, "--model.init_args.methods",
              '[{"class_path": "vpeft.CoOpConfig", "init_args": {"n_ctx": 4}}]', "--data.num_workers", "0",
              "--data.batch_size", "8", "--trainer.enable_progress_bar=false",
              "--trainer.enable_model_summary=false"]

    def data(name: str) -> list[str]:  # the data config sets root: override it after
        return ["-c", str(CONFIGS / f"data/{name}.yaml"), "--data.root", root, "--data.shots", "2"]

    src = tmp_path / "src"
    assert main(["fit", *common, *data("caltech101"),
                 "--trainer.max_epochs", "1", "--model.lr_scheduler.init_args.T_max", "1",
                 "--trainer.default_root_dir", str(src)]) == 0
    adapter = card(src, "fit")["adapter_dir"]
    assert main(["test", *common, *data("caltech101"),
                 "--model.adapter", adapter, "--trainer.default_root_dir", str(tmp_path / "on_src")]) == 0
    assert main(["test", *common, *data("dtd"),
                 "--model.adapter", adapter, "--model.source_dataset", "caltech101",
                 "--trainer.default_root_dir", str(tmp_path / "on_dtd")]) == 0
    target = card(tmp_path / "on_dtd", "test")
    assert target["config"]["model"]["source_dataset"] == "caltech101"
    assert target["config"]["data"]["dataset"] == "dtd"

    records = collect_cards([tmp_path / "on_src", tmp_path / "on_dtd"])
    table = cross_dataset_table(records, source="caltech101")
    text = render(table, "md")
    src_acc = card(tmp_path / "on_src", "test")["metrics"]["test/acc"]
    dtd_acc = target["metrics"]["test/acc"]
    # one coop row: the source column, the dtd column and the average over targets (= dtd's, the only target)
    assert "coop" in text and f"{100 * src_acc:.2f}" in text and text.count(f"{100 * dtd_acc:.2f}") >= 2
    assert len(CLASSES) == 6
