"""Every YAML under configs/ parses and its method presets build a working PeftModel on a tiny ViT."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_timm

import vpeft

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
YAMLS = sorted(CONFIG_DIR.rglob("*.yaml"))


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
        tiny = [type(m)(**{**m.__dict__, **({"num_tokens": 3} if hasattr(m, "num_tokens") else {})}) for m in methods]
        pm = vpeft.get_peft_model(make_timm(), tiny, trainable_extra=data["model"].get("trainable_extra", []))
        assert pm(torch.randn(1, 3, 32, 32)).shape == (1, 5)
