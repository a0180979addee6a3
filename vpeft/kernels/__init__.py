"""Fused Triton kernels for the hot adapter paths, each with a pure-torch reference that defines its semantics.

One file per op (the Liger-Kernel layout): the ``@triton.jit`` kernels, the launcher, the ``torch.autograd.Function``
and ``reference_<op>``. The adapters call them through ``Adapter.fused_forward`` when the dispatch
(:mod:`vpeft.kernels._dispatch`) chooses Triton: CUDA tensors and a supported shape and dtype in mode ``auto``;
``VPEFT_KERNELS=auto|triton|torch`` or :func:`use_kernels` override it. ``import vpeft`` and ``import vpeft.kernels``
work without Triton; the ops are imported on first use.

Ops:
    lora_linear(x, weight, bias, lora_A, lora_B, scaling, out_slices=None): base GEMM + LoRA in one pass.
    dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling, out_slices=None): DoRA's normalised update.
    ssf_layernorm(x, ln_weight, ln_bias, scale, shift, eps): LayerNorm then SSF's scale and shift.
    masked_linear(x, weight, scores, threshold, bias=None): linear with a binary mask from scores (straight-through).
"""

from __future__ import annotations

import importlib
from typing import Any

from ._dispatch import MODES, kernel_mode, last_backend, use_kernels

_OPS = {"lora_linear": ".lora", "dora_linear": ".dora", "ssf_layernorm": ".ssf", "masked_linear": ".masked"}

__all__ = ["MODES", "dora_linear", "kernel_mode", "last_backend", "lora_linear", "masked_linear", "ssf_layernorm",
           "use_kernels"]


def __getattr__(name: str) -> Any:
    # Ops load lazily: importing the package (the adapters do, for the dispatch) never imports Triton.
    if name in _OPS:
        return getattr(importlib.import_module(_OPS[name], __name__), name)
    raise AttributeError(f"module 'vpeft.kernels' has no attribute {name!r}")
