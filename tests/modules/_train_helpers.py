"""Shared pieces of the training-layer tests: a tiny fake CoOp dataset, the tiny-ViT CLI arguments, runners."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
BACKBONE = "timm:vit_tiny_patch16_224"
TINY = dict(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2)


def coop_root_fixture():
    """A session fixture: ``$DATA`` with a 3-class fake Caltech101 in CoOp's layout (8 train / 4 val / 6 test per
    class, 16x16). Use as ``coop_root = coop_root_fixture()`` in a test module."""

    @pytest.fixture(scope="session")
    def coop_root(tmp_path_factory) -> str:
        from fake_coop import make_fake_coop

        root = tmp_path_factory.mktemp("coop")
        make_fake_coop(root, "caltech101", per_class=(8, 4, 6), size=16)
        return str(root)

    return coop_root


def cli_args(root: str, out, *extra: str, method: str = "lora", shots: int = 8) -> list[str]:
    """Composed configs (trainer + data + method + tiny experiment) on the fake dataset, quiet."""
    return ["-c", str(CONFIGS / "trainer/cpu.yaml"), "-c", str(CONFIGS / "data/caltech101.yaml"),
            "-c", str(CONFIGS / f"method/{method}.yaml"), "-c", str(CONFIGS / "experiment/tiny_cpu.yaml"),
            "--data.root", root, "--data.shots", str(shots), "--trainer.default_root_dir", str(out),
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            "--trainer.log_every_n_steps=1", *extra]


@contextmanager
def torch_threads(n: int):
    """Run in-process training with the thread count the subprocesses use (bitwise comparisons need it)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def subprocess_env(threads: int = 1) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def vpeft_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "vpeft.cli", *args]


def run_subprocess(args: list[str], timeout: float = 240, threads: int = 1) -> subprocess.CompletedProcess:
    proc = subprocess.run(vpeft_cmd(*args), env=subprocess_env(threads), capture_output=True, text=True,
                          timeout=timeout, cwd=str(REPO))
    assert proc.returncode == 0, f"vpeft {' '.join(args[:1])} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def card(out, stage: str) -> dict:
    """The newest result card of ``stage`` under ``out``."""
    paths = sorted(glob.glob(os.path.join(str(out), "lightning_logs", "version_*", f"result_card_{stage}.json")),
                   key=os.path.getmtime)
    assert paths, f"no result_card_{stage}.json under {out}"
    with open(paths[-1]) as f:
        return json.load(f)


def adapter_tensors(directory: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(directory, "adapter_model.safetensors"))
