"""Measurements shared by the method benchmarks: saved-for-backward bytes, FLOPs, training-step time, file size.

Saved bytes reuse :class:`benchmarks.prompt_memory.SavedCounter` (``saved_tensors_hooks``, each storage counted once
while a weak reference to it is alive). FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` under the math
SDPA backend (the fused CPU/GPU attention kernels are opaque to the counter) with ``nn.MultiheadAttention``'s
inference fast path off (``_native_multi_head_attention`` is not counted either), so attention matmuls count.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .prompt_memory import SavedCounter, resident_storages


def trainable(module: nn.Module) -> list[nn.Parameter]:
    """The parameters with ``requires_grad`` (each shared tensor once)."""
    return [p for p in module.parameters() if p.requires_grad]


def num_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in trainable(module))


@contextlib.contextmanager
def countable_attention() -> Iterator[None]:
    """Math SDPA backend and no MHA fast path: attention runs as matmuls the FLOP counter sees."""
    prev = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(prev)


def infer_flops(net: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one inference forward (eval mode, no grad); the module's mode is restored."""
    was = net.training
    net.eval()
    try:
        with countable_attention(), FlopCounterMode(display=False) as fc, torch.no_grad():
            net(x)
    finally:
        net.train(was)
    return int(fc.get_total_flops())


def train_flops(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """FLOPs of one training forward + backward (cross entropy); the gradients are dropped afterwards."""
    net.train()
    with countable_attention(), FlopCounterMode(display=False) as fc:
        F.cross_entropy(net(x), y).backward()
    for p in net.parameters():
        p.grad = None
    return int(fc.get_total_flops())


class LiveSavedCounter(SavedCounter):
    """:class:`SavedCounter` that also tells the bytes of the counted storages still alive, outside ``resident``."""

    def live_acts(self) -> int:
        return sum(n for ptr, (ref, n) in self.live.items() if ptr not in self.resident and not ref.expired())


def saved_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer) -> dict[str, int]:
    """One full training step whose forward runs under :class:`LiveSavedCounter`.

    Returns:
        ``saved_bytes``: bytes of the distinct storages saved for backward that are alive when the forward ends
        (what the graph holds for backward), outside the storages of parameters and buffers;
        ``saved_bytes_with_params``: the same including parameter and buffer storages;
        ``transient_bytes``: storages saved during the forward but freed before it ended (autograd branches that
        were dropped, e.g. a norm computed with grad and then detached), not in the two numbers above.
    """
    net.train()
    with LiveSavedCounter(resident_storages(net)) as c:
        loss = F.cross_entropy(net(x), y)
    live, acts = c.live_total(), c.live_acts()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return dict(saved_bytes=acts, saved_bytes_with_params=live, transient_bytes=c.total - live)


def timed_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer) -> float:
    """Seconds of one training step: forward, backward, ``opt.step()`` (gradients are cleared after the clock)."""
    t0 = time.perf_counter()
    F.cross_entropy(net(x), y).backward()
    opt.step()
    t = time.perf_counter() - t0
    opt.zero_grad(set_to_none=True)
    return t


def file_bytes(directory: str, names: Callable[[str], bool] = lambda n: n.endswith(".safetensors")) -> int:
    """Total size of the files in ``directory`` whose name passes ``names`` (default: the ``.safetensors``)."""
    return sum(os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory) if names(n))


def save_tensors(module_or_state, path: str) -> None:
    """Write a module's state dict (or a dict of tensors) as safetensors (shared storages cloned apart)."""
    from safetensors.torch import save_file

    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, path)
