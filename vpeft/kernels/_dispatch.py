"""Kernel dispatch: Triton or the pure-torch reference, per call.

Mode (``VPEFT_KERNELS`` environment variable, overridden by :func:`use_kernels`):

* ``auto`` (default): Triton when Triton imports, every tensor of the call is on a CUDA device and the op supports
  the shape and dtype; the torch reference otherwise.
* ``triton``: Triton wherever it can run: CUDA tensors, or any device under Triton's interpreter
  (``TRITON_INTERPRET=1``, how the CPU tests run the kernels). A call Triton cannot run raises ``RuntimeError``
  naming why: forcing Triton never falls back silently.
* ``torch``: always the reference.

The first choice per (op, backend) is logged on the ``vpeft.kernels`` logger at INFO; :func:`last_backend` tells
the backend an op used last (adapters show it in their ``repr``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from typing import Iterator, Optional

import torch

logger = logging.getLogger("vpeft.kernels")

MODES = ("auto", "triton", "torch")
#: dtypes the Triton kernels accept.
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_local = threading.local()
_logged: set[tuple[str, str]] = set()
_last: dict[str, str] = {}


def _check_mode(mode: str, where: str) -> str:
    if mode not in MODES:
        raise ValueError(f"{where} must be one of {MODES}, got {mode!r}")
    return mode


def kernel_mode() -> str:
    """The current mode: the innermost :func:`use_kernels`, else ``$VPEFT_KERNELS``, else ``"auto"``."""
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    return _check_mode(os.environ.get("VPEFT_KERNELS", "auto").strip().lower() or "auto", "VPEFT_KERNELS")


@contextlib.contextmanager
def use_kernels(mode: str) -> Iterator[None]:
    """Run the enclosed code with kernel mode ``mode`` (``"auto"``, ``"triton"`` or ``"torch"``); thread-local.

    Example::

        with vpeft.kernels.use_kernels("torch"):
            y = model(x)          # every adapter op runs its torch reference
    """
    _check_mode(mode, "use_kernels(mode)")
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(mode)
    try:
        yield
    finally:
        stack.pop()


@functools.cache
def triton_importable() -> bool:
    """Whether ``import triton`` works (``import vpeft`` never needs it)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install counts as absent
        return False
    return True


def interpreting() -> bool:
    """Whether Triton's interpreter is on (``TRITON_INTERPRET=1``): kernels then run on CPU tensors too."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def choose(op: str, tensors: tuple[Optional[torch.Tensor], ...], unsupported: Optional[str] = None) -> str:
    """``"triton"`` or ``"torch"`` for one call of ``op``.

    Args:
        op: Op name (for logs and errors).
        tensors: The call's tensors (``None`` entries are skipped): their device and dtype decide.
        unsupported: Why the op's kernel cannot take this call (shape, layout), or ``None`` when it can.

    Raises:
        RuntimeError: Mode ``triton`` and the kernel cannot run this call.
    """
    mode = kernel_mode()
    if mode == "torch":
        return _record(op, "torch")
    ts = [t for t in tensors if t is not None]
    reason = unsupported
    if reason is None and not triton_importable():
        reason = "Triton is not installed"
    if reason is None:
        on_cuda = all(t.is_cuda for t in ts)
        if not on_cuda and not (mode == "triton" and interpreting()):
            reason = "the tensors are not on a CUDA device (set TRITON_INTERPRET=1 to run kernels on CPU)"
    if reason is None:
        bad = sorted({str(t.dtype) for t in ts if t.is_floating_point() and t.dtype not in SUPPORTED_DTYPES})
        if bad:
            reason = f"dtype {', '.join(bad)} is not supported (supported: float32, float16, bfloat16)"
    if reason is None:
        return _record(op, "triton")
    if mode == "triton":
        raise RuntimeError(f"vpeft.kernels.{op}: VPEFT_KERNELS/use_kernels is 'triton' but the Triton kernel cannot "
                           f"run this call: {reason}")
    return _record(op, "torch")


def _record(op: str, backend: str) -> str:
    _last[op] = backend
    if (op, backend) not in _logged:
        _logged.add((op, backend))
        logger.info("vpeft.kernels.%s: using the %s implementation (mode %s)", op, backend, kernel_mode())
    return backend


def last_backend(op: str) -> Optional[str]:
    """The backend ``op`` used in its most recent call (``None`` before the first)."""
    return _last.get(op)
