"""Kernel dispatch: the mode comes from use_kernels, else VPEFT_KERNELS, else auto; a bad mode is refused; auto picks
the reference on CPU; forcing Triton where it cannot run raises instead of falling back."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

from vpeft.kernels import _dispatch as dispatch
from vpeft.kernels import kernel_mode, last_backend, use_kernels


def test_mode_precedence(monkeypatch):
    monkeypatch.delenv("VPEFT_KERNELS", raising=False)
    assert kernel_mode() == "auto"
    monkeypatch.setenv("VPEFT_KERNELS", "Torch")
    assert kernel_mode() == "torch"
    with use_kernels("triton"):
        assert kernel_mode() == "triton"
        with use_kernels("auto"):
            assert kernel_mode() == "auto"
        assert kernel_mode() == "triton"
    assert kernel_mode() == "torch"


def test_bad_modes_are_refused(monkeypatch):
    with pytest.raises(ValueError, match=r"use_kernels\(mode\) must be one of \('auto', 'triton', 'torch'\)"):
        with use_kernels("cuda"):
            pass
    monkeypatch.setenv("VPEFT_KERNELS", "fast")
    with pytest.raises(ValueError, match="VPEFT_KERNELS must be one of"):
        kernel_mode()


def test_auto_uses_the_reference_on_cpu_and_logs_the_choice(caplog):
    x = torch.randn(2, 3)
    dispatch._logged.discard(("probe_op", "torch"))
    with caplog.at_level(logging.INFO, logger="vpeft.kernels"), use_kernels("auto"):
        assert dispatch.choose("probe_op", (x,)) == "torch"
    assert last_backend("probe_op") == "torch"
    assert "vpeft.kernels.probe_op: using the torch implementation" in caplog.text


def test_forced_triton_never_falls_back(monkeypatch):
    x = torch.randn(2, 3)
    with use_kernels("triton"):
        with pytest.raises(RuntimeError, match="cannot run this call: rank 0 is not supported"):
            dispatch.choose("probe_op", (x,), unsupported="rank 0 is not supported")
        with pytest.raises(RuntimeError, match="dtype torch.float64 is not supported"):
            dispatch.choose("probe_op", (x.double(),))
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        if not torch.cuda.is_available():
            with pytest.raises(RuntimeError, match="not on a CUDA device"):
                dispatch.choose("probe_op", (x,))
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert dispatch.choose("probe_op", (x,)) == "triton"


def test_import_vpeft_works_without_triton():
    code = ("import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
            "import vpeft, vpeft.kernels, torch\n"
            "from vpeft.kernels import _dispatch as d\n"
            "assert not d.triton_importable()\n"
            "m = vpeft.create_backbone('timm:vit_tiny_patch16_224', img_size=16, patch_size=8, embed_dim=32, depth=1,"
            " num_heads=2, num_classes=3)\n"
            "pm = vpeft.get_peft_model(m, [vpeft.LoraConfig(r=2), vpeft.SSFConfig()])\n"
            "pm(torch.randn(1, 3, 16, 16))\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
