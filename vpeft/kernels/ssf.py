"""LayerNorm followed by SSF's per-channel scale and shift, fused into one row-wise Triton kernel.

SSF (Lian et al., "Scaling & Shifting Your Features", NeurIPS 2022, arXiv:2210.08823) puts ``y * scale + shift``
after every LayerNorm; :class:`vpeft.methods.ssf.AffineAdapter` applies it to the norm's output along the last
dimension. Over the last dimension ``D`` of ``x``:

    y = (LayerNorm(x; ln_weight, ln_bias, eps)) * scale + shift
      = ((x - mean) * rstd * ln_weight + ln_bias) * scale + shift,      rstd = 1 / sqrt(var + eps)

with the biased variance, as :func:`torch.nn.functional.layer_norm`. ``ln_weight`` / ``ln_bias`` may be ``None``
(a LayerNorm without affine). Everything is computed in float32 and rounded once to ``x.dtype``.

Kernels:
    * forward: one program per block of ``BLOCK_M`` rows, each row whole in registers (``BLOCK_D`` = next power of
      two >= ``D``). It writes ``y`` and per-row ``mean`` and ``rstd`` (float32), which is all backward keeps besides
      the inputs: the normalised ``x`` is recomputed, not saved.
    * backward: a persistent grid of ``P`` programs, each walking a contiguous range of row blocks. It writes ``dx``
      and accumulates per-program partial column sums for ``d(scale)``, ``d(shift)``, ``d(ln_weight)`` and
      ``d(ln_bias)`` (only those that are needed) in float32; a torch ``.sum(0)`` over the ``(P, D)`` partials
      finishes them (the usual two-stage reduction: no atomics, deterministic).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F

from ._dispatch import choose, interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # vpeft imports without Triton; the dispatch then always picks the reference
    triton = None
    tl = None

__all__ = ["reference_ssf_layernorm", "ssf_layernorm"]

#: Widest last dimension the kernel takes (one row lives in registers); wider rows use the reference.
MAX_D = 65536


# ----------------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------------


def reference_ssf_layernorm(x: torch.Tensor, ln_weight: Optional[torch.Tensor], ln_bias: Optional[torch.Tensor],
                            scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Pure-torch definition of :func:`ssf_layernorm` (differentiable with ordinary autograd).

    Computes in float32 (float64 for float64 ``x``) and returns ``x.dtype``, like the kernel.

    Args:
        x: Input ``(..., D)``.
        ln_weight: LayerNorm weight ``(D,)`` or ``None``.
        ln_bias: LayerNorm bias ``(D,)`` or ``None``.
        scale: SSF scale ``(D,)``.
        shift: SSF shift ``(D,)``.
        eps: LayerNorm epsilon.

    Returns:
        ``LayerNorm(x) * scale + shift`` with the shape and dtype of ``x``.
    """
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = ln_weight.to(ct) if ln_weight is not None else None
    b = ln_bias.to(ct) if ln_bias is not None else None
    h = F.layer_norm(x.to(ct), (x.shape[-1],), w, b, eps)
    return (h * scale.to(ct) + shift.to(ct)).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _ssf_ln_fwd_kernel(X, W, B, S, T, Y, Mean, Rstd, M, D, stride_x, stride_y, eps,
                           HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        row_ok = rows < M
        col_ok = cols < D
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)  # row * stride can pass 2**31 on large activations
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / D
        # Padding columns must not count in the variance: zero them after centring.
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
        h = xc * rstd[:, None]
        if HAS_W:
            h = h * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            h = h + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        s = tl.load(S + cols, mask=col_ok, other=0.0).to(tl.float32)
        t = tl.load(T + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = h * s[None, :] + t[None, :]
        tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
        tl.store(Mean + rows, mean, mask=row_ok)
        tl.store(Rstd + rows, rstd, mask=row_ok)

    @triton.jit
    def _ssf_ln_bwd_kernel(X, W, B, S, DY, Mean, Rstd, DX, DS, DT, DW, DB, M, D, stride_x, stride_dy, stride_dx,
                           rows_per_program,
                           HAS_W: tl.constexpr, HAS_B: tl.constexpr, NEED_DX: tl.constexpr, NEED_DS: tl.constexpr,
                           NEED_DT: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < D
        s = tl.load(S + cols, mask=col_ok, other=0.0).to(tl.float32)
        if HAS_W:
            w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        if HAS_B:
            b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc_ds = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc_dt = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc_dw = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc_db = tl.zeros([BLOCK_D], dtype=tl.float32)
        row_start = pid * rows_per_program
        row_end = tl.minimum(row_start + rows_per_program, M)
        for r0 in range(row_start, row_end, BLOCK_M):
            rows = r0 + tl.arange(0, BLOCK_M)
            row_ok = rows < row_end
            mask = row_ok[:, None] & col_ok[None, :]
            rows64 = rows.to(tl.int64)
            x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
            rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            if NEED_DS:
                h = xhat
                if HAS_W:
                    h = h * w[None, :]
                if HAS_B:
                    h = h + b[None, :]
                acc_ds += tl.sum(dy * h, axis=0)
            if NEED_DT:
                acc_dt += tl.sum(dy, axis=0)
            dh = dy * s[None, :]  # gradient w.r.t. the LayerNorm output
            if NEED_DW:
                acc_dw += tl.sum(dh * xhat, axis=0)
            if NEED_DB:
                acc_db += tl.sum(dh, axis=0)
            if NEED_DX:
                if HAS_W:
                    dxhat = dh * w[None, :]
                else:
                    dxhat = dh
                # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)); padding is zero in both factors.
                c1 = tl.sum(dxhat * xhat, axis=1) / D
                c2 = tl.sum(dxhat, axis=1) / D
                dx = (dxhat - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
                tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        part = pid.to(tl.int64) * D + cols
        if NEED_DS:
            tl.store(DS + part, acc_ds, mask=col_ok)
        if NEED_DT:
            tl.store(DT + part, acc_dt, mask=col_ok)
        if NEED_DW:
            tl.store(DW + part, acc_dw, mask=col_ok)
        if NEED_DB:
            tl.store(DB + part, acc_db, mask=col_ok)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


def _config(d: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps) for rows of width ``d``: about 4096 elements per tile, at least one row."""
    block_d = triton.next_power_of_2(d)
    block_m = max(1, min(64, 4096 // block_d))
    num_warps = 4 if block_d <= 2048 else 8 if block_d <= 8192 else 16
    return block_m, block_d, num_warps


def _num_partials(n_blocks: int, device: torch.device) -> int:
    # Enough programs to fill the GPU a few times over; the interpreter runs programs one by one, so fewer there.
    if device.type == "cuda" and not interpreting():
        cap = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        cap = 8
    return max(1, min(n_blocks, cap))


def _rows(t: torch.Tensor, d: int) -> torch.Tensor:
    """``t`` as ``(rows, d)`` with unit stride along ``d`` (a view when possible)."""
    t2 = t.reshape(-1, d)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _forward(x2, w, b, s, t, eps):
    m, d = x2.shape
    y = torch.empty((m, d), dtype=x2.dtype, device=x2.device)
    mean = torch.empty(m, dtype=torch.float32, device=x2.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x2.device)
    if m == 0:
        return y, mean, rstd
    block_m, block_d, num_warps = _config(d)
    _ssf_ln_fwd_kernel[(triton.cdiv(m, block_m),)](
        x2, w if w is not None else s, b if b is not None else s, s, t, y, mean, rstd, m, d, x2.stride(0),
        y.stride(0), float(eps), HAS_W=w is not None, HAS_B=b is not None, BLOCK_M=block_m, BLOCK_D=block_d,
        num_warps=num_warps)
    return y, mean, rstd


def _backward(dy2, x2, w, b, s, mean, rstd, need):
    """``(dx, d_scale, d_shift, d_weight, d_bias)`` in float32 partial-summed form (``None`` where not needed)."""
    need_dx, need_ds, need_dt, need_dw, need_db = need
    m, d = x2.shape
    dev = x2.device
    dx = torch.empty((m, d), dtype=x2.dtype, device=dev) if need_dx else None
    if m == 0:
        return (dx, *[torch.zeros(d, dtype=torch.float32, device=dev) if n else None for n in need[1:]])
    block_m, block_d, num_warps = _config(d)
    n_blocks = triton.cdiv(m, block_m)
    p = _num_partials(n_blocks, dev)
    rows_per_program = triton.cdiv(n_blocks, p) * block_m  # a whole number of row blocks per program
    p = triton.cdiv(m, rows_per_program)
    parts = [torch.empty((p, d), dtype=torch.float32, device=dev) if n else None for n in need[1:]]
    dummy = mean  # any valid pointer for the arguments a constexpr flag switches off
    _ssf_ln_bwd_kernel[(p,)](
        x2, w if w is not None else dummy, b if b is not None else dummy, s, dy2, mean, rstd,
        dx if dx is not None else dummy, *[q if q is not None else dummy for q in parts], m, d, x2.stride(0),
        dy2.stride(0), dx.stride(0) if dx is not None else d, rows_per_program,
        HAS_W=w is not None, HAS_B=b is not None, NEED_DX=need_dx, NEED_DS=need_ds, NEED_DT=need_dt,
        NEED_DW=need_dw, NEED_DB=need_db, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps)
    return (dx, *[q.sum(0) if q is not None else None for q in parts])


class _SSFLayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ln_weight, ln_bias, scale, shift, eps):
        d = x.shape[-1]
        x2 = _rows(x, d)
        w = ln_weight.contiguous() if ln_weight is not None else None
        b = ln_bias.contiguous() if ln_bias is not None else None
        s, t = scale.contiguous(), shift.contiguous()
        y, mean, rstd = _forward(x2, w, b, s, t, eps)
        # mean and rstd per row (float32) instead of the normalised x: backward recomputes it from x.
        ctx.save_for_backward(x2, w, b, s, mean, rstd)
        ctx.x_shape = x.shape
        ctx.dtypes = tuple(v.dtype if v is not None else None for v in (ln_weight, ln_bias, scale, shift))
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, w, b, s, mean, rstd = ctx.saved_tensors
        nx, nw, nb, ns, nt = ctx.needs_input_grad[:5]
        need = (nx, ns, nt, nw and w is not None, nb and b is not None)
        if not any(need):
            return None, None, None, None, None, None
        dy2 = _rows(dy, x2.shape[1])
        dx, ds, dt, dw, db = _backward(dy2, x2, w, b, s, mean, rstd, need)
        wt, bt, st, tt = ctx.dtypes

        def cast(g, dtype):
            return g.to(dtype) if g is not None else None

        return (dx.view(ctx.x_shape) if dx is not None else None, cast(dw, wt), cast(db, bt), cast(ds, st),
                cast(dt, tt), None)


# ----------------------------------------------------------------------------------------------------------------
# Public entry
# ----------------------------------------------------------------------------------------------------------------


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _check(x, ln_weight, ln_bias, scale, shift, eps) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1 or x.shape[-1] < 1:
        got = _describe(x) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"ssf_layernorm: x must be a floating-point tensor (..., D) with D >= 1, got {got}")
    d = x.shape[-1]
    for name, t, optional in (("ln_weight", ln_weight, True), ("ln_bias", ln_bias, True), ("scale", scale, False),
                              ("shift", shift, False)):
        if t is None and optional:
            continue
        accepted = f"a floating-point tensor of shape ({d},) on {x.device}" + (" or None" if optional else "")
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"ssf_layernorm: {name} must be {accepted}, got {type(t).__name__}")
        if tuple(t.shape) != (d,) or not t.is_floating_point() or t.device != x.device:
            raise ValueError(f"ssf_layernorm: {name} must be {accepted} (D = x.shape[-1] = {d}), got {_describe(t)}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"ssf_layernorm: eps must be a finite real number >= 0, got {eps!r}")


def ssf_layernorm(x: torch.Tensor, ln_weight: Optional[torch.Tensor], ln_bias: Optional[torch.Tensor],
                  scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dimension, then SSF's scale and shift: ``LayerNorm(x) * scale + shift``.

    Runs the fused Triton kernel when the dispatch (:mod:`vpeft.kernels._dispatch`) chooses it, else
    :func:`reference_ssf_layernorm`. Differentiable in every tensor argument; gradients of tensors that do not
    require grad are not computed.

    Args:
        x: Input ``(..., D)``: float32, float16 or bfloat16 for the kernel (the reference takes any float dtype).
        ln_weight: LayerNorm weight ``(D,)``, or ``None`` for a LayerNorm without affine weight.
        ln_bias: LayerNorm bias ``(D,)``, or ``None``.
        scale: SSF scale ``(D,)``.
        shift: SSF shift ``(D,)``.
        eps: LayerNorm epsilon (added to the biased variance).

    Returns:
        Tensor with the shape and dtype of ``x`` (computed in float32, rounded once).

    Raises:
        ValueError: An argument has the wrong type, shape or device (raised before anything runs).
        RuntimeError: Kernel mode ``triton`` and the kernel cannot run this call.
    """
    _check(x, ln_weight, ln_bias, scale, shift, eps)
    d = x.shape[-1]
    why = f"D = {d} is wider than the kernel's {MAX_D} (a row must fit in registers)" if d > MAX_D else None
    backend = choose("ssf_layernorm", (x, ln_weight, ln_bias, scale, shift), unsupported=why)
    if backend == "triton":
        return _SSFLayerNormFunction.apply(x, ln_weight, ln_bias, scale, shift, float(eps))
    return reference_ssf_layernorm(x, ln_weight, ln_bias, scale, shift, eps)
