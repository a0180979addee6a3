"""Linear layer with a learned binary weight mask (mask tuning), the mask applied inside the GEMM tiles.

Regularized Mask Tuning (Zheng et al., ICCV 2023, arXiv:2307.15049) keeps a pretrained weight ``W`` frozen and
learns real-valued scores ``S`` of the same shape; the forward uses the binary mask ``M = 1[S > threshold]``:

    y = x (W * M)^T + b

The threshold is strict (``>``), as the official code's ``Binarizer`` (``S <= threshold`` -> 0,
``S > threshold`` -> 1) and its inference path (``mask_real > threshold``). The comparison is made in float32
(``scores.float() > float32(threshold)``). The threshold is not differentiable; the scores get a straight-through
gradient (``dM/dS := 1``):

    G = dy^T x                      (N, K), the gradient w.r.t. the effective weight W * M
    dL/dS = G * W                   (STE through M = 1[S > threshold], then through W * M)
    dL/dW = G * M                   (only when the weight requires grad)
    dL/dx = dy (W * M)
    dL/db = sum over rows of dy

Kernels (never a masked copy of ``W`` in memory: each ``W`` tile is loaded with its ``S`` tile and masked in
registers with ``tl.where(S > threshold, W, 0)``):
    * forward: grid ``(cdiv(M, BLOCK_M), cdiv(N, BLOCK_N))``, a ``BLOCK_K`` loop over ``K``; bias in the epilogue.
    * dx: grid ``(cdiv(M, BLOCK_M), cdiv(K, BLOCK_K))``, a loop over ``N``, the same in-register mask.
    * d(scores) / d(weight): grid ``(cdiv(N, BLOCK_N), cdiv(K, BLOCK_K))``, a loop over the ``M`` rows accumulating
      a ``dy^T x`` tile in float32; the epilogue multiplies it by the ``W`` tile (d(scores)) and / or masks it with
      the ``S`` tile (d(weight)) and writes the results directly: one GEMM for both.
Backward keeps ``weight``, ``scores`` and, when the weight or the scores require grad, ``x``: inputs only, no derived
weight-sized tensor.

Not part of the op: R-MT's gradient dropout on the scores' gradient and the choice of which weights get scores are
training-time concerns of the method that uses it.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Union

import torch
import torch.nn.functional as F

from ._dispatch import choose, interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # vpeft imports without Triton; the dispatch then always picks the reference
    triton = None
    tl = None

__all__ = ["masked_linear", "reference_masked_linear"]


# ----------------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------------


class _BinarizeSTE(torch.autograd.Function):
    """``1[scores > threshold]`` in ``scores.dtype``, with the identity (straight-through) gradient."""

    @staticmethod
    def forward(ctx, scores, threshold):
        return (scores.float() > threshold).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def reference_masked_linear(x: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor,
                            threshold: Union[float, torch.Tensor], bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pure-torch definition of :func:`masked_linear` (materialises the masked weight; autograd does the rest).

    Args:
        x: Input ``(..., K)``.
        weight: Frozen weight ``(N, K)``, dtype of ``x``.
        scores: Mask scores ``(N, K)``.
        threshold: Python number or 0-dim tensor; ``M = 1[scores > threshold]`` (compared in float32).
        bias: ``(N,)`` or ``None``.

    Returns:
        ``x (weight * M)^T + bias``, shape ``(..., N)``, dtype of ``x``.
    """
    thr = _threshold_value(threshold)
    mask = _BinarizeSTE.apply(scores, thr)
    return F.linear(x, weight * mask.to(weight.dtype), bias)


def _threshold_value(threshold: Union[float, torch.Tensor]) -> float:
    # float32, as the kernel receives it, so both backends draw the same mask.
    t = float(threshold.item() if isinstance(threshold, torch.Tensor) else threshold)
    return float(torch.tensor(t, dtype=torch.float32))


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------

if triton is not None:

    # Pointer blocks are built once per program and advanced by a scalar step in the K / N / M loops: besides being
    # the usual Triton GEMM form, it keeps per-iteration index arithmetic (costly under the interpreter) out of the
    # loops. Row offsets are int64 because row * stride can pass 2**31 on large activations.

    @triton.jit
    def _masked_linear_fwd_kernel(X, W, S, BIAS, Y, thr, M, N, K,
                                  stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sk,
                                  stride_ym, stride_yn,
                                  HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < M
        n_ok = rn < N
        x_ptrs = X + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :] * stride_xk
        # W^T and S^T tiles (BLOCK_K, BLOCK_N); the mask is applied to them in registers.
        w_ptrs = W + rk[:, None] * stride_wk + rn[None, :] * stride_wn
        s_ptrs = S + rk[:, None] * stride_sk + rn[None, :] * stride_sn
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = rk < K - k0
            x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            wt_mask = k_ok[:, None] & n_ok[None, :]
            w = tl.load(w_ptrs, mask=wt_mask, other=0.0)
            s = tl.load(s_ptrs, mask=wt_mask, other=0.0)
            w = tl.where(s.to(tl.float32) > thr, w, 0.0)
            if DOT_F32:  # see _dot_flags
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
            s_ptrs += BLOCK_K * stride_sk
        if HAS_BIAS:
            acc += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :] * stride_yn, acc.to(Y.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _masked_linear_dx_kernel(DY, W, S, DX, thr, M, N, K,
                                 stride_dym, stride_dyn, stride_wn, stride_wk, stride_sn, stride_sk,
                                 stride_dxm, stride_dxk,
                                 DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        rn = tl.arange(0, BLOCK_N)
        m_ok = rm < M
        k_ok = rk < K
        dy_ptrs = DY + rm.to(tl.int64)[:, None] * stride_dym + rn[None, :] * stride_dyn
        w_ptrs = W + rn[:, None] * stride_wn + rk[None, :] * stride_wk
        s_ptrs = S + rn[:, None] * stride_sn + rk[None, :] * stride_sk
        acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            n_ok = rn < N - n0
            dy = tl.load(dy_ptrs, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            w_mask = n_ok[:, None] & k_ok[None, :]
            w = tl.load(w_ptrs, mask=w_mask, other=0.0)
            s = tl.load(s_ptrs, mask=w_mask, other=0.0)
            w = tl.where(s.to(tl.float32) > thr, w, 0.0)
            if DOT_F32:  # see _dot_flags
                dy = dy.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(dy, w, acc, input_precision=PRECISION)
            dy_ptrs += BLOCK_N * stride_dyn
            w_ptrs += BLOCK_N * stride_wn
            s_ptrs += BLOCK_N * stride_sn
        tl.store(DX + rm.to(tl.int64)[:, None] * stride_dxm + rk[None, :] * stride_dxk, acc.to(DX.dtype.element_ty),
                 mask=m_ok[:, None] & k_ok[None, :])

    @triton.jit
    def _masked_linear_dws_kernel(DY, X, W, S, DS, DW, thr, M, N, K,
                                  stride_dym, stride_dyn, stride_xm, stride_xk, stride_wn, stride_wk,
                                  stride_sn, stride_sk, stride_dsn, stride_dsk, stride_dwn, stride_dwk,
                                  NEED_DS: tl.constexpr, NEED_DW: tl.constexpr,
                                  DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        rm = tl.arange(0, BLOCK_M)
        n_ok = rn < N
        k_ok = rk < K
        rm64 = rm.to(tl.int64)
        dyt_ptrs = DY + rm64[None, :] * stride_dym + rn[:, None] * stride_dyn  # dy^T tile (BLOCK_N, BLOCK_M)
        x_ptrs = X + rm64[:, None] * stride_xm + rk[None, :] * stride_xk
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)  # G = dy^T x for this (N, K) tile
        for m0 in range(0, M, BLOCK_M):
            m_ok = rm < M - m0
            dyt = tl.load(dyt_ptrs, mask=n_ok[:, None] & m_ok[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            if DOT_F32:  # see _dot_flags
                dyt = dyt.to(tl.float32)
                x = x.to(tl.float32)
            acc = tl.dot(dyt, x, acc, input_precision=PRECISION)
            dyt_ptrs += BLOCK_M * stride_dym
            x_ptrs += BLOCK_M * stride_xm
        tile = n_ok[:, None] & k_ok[None, :]
        if NEED_DS:
            # Straight-through: dL/dS = dL/d(W*M) * W, the mask's gradient passed through unchanged.
            w = tl.load(W + rn[:, None] * stride_wn + rk[None, :] * stride_wk, mask=tile, other=0.0).to(tl.float32)
            tl.store(DS + rn[:, None] * stride_dsn + rk[None, :] * stride_dsk, (acc * w).to(DS.dtype.element_ty),
                     mask=tile)
        if NEED_DW:
            s = tl.load(S + rn[:, None] * stride_sn + rk[None, :] * stride_sk, mask=tile, other=0.0).to(tl.float32)
            tl.store(DW + rn[:, None] * stride_dwn + rk[None, :] * stride_dwk,
                     tl.where(s > thr, acc, 0.0).to(DW.dtype.element_ty), mask=tile)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


def _block(n: int, cap: int) -> int:
    # tl.dot needs every block dimension >= 16; small problems get the smallest power of two that covers them.
    return max(16, min(cap, triton.next_power_of_2(n)))


#: Compiled-kernel tiling: caps on the output-tile sides and the reduction step, warps and pipeline stages. The
#: fastest of 6 tilings swept by ``benchmarks/kernel_tuning.py`` on an H200 (bf16, ViT MLP fc1) at batch 128: 1.56x /
#: 1.98x the eager time at ViT-B/16 / ViT-L/14, against 2.37x / 3.42x for 64 x 64 x 32 with 4 warps and 3 stages
#: (at batch 32 the two tie: 1.41x / 1.40x).
GPU_TILES = dict(out=128, red=32, num_warps=8, num_stages=4)


def _caps() -> tuple[int, int]:
    """Block caps (output dims, reduction dim): :data:`GPU_TILES` compiled; 64 everywhere under the interpreter,
    whose cost is per tile op (Python overhead), not per element: (2*197, 192) x (576, 192) forward + backward takes
    about 3 s there with 64, 12 s with 32."""
    return (64, 64) if interpreting() else (GPU_TILES["out"], GPU_TILES["red"])


def _launch() -> dict:
    """Launch options of the compiled kernels (the interpreter ignores them)."""
    return dict(num_warps=GPU_TILES["num_warps"], num_stages=GPU_TILES["num_stages"])


def _dot_flags(dtype: torch.dtype) -> dict:
    # DOT_F32: Triton's interpreter multiplies the bit patterns of bfloat16 operands in tl.dot
    # (triton-lang/triton#11584), so there bfloat16 tiles are widened to float32 first; compiled kernels use the
    # native bfloat16 dot.
    # fp32 GEMMs follow torch's own setting: IEEE fp32 by default, TF32 when the user allowed it for matmuls.
    tf32 = dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"
    return dict(DOT_F32=dtype == torch.bfloat16 and interpreting(), PRECISION="tf32" if tf32 else "ieee")


def _forward(x2, w, s, bias, thr):
    m, k = x2.shape
    n = w.shape[0]
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    if m == 0:
        return y
    out, red = _caps()
    bm, bn, bk = _block(m, out), _block(n, out), _block(k, red)
    _masked_linear_fwd_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        x2, w, s, bias if bias is not None else w, y, thr, m, n, k, x2.stride(0), x2.stride(1), w.stride(0),
        w.stride(1), s.stride(0), s.stride(1), y.stride(0), y.stride(1), HAS_BIAS=bias is not None,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **_launch(), **_dot_flags(x2.dtype))
    return y


def _grad_x(dy2, w, s, thr):
    m, n = dy2.shape
    k = w.shape[1]
    dx = torch.empty((m, k), dtype=w.dtype, device=w.device)
    if m == 0:
        return dx
    out, red = _caps()
    bm, bn, bk = _block(m, out), _block(n, red), _block(k, out)  # the loop runs over N
    _masked_linear_dx_kernel[(triton.cdiv(m, bm), triton.cdiv(k, bk))](
        dy2, w, s, dx, thr, m, n, k, dy2.stride(0), dy2.stride(1), w.stride(0), w.stride(1), s.stride(0),
        s.stride(1), dx.stride(0), dx.stride(1), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **_launch(),
        **_dot_flags(w.dtype))
    return dx


def _grad_weight_scores(dy2, x2, w, s, thr, need_ds, need_dw):
    m, n = dy2.shape
    k = x2.shape[1]
    ds = torch.empty(s.shape, dtype=s.dtype, device=s.device) if need_ds else None
    dw = torch.empty(w.shape, dtype=w.dtype, device=w.device) if need_dw else None
    if m == 0:
        return (ds.zero_() if ds is not None else None), (dw.zero_() if dw is not None else None)
    out, red = _caps()
    bm, bn, bk = _block(m, red), _block(n, out), _block(k, out)  # the loop runs over the M rows
    dummy = w  # any valid pointer for an output a constexpr flag switches off
    _masked_linear_dws_kernel[(triton.cdiv(n, bn), triton.cdiv(k, bk))](
        dy2, x2, w, s, ds if ds is not None else dummy, dw if dw is not None else dummy, thr, m, n, k,
        dy2.stride(0), dy2.stride(1), x2.stride(0), x2.stride(1), w.stride(0), w.stride(1), s.stride(0), s.stride(1),
        *(ds.stride() if ds is not None else (0, 0)), *(dw.stride() if dw is not None else (0, 0)),
        NEED_DS=need_ds, NEED_DW=need_dw, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **_launch(), **_dot_flags(x2.dtype))
    return ds, dw


class _MaskedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, scores, threshold, bias):
        k = x.shape[-1]
        x2 = x.reshape(-1, k)
        y = _forward(x2, weight, scores, bias, threshold)
        # Only the inputs: the masked weight is rebuilt tile by tile in backward, never stored; x only when the
        # weight or the scores need their gradient (dx needs just dy, W and S).
        ctx.save_for_backward(x2 if ctx.needs_input_grad[1] or ctx.needs_input_grad[2] else None, weight, scores)
        ctx.threshold = threshold
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, scores = ctx.saved_tensors
        need_dx, need_dw, need_ds, _, need_db = ctx.needs_input_grad
        dy2 = dy.reshape(-1, weight.shape[0])
        dx = _grad_x(dy2, weight, scores, ctx.threshold).view(ctx.x_shape) if need_dx else None
        dw = ds = None
        if need_dw or need_ds:
            ds, dw = _grad_weight_scores(dy2, x2, weight, scores, ctx.threshold, need_ds, need_dw)
        db = dy2.sum(0, dtype=torch.float32).to(dy.dtype) if need_db else None
        return dx, dw, ds, None, db


# ----------------------------------------------------------------------------------------------------------------
# Public entry
# ----------------------------------------------------------------------------------------------------------------


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _check(x, weight, scores, threshold, bias) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        got = _describe(x) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"masked_linear: x must be a floating-point tensor (..., K), got {got}")
    k = x.shape[-1]
    if (not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != k or weight.shape[0] < 1
            or k < 1 or weight.dtype != x.dtype or weight.device != x.device):
        got = _describe(weight) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"masked_linear: weight must be a non-empty (N, K) tensor with K = x.shape[-1] = {k}, the "
                         f"dtype of x ({x.dtype}) and its device ({x.device}); got {got}")
    if (not isinstance(scores, torch.Tensor) or scores.shape != weight.shape or not scores.is_floating_point()
            or scores.device != x.device):
        got = _describe(scores) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"masked_linear: scores must be a floating-point tensor of the weight's shape "
                         f"{tuple(weight.shape)} on {x.device}, got {got}")
    if isinstance(threshold, torch.Tensor):
        ok = threshold.dim() == 0 and not threshold.dtype.is_complex and threshold.dtype != torch.bool
        value = threshold.item() if ok else None
    else:
        ok = isinstance(threshold, numbers.Real) and not isinstance(threshold, bool)
        value = threshold if ok else None
    if not ok or math.isnan(value):
        got = _describe(threshold) if isinstance(threshold, torch.Tensor) else repr(threshold)
        raise ValueError(f"masked_linear: threshold must be a real number (Python number or 0-dim tensor), not NaN; "
                         f"got {got}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)
                             or bias.dtype != x.dtype or bias.device != x.device):
        got = _describe(bias) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"masked_linear: bias must be None or a ({weight.shape[0]},) tensor with the dtype of x "
                         f"({x.dtype}) on {x.device}, got {got}")


def masked_linear(x: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor, threshold: Union[float, torch.Tensor],
                  bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x (weight * 1[scores > threshold])^T + bias`` with a straight-through gradient for ``scores``.

    Runs the Triton kernels when the dispatch (:mod:`vpeft.kernels._dispatch`) chooses them, else
    :func:`reference_masked_linear`. Gradients: ``x``, ``weight`` (masked), ``scores`` (straight-through:
    ``(dy^T x) * weight``) and ``bias``, each only when it requires grad; none for ``threshold``.

    Args:
        x: Input ``(..., K)``: float32, float16 or bfloat16 for the kernels.
        weight: Frozen weight ``(N, K)``, same dtype and device as ``x``.
        scores: Real-valued mask scores ``(N, K)``, any float dtype.
        threshold: Python number or 0-dim tensor (read once on the host; a CUDA tensor costs a sync). The mask is
            ``scores > threshold``, strictly, compared in float32.
        bias: ``(N,)`` with the dtype of ``x``, or ``None``.

    Returns:
        Tensor ``(..., N)`` with the dtype of ``x`` (float32 accumulation).

    Raises:
        ValueError: An argument has the wrong type, shape, dtype or device (raised before anything runs).
        RuntimeError: Kernel mode ``triton`` and the kernels cannot run this call.
    """
    _check(x, weight, scores, threshold, bias)
    # Weight-sized offsets are int32 in the kernels (activation rows use int64).
    why = f"the weight has {weight.numel()} elements, 2**31 or more" if weight.numel() >= 2 ** 31 else None
    backend = choose("masked_linear", (x, weight, scores, bias), unsupported=why)
    if backend == "triton":
        return _MaskedLinearFunction.apply(x, weight, scores, _threshold_value(threshold), bias)
    return reference_masked_linear(x, weight, scores, threshold, bias)
