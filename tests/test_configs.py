"""Every YAML under configs/ parses and its method presets build a working PeftModel on a tiny ViT."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import clouds, make_point, make_timm

import vpeft

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
YAMLS = sorted(CONFIG_DIR.rglob("*.yaml"))
#: Method presets for point-cloud backbones (built on the tiny Point-MAE; their CLI runs are in
#: tests/modules/test_pointcloud.py).
POINT_PRESETS = ("dapt", "idpt", "point_peft")


def instantiate(spec: dict):
    module, _, name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))


def test_configs_exist():
    assert YAMLS, "configs/ holds no YAML"


@pytest.mark.parametrize("path", YAMLS, ids=[str(p.relative_to(CONFIG_DIR)) for p in YAMLS])
def test_yaml_parses(path: Path):
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    if path.parent.name == "method":
        methods = [instantiate(s) for s in data["model"]["methods"]]
        assert all(isinstance(m, vpeft.PeftConfig) for m in methods)
        small = {"num_tokens": 3, "budget": 300}  # VPT's prompts, SPT's parameter budget: sized for the tiny ViT
        tiny = [type(m)(**{**m.__dict__, **{k: v for k, v in small.items() if hasattr(m, k)}}) for m in methods]
        # Point-cloud presets build on the tiny Point-MAE, the others on the tiny ViT.
        points = path.stem in POINT_PRESETS
        model, x = (make_point(), clouds()) if points else (make_timm(), torch.randn(2, 3, 32, 32))
        # Data-dependent presets (mask tuning, SPT) choose their sites from a batch first; others pass unchanged.
        tiny = vpeft.calibrate(model, tiny, [(x, torch.tensor([0, 1]))])
        pm = vpeft.get_peft_model(model, tiny, trainable_extra=data["model"].get("trainable_extra", []))
        assert pm(x).shape == (2, 5)


# -- through the real LightningCLI parser --------------------------------------------------------------------------
sys.path.insert(0, str(Path(__file__).parent / "modules"))  # the training tests' shared helpers
from _train_helpers import coop_root_fixture  # noqa: E402

coop_root = coop_root_fixture()

BY_GROUP = {g: sorted((CONFIG_DIR / g).glob("*.yaml")) for g in ("trainer", "data", "method", "experiment")}
# What each group is composed with to form a complete config.
PARTNERS = {"trainer": ("data/caltech101.yaml", "experiment/tiny_cpu.yaml"),
            "data": ("trainer/cpu.yaml", "experiment/tiny_cpu.yaml"),
            "experiment": ("trainer/cpu.yaml", "data/caltech101.yaml"),
            "method": ("trainer/cpu.yaml", "data/caltech101.yaml", "experiment/tiny_cpu.yaml")}


def _cli(*configs: str, args: tuple = ()):
    pytest.importorskip("lightning")
    from vpeft.datasets.datamodule import FewShotDataModule
    from vpeft.modules import FewShotClassifier
    from vpeft.modules.lightning_cli import VpeftCLI

    argv = [a for c in configs for a in ("-c", str(CONFIG_DIR / c))] + list(args)
    return VpeftCLI(FewShotClassifier, FewShotDataModule, run=False, auto_configure_optimizers=False, args=argv)


@pytest.mark.parametrize("path", [p for p in BY_GROUP["method"] if p.stem not in POINT_PRESETS],
                         ids=[p.name for p in BY_GROUP["method"] if p.stem not in POINT_PRESETS])
def test_method_preset_through_lightning_cli(path: Path, coop_root):
    extra = ("--model.methods.init_args.budget", "200") if path.name == "spt.yaml" else ()
    cli = _cli(*PARTNERS["method"], f"method/{path.name}",
               args=("--data.root", coop_root, "--data.shots", "2", "--trainer.logger=false", *extra))
    assert all(isinstance(m, vpeft.PeftConfig) for m in cli.model.methods)
    # No trainer here: a data-dependent preset calibrates on the datamodule's training batches given directly.
    cli.datamodule.setup("fit")
    cli.model.calibration_dataloader = cli.datamodule.train_dataloader()
    cli.model.configure_model()
    assert cli.model(torch.randn(2, 3, 16, 16)).shape == (2, cli.datamodule.num_classes)


@pytest.fixture(scope="module")
def parser_cli(coop_root):
    return _cli(*PARTNERS["method"], args=("--data.root", coop_root, "--data.shots", "2", "--trainer.logger=false"))


def _task_class(path: Path) -> str:
    """The ``model.class_path`` an experiment YAML names (``""``: the default few-shot classifier)."""
    return (yaml.safe_load(path.read_text()).get("model") or {}).get("class_path", "")


#: Experiment presets of other tasks (SAM segmentation, ...) name their task and data module by class_path and are
#: complete on their own; they parse in subclass mode below.
OWN_TASK = [p for p in BY_GROUP["experiment"] if _task_class(p)]
COMPOSED = [(g, p) for g in ("trainer", "data", "experiment") for p in BY_GROUP[g] if p not in OWN_TASK]


@pytest.mark.parametrize("group, path", COMPOSED, ids=[f"{g}/{p.name}" for g, p in COMPOSED])
def test_yaml_composes_in_the_cli_parser(group: str, path: Path, parser_cli):
    argv = [a for c in (*PARTNERS[group], f"{group}/{path.name}", "method/lora.yaml")
            for a in ("-c", str(CONFIG_DIR / c))]
    cfg = parser_cli.parser.parse_args(argv)  # exits (fails the test) on any unknown key or bad value
    if group == "data":
        from vpeft.datasets import list_datasets

        assert cfg.data.dataset in list_datasets()


@pytest.mark.parametrize("path", OWN_TASK, ids=[p.name for p in OWN_TASK])
def test_task_experiments_parse_in_subclass_mode(path: Path, tmp_path):
    """A preset naming its own task and data module parses (with the CPU trainer) into exactly those classes, every
    init arg accepted by their signatures (the parser exits on an unknown key or a bad value)."""
    pytest.importorskip("lightning")
    from lightning.pytorch import LightningDataModule

    from vpeft.modules.base import PeftTask
    from vpeft.modules.lightning_cli import VpeftCLI

    data = yaml.safe_load(path.read_text())
    argv = ["-c", str(CONFIG_DIR / "trainer/cpu.yaml"), "-c", str(path), "--trainer.logger=false",
            "--trainer.default_root_dir", str(tmp_path)]
    cli = VpeftCLI(PeftTask, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
                   auto_configure_optimizers=False, args=argv)
    assert f"{type(cli.model).__module__}.{type(cli.model).__name__}" == data["model"]["class_path"]
    assert f"{type(cli.datamodule).__module__}.{type(cli.datamodule).__name__}" == data["data"]["class_path"]
    want = [(m["class_path"].rsplit(".", 1)[-1], m["init_args"]) for m in data["model"]["init_args"]["methods"]]
    got = [(type(c).__name__, {k: getattr(c, k) for k in args}) for c, (_, args) in zip(cli.model.methods, want)]
    assert [(n, {k: list(v) if isinstance(v, tuple) else v for k, v in a.items()}) for n, a in got] == want
