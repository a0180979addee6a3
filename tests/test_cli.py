"""The ``vpeft`` command: plain subcommands, the guarded quickstart dispatch, and the real LightningCLI on a fake
CoOp dataset (fit, then validate/test from the checkpoint and test from the exported adapter reproduce the logs)."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest
import torch

from vpeft.cli import main

sys.path.insert(0, str(Path(__file__).parent / "modules"))  # the training tests' shared helpers
from _train_helpers import CONFIGS, adapter_tensors, card, cli_args, coop_root_fixture  # noqa: E402

coop_root = coop_root_fixture()


def test_methods_lists_registry(capsys):
    import vpeft

    assert main(["methods"]) == 0
    assert capsys.readouterr().out.split() == vpeft.list_methods()


def test_demo_subcommand_still_parses():
    with pytest.raises(SystemExit) as e:
        main(["demo", "--help"])
    assert e.value.code == 0


def test_quickstart_dispatch(monkeypatch):
    seen = []
    fake = types.ModuleType("vpeft.quickstart")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "vpeft.quickstart", fake)
    assert main(["quickstart", "--shots", "1"]) == 0
    assert seen == [["--shots", "1"]]


def test_quickstart_missing_is_reported(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "vpeft.quickstart", None)  # makes the import raise ImportError
    assert main(["quickstart"]) == 2
    assert "quickstart" in capsys.readouterr().err


def test_fit_then_test_reproduces_logged_metrics(coop_root, tmp_path):
    pytest.importorskip("lightning")
    out = tmp_path / "run"
    assert main(["fit", *cli_args(coop_root, out, "--trainer.max_epochs=2")]) == 0
    fit = card(out, "fit")
    ckpt_dir = Path(fit["checkpoints"]["dir"])
    last = ckpt_dir / "last.ckpt"
    assert last.is_file() and Path(fit["checkpoints"]["best"]).is_file()
    # Adapter-only: the checkpoint is a small fraction of the (frozen) backbone it does not contain.
    assert last.stat().st_size < 64_000 < 4 * fit["params"]["total"]
    assert fit["params"]["trainable"] < fit["params"]["total"]
    for key in ("config_hash", "git", "seed", "manifest", "metrics", "peak_memory", "throughput"):
        assert fit[key], key
    manifest = Path(fit["manifest"]["path"])
    assert manifest.is_file() and fit["manifest"]["hash"] in manifest.read_text()
    assert "test/acc" not in fit["metrics"]  # fit never touches the test split

    # The model config comes from the checkpoint: only trainer and data configs are given.
    configs = ["-c", str(CONFIGS / "trainer/cpu.yaml"), "-c", str(CONFIGS / "data/caltech101.yaml")]

    def flags(root_dir) -> list[str]:  # after the configs: later values win
        return ["--data.root", coop_root, "--data.shots", "8", "--data.num_workers", "0",
                "--trainer.default_root_dir", str(root_dir), "--trainer.enable_progress_bar=false"]

    base = [*configs, *flags(out / "eval")]
    assert main(["validate", *base, "--ckpt_path", str(last)]) == 0
    val = card(out / "eval", "validate")["metrics"]
    assert val["val/acc"] == fit["metrics"]["val/acc"] and val["val/loss"] == fit["metrics"]["val/loss"]

    assert main(["test", *base, "--ckpt_path", str(last)]) == 0
    test = card(out / "eval", "test")
    assert test["manifest"]["hash"] == fit["manifest"]["hash"]
    acc, loss = test["metrics"]["test/acc"], test["metrics"]["test/loss"]

    # The exported adapter directory (what users share) gives the same numbers without any checkpoint.
    assert main(["test", *configs, "-c", str(CONFIGS / "experiment/tiny_cpu.yaml"), *flags(out / "adapter_eval"),
                 "--model.adapter", fit["adapter_dir"]]) == 0
    again = card(out / "adapter_eval", "test")
    assert again["ckpt_path"] is None and again["config"]["model"]["adapter"] == fit["adapter_dir"]
    again = again["metrics"]
    assert (again["test/acc"], again["test/loss"]) == (acc, loss)

    # And plain torch agrees: rebuild the backbone, attach the adapter, classify the test split.
    assert _manual_test_accuracy(coop_root, fit) == pytest.approx(acc, abs=1e-9)


def _manual_test_accuracy(root: str, fit_card: dict) -> float:
    import vpeft
    from vpeft.datasets import ImageListDataset
    from vpeft.datasets.datamodule import FewShotDataModule

    cfg = fit_card["config"]["model"]
    dm = FewShotDataModule("caltech101", root, shots=8, seed=1, backbone=cfg["backbone"],
                           backbone_kwargs=cfg["backbone_kwargs"])
    torch.manual_seed(int(fit_card["seed"]["init_seed"]))  # the task builds its random backbone under init_seed
    backbone = vpeft.create_backbone(cfg["backbone"], num_classes=dm.num_classes, **cfg["backbone_kwargs"])
    pm = vpeft.PeftModel.from_pretrained(backbone, fit_card["adapter_dir"]).eval()
    data = ImageListDataset(dm.splits.test, dm.transforms[1])
    with torch.no_grad():
        correct = sum(int(pm(x.unsqueeze(0)).argmax(-1).item() == y) for x, y in data)
    assert os.path.isdir(fit_card["adapter_dir"]) and adapter_tensors(fit_card["adapter_dir"])
    return correct / len(data)


def fit_then_test_both_ways(method: str, coop_root: str, out: Path, *extra: str) -> tuple[dict, dict]:
    """``vpeft fit`` one epoch of ``method``'s preset, then ``vpeft test`` from the checkpoint and from the exported
    adapter; asserts both give the same metrics. Returns the fit card and the adapter's tensors."""
    assert main(["fit", *cli_args(coop_root, out, "--trainer.max_epochs=1", *extra, method=method)]) == 0
    fit = card(out, "fit")
    configs = ["-c", str(CONFIGS / "trainer/cpu.yaml"), "-c", str(CONFIGS / "data/caltech101.yaml")]
    # the same batches in both runs (the loss is averaged over batches: other batch sizes change its last bits)
    flags = ["--data.root", coop_root, "--data.shots", "8", "--data.num_workers", "0", "--data.batch_size", "8",
             "--trainer.enable_progress_bar=false"]
    last = Path(fit["checkpoints"]["dir"]) / "last.ckpt"
    assert main(["test", *configs, *flags, "--trainer.default_root_dir", str(out / "ckpt"), "--ckpt_path",
                 str(last)]) == 0
    assert main(["test", *configs, "-c", str(CONFIGS / "experiment/tiny_cpu.yaml"), *flags,
                 "--trainer.default_root_dir", str(out / "adapter"), "--model.adapter", fit["adapter_dir"]]) == 0
    assert card(out / "adapter", "test")["metrics"] == card(out / "ckpt", "test")["metrics"]
    return fit, adapter_tensors(fit["adapter_dir"])


@pytest.mark.parametrize("method", ["lst", "unipt"])
def test_side_tuning_trains_and_reloads_through_the_cli(method, coop_root, tmp_path):
    """The side-tuning presets train under ``vpeft fit`` (side network + head only) and the exported adapter gives
    the checkpoint's test metrics."""
    pytest.importorskip("lightning")
    fit, tensors = fit_then_test_both_ways(method, coop_root, tmp_path / "run")
    names = set(tensors)
    assert any(n.startswith(f"_shared.{method}.") for n in names) and any(n.startswith("head.") for n in names)
    assert fit["params"]["trainable"] == sum(t.numel() for t in tensors.values())


@pytest.mark.parametrize("method", ["adaptformer", "mosa", "compacter", "nola", "earth_adapter"])
def test_adapter_family_trains_and_reloads_through_the_cli(method, coop_root, tmp_path):
    """The adapter-family presets train under ``vpeft fit`` (adapters + head only), and the exported adapter gives
    the checkpoint's test metrics (MoSA's eval forward is its merged dense adapter; NOLA rebuilds its bases from
    the saved seed)."""
    pytest.importorskip("lightning")
    fit, tensors = fit_then_test_both_ways(method, coop_root, tmp_path / "run")
    assert any(f".{method}." in n for n in tensors) and any(n.startswith("head.") for n in tensors)
    # Trainable parameters are what the file holds, less non-trainable state (NOLA's seed).
    assert fit["params"]["trainable"] == sum(t.numel() for t in tensors.values() if t.is_floating_point())


@pytest.mark.parametrize("method", ["mask", "spt"])
def test_data_dependent_methods_calibrate_train_and_reload_through_the_cli(method, coop_root, tmp_path):
    """Mask tuning and SPT choose where to adapt from the first training batches inside ``vpeft fit``; the resolved
    selection is saved with the adapter, so ``vpeft test`` rebuilds it from the file alone (no data) with the
    checkpoint's metrics. SPT trains exactly its budget (plus the head)."""
    pytest.importorskip("lightning")
    extra = ("--model.methods.init_args.budget", "500") if method == "spt" else ()
    fit, tensors = fit_then_test_both_ways(method, coop_root, tmp_path / "run", *extra)
    assert any(f".{method}." in n for n in tensors) and any(n.startswith("head.") for n in tensors)
    floats = {n: t for n, t in tensors.items() if t.is_floating_point()}
    assert fit["params"]["trainable"] == sum(t.numel() for t in floats.values())
    if method == "spt":
        head = sum(t.numel() for n, t in floats.items() if n.startswith("head."))
        assert fit["params"]["trainable"] - head == 500


def test_quickstart_task_is_checked(capsys):
    assert main(["quickstart", "--task", "audio"]) == 2
    assert "--task must be one of ['classification', 'points', 'segmentation']" in capsys.readouterr().err
