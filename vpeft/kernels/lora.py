"""Fused LoRA Linear: ``x W^T + b`` plus the low-rank update of one or more output slices, in one Triton kernel.

``lora_linear(x, weight, bias, lora_A, lora_B, scaling, out_slices)`` computes

    y = x W^T + b,   y[..., lo_i:hi_i] += scaling * (x A_i^T) B_i^T   for every slice i

without materialising ``W + scaling * B A``. ViT / CLIP sequences are short (197 or 257 tokens per image), and there
Triton LoRA kernels that fuse only the low-rank branch (one launch for the base GEMM, more for the branch) are known
to lose to eager mode: the work per launch is too small to pay for the launches and the extra passes over the output.
So the forward here is a single kernel whose K-loop accumulates the base tile and the rank-sized projection ``x A^T``
from the same loads of ``x``, and the backward's ``dx`` is a single kernel of the same shape (``dy W`` and ``dy B``
in one loop over N, then ``+ g_h A``).

Layout of the factors (the one ``SliceDeltaAdapter.kernel_factors`` produces):

* ``out_slices=None``: ``lora_A`` is ``(r, K)``, ``lora_B`` is ``(N, r)``: the whole output.
* ``out_slices=[(lo_0, hi_0), ...]`` (ascending, non-overlapping, within ``[0, N)``, e.g. the q and v slices of
  timm's fused qkv Linear): ``lora_B`` stacks the slices' B matrices in slice order (``sum(hi_i - lo_i)`` rows,
  ``r`` columns); ``lora_A`` is ``(n_slices * r, K)`` (rank block i belongs to slice i) or ``(r, K)`` (one
  down-projection shared by all slices). Output columns outside every slice are ``x W^T + b``.

Both layouts reduce, inside the kernels, to one per-output-column map: column ``n`` reads row ``brow[n]`` of
``lora_B`` (``-1`` outside every slice) against rank columns ``roff[n] : roff[n] + r`` of ``h = x A^T``. A tile that
straddles a slice boundary therefore needs no special case.

The pure-torch :func:`reference_lora_linear` defines the semantics; :func:`lora_linear` dispatches between it and the
kernels (:mod:`vpeft.kernels._dispatch`).
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ._dispatch import choose, interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # vpeft imports without Triton; dispatch then always picks the reference
    triton = None
    tl = None

__all__ = ["lora_linear", "reference_lora_linear", "MAX_KERNEL_RANK"]

#: Largest total rank (rows of ``lora_A``) the kernels take: the (BLOCK_M, rank) accumulators live in registers next
#: to the output tile, and beyond 128 they spill. Larger ranks run the torch reference (or raise in mode "triton").
MAX_KERNEL_RANK = 128


# ----------------------------------------------------------------------------------------------------- reference


def reference_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                          lora_B: torch.Tensor, scaling: float,
                          out_slices: Optional[Sequence[tuple[int, int]]] = None) -> torch.Tensor:
    """Pure-torch LoRA Linear; defines the semantics of :func:`lora_linear` (same arguments, differentiable).

    Args:
        x: Input ``(..., K)``.
        weight: Base weight ``(N, K)``.
        bias: Base bias ``(N,)`` or ``None``.
        lora_A: Down-projection: ``(r, K)``, or ``(n_slices * r, K)`` with one rank block per slice.
        lora_B: Up-projection: ``(N, r)`` without slices, else the slices' B stacked: ``(sum(hi - lo), r)``.
        scaling: Factor on the low-rank update.
        out_slices: ``[(lo, hi), ...]`` output column ranges that get the update, or ``None`` for all of them.

    Returns:
        ``(..., N)`` in ``x.dtype``.
    """
    y = F.linear(x, weight, bias)
    h = F.linear(x, lora_A)
    if out_slices is None:
        return y + (h @ lora_B.t()) * scaling
    r = lora_B.shape[1]
    shared = lora_A.shape[0] == r
    pieces, col, brow = [], 0, 0
    for i, (lo, hi) in enumerate(out_slices):
        if lo > col:
            pieces.append(y[..., col:lo])
        h_i = h if shared else h[..., i * r:(i + 1) * r]
        pieces.append(y[..., lo:hi] + (h_i @ lora_B[brow:brow + hi - lo].t()) * scaling)
        col, brow = hi, brow + hi - lo
    if col < y.shape[-1]:
        pieces.append(y[..., col:])
    # Built out of place so autograd sees plain slicing and cat (no in-place write into the GEMM output).
    return torch.cat(pieces, dim=-1)


# ------------------------------------------------------------------------------------------------------- kernels

if triton is not None:

    @triton.jit
    def _lora_fwd_kernel(
        x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, brow_ptr, roff_ptr, tile_ptr, y_ptr, h_ptr,
        M, N, K, R, RB,
        stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
        stride_ym, stride_yn, stride_hm, stride_hr,
        scaling,
        HAS_BIAS: tl.constexpr, STORE_H: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        """One (BLOCK_M, BLOCK_N) output tile: base GEMM, and in the same K-loop the (BLOCK_M, R) projection x A^T.

        The projection over all R rank columns is recomputed by every N-tile that needs it instead of coming from a
        separate first kernel: it adds BLOCK_R / BLOCK_N of the tile's FLOPs but reuses the x tile already loaded
        for the base GEMM, and saves a launch plus a second pass over x, which is what decides short sequences.
        Tiles with no column in any slice skip it, except the pid_n == 0 column of programs when h has to be
        stored for the backward (one program per row block writes it).
        """
        # int64 offsets: M * K may pass 2**31 for long batches (and the interpreter skips its overflow checks then).
        pid_m = tl.program_id(0).to(tl.int64)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
        offs_r = tl.arange(0, BLOCK_R).to(tl.int64)
        m_mask = offs_m < M
        n_mask = offs_n < N
        r_mask = offs_r < R

        need_lora = tl.load(tile_ptr + pid_n) != 0
        need_xa = need_lora
        if STORE_H:
            need_xa = need_lora | (pid_n == 0)

        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
        w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
        a_ptrs = a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar
        step_x = BLOCK_K * stride_xk
        step_w = BLOCK_K * stride_wk
        step_a = BLOCK_K * stride_ak
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        xa = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
        # Two copies of the loop rather than a branch inside it, so the plain one pipelines like an ordinary GEMM.
        if need_xa:
            for kb in range(0, (K + BLOCK_K - 1) // BLOCK_K):
                k_mask = offs_k < K - kb * BLOCK_K
                xt = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                wt = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                at = tl.load(a_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
                if DOT_F32:
                    xt = xt.to(tl.float32)
                    wt = wt.to(tl.float32)
                    at = at.to(tl.float32)
                acc = tl.dot(xt, wt, acc, input_precision=PRECISION)
                xa = tl.dot(xt, at, xa, input_precision=PRECISION)
                x_ptrs += step_x
                w_ptrs += step_w
                a_ptrs += step_a
        else:
            for kb in range(0, (K + BLOCK_K - 1) // BLOCK_K):
                k_mask = offs_k < K - kb * BLOCK_K
                xt = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                wt = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                if DOT_F32:
                    xt = xt.to(tl.float32)
                    wt = wt.to(tl.float32)
                acc = tl.dot(xt, wt, acc, input_precision=PRECISION)
                x_ptrs += step_x
                w_ptrs += step_w

        if need_xa:
            # h is rounded to the input dtype, as eager computes (x A^T) B^T: the same numbers the backward reads.
            h = xa.to(h_ptr.dtype.element_ty)
            if STORE_H:
                if pid_n == 0:
                    h_ptrs = h_ptr + offs_m[:, None] * stride_hm + offs_r[None, :] * stride_hr
                    tl.store(h_ptrs, h, mask=m_mask[:, None] & r_mask[None, :])
            if need_lora:
                brow = tl.load(brow_ptr + offs_n, mask=n_mask, other=-1)
                roff = tl.load(roff_ptr + offs_n, mask=n_mask, other=0)
                # (BLOCK_R, BLOCK_N) tile of the block-structured B^T: column n holds B[brow[n], :] at rank rows
                # roff[n] .. roff[n] + RB, zero elsewhere and outside every slice.
                rel = offs_r[:, None] - roff[None, :]
                b_mask = (brow[None, :] >= 0) & (rel >= 0) & (rel < RB)
                bt = tl.load(b_ptr + brow[None, :] * stride_bn + rel * stride_br, mask=b_mask, other=0.0)
                if DOT_F32:
                    h = h.to(tl.float32)
                    bt = bt.to(tl.float32)
                acc += tl.dot(h, bt, input_precision=PRECISION) * scaling

        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _lora_bwd_dx_kernel(
        dy_ptr, w_ptr, a_ptr, b_ptr, brow_ptr, roff_ptr, dx_ptr, gh_ptr,
        M, N, K, R, RB,
        stride_dym, stride_dyn, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
        stride_dxm, stride_dxk, stride_ghm, stride_ghr,
        scaling,
        STORE_GH: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        """One (BLOCK_M, BLOCK_K) tile of dx = dy W + g_h A, with g_h = scaling * dy B_blocks accumulated in the same
        loop over N from the same dy loads (recomputed per K-tile for the reason given in the forward). The
        pid_k == 0 programs store g_h for dA.

        The small dy B dot runs on every N-tile, also those outside every slice (masked B loads give zeros): a
        branch inside the loop would keep it from pipelining, and the dot is BLOCK_R / BLOCK_K of the tile's work.
        """
        pid_m = tl.program_id(0).to(tl.int64)
        pid_k = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
        offs_r = tl.arange(0, BLOCK_R).to(tl.int64)
        m_mask = offs_m < M
        k_mask = offs_k < K
        r_mask = offs_r < R

        dy_ptrs = dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn
        w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk
        step_dy = BLOCK_N * stride_dyn
        step_w = BLOCK_N * stride_wn
        acc = tl.full((BLOCK_M, BLOCK_K), 0.0, tl.float32)
        g = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
        for nb in range(0, (N + BLOCK_N - 1) // BLOCK_N):
            cols = nb * BLOCK_N + offs_n
            n_mask = cols < N
            dyt = tl.load(dy_ptrs, mask=m_mask[:, None] & n_mask[None, :], other=0.0)
            wt = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            brow = tl.load(brow_ptr + cols, mask=n_mask, other=-1)
            roff = tl.load(roff_ptr + cols, mask=n_mask, other=0)
            rel = offs_r[None, :] - roff[:, None]
            b_mask = (brow[:, None] >= 0) & (rel >= 0) & (rel < RB)
            bt = tl.load(b_ptr + brow[:, None] * stride_bn + rel * stride_br, mask=b_mask, other=0.0)
            if DOT_F32:
                dyt = dyt.to(tl.float32)
                wt = wt.to(tl.float32)
                bt = bt.to(tl.float32)
            acc = tl.dot(dyt, wt, acc, input_precision=PRECISION)
            g = tl.dot(dyt, bt, g, input_precision=PRECISION)
            dy_ptrs += step_dy
            w_ptrs += step_w

        # Rounded to the input dtype like eager autograd's g_h; dA is computed from the stored copy.
        gh = (g * scaling).to(gh_ptr.dtype.element_ty)
        if STORE_GH:
            if pid_k == 0:
                gh_ptrs = gh_ptr + offs_m[:, None] * stride_ghm + offs_r[None, :] * stride_ghr
                tl.store(gh_ptrs, gh, mask=m_mask[:, None] & r_mask[None, :])
        at = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                     mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        if DOT_F32:
            gh = gh.to(tl.float32)
            at = at.to(tl.float32)
        acc = tl.dot(gh, at, acc, input_precision=PRECISION)
        dx_ptrs = dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=m_mask[:, None] & k_mask[None, :])


# ----------------------------------------------------------------------------------------------------- launchers


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _rank_block(rank: int) -> int:
    # tl.dot needs every block dimension >= 16; the padding columns are masked to zero.
    return max(16, _next_pow2(rank))


#: Compiled-kernel tiles: ``small`` below ``big_m`` rows, ``big`` from there on; ``BLOCK_K`` for 16-bit inputs
#: (fp32 takes half: the same bytes per load). ``big`` is the fastest of 8 tilings swept by
#: ``benchmarks/kernel_tuning.py`` on an H200 (bf16, ViT-B/16 b32 and b128, ViT-L/14 b128): it won 5 of the 6 cases
#: (LoRA on q,v: 0.39x / 0.68x / 1.07x the eager time, against 0.50x / 0.90x / 1.19x for 128 x 128 x 64, 8 warps,
#: 3 stages); 128 x 128 stays faster only for LoRA on the whole qkv at batch 32 (1.02x vs 1.40x eager).
GPU_TILES = dict(
    big_m=4096,
    small=dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
    big=dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4),
)


def _config(m: int, dtype: torch.dtype) -> dict:
    """Fixed tile sizes (no autotuning: it would dominate under the interpreter and on first GPU calls).

    On GPU (:data:`GPU_TILES`): 64 x 64 output tiles for short inputs (up to a few thousand rows, where 128-row tiles
    would leave most SMs idle), 128 x 64 once there are enough rows to fill the machine.
    Under the interpreter the small-input tiles are used for every M: the CPU tests then run exactly the tiling of
    short sequences, and the interpreter's cost grows with the number of programs and ops, not with tile area, so
    64-wide tiles run faster there than 32-wide ones.
    """
    cfg = dict(GPU_TILES["big" if m >= GPU_TILES["big_m"] and not interpreting() else "small"])
    if dtype == torch.float32:
        cfg["BLOCK_K"] = max(16, cfg["BLOCK_K"] // 2)
    return cfg


def _dot_flags(dtype: torch.dtype) -> dict:
    # The interpreter's tl.dot multiplies bf16 tensors as their raw uint16 bit patterns; on CPU the bf16 operands
    # are widened to fp32 first, which gives the same products (bf16 x bf16 is exact in fp32) with fp32 accumulation.
    dot_f32 = dtype == torch.bfloat16 and interpreting()
    # fp32 inputs follow torch's matmul precision: full IEEE unless the user allowed TF32.
    precision = "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return dict(DOT_F32=dot_f32, PRECISION=precision)


@functools.lru_cache(maxsize=64)
def _column_maps(n: int, slices: Optional[tuple[tuple[int, int], ...]], rank: int, shared: bool,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(brow, roff)``, int32 of length N: the row of ``lora_B`` each output column reads (-1: none) and where its
    rank block starts in ``h``. Cached: a layer calls with the same layout every step."""
    if slices is None:
        brow = torch.arange(n, dtype=torch.int32)
        roff = torch.zeros(n, dtype=torch.int32)
    else:
        brow = torch.full((n,), -1, dtype=torch.int32)
        roff = torch.zeros(n, dtype=torch.int32)
        pos = 0
        for i, (lo, hi) in enumerate(slices):
            brow[lo:hi] = torch.arange(pos, pos + hi - lo, dtype=torch.int32)
            roff[lo:hi] = 0 if shared else i * rank
            pos += hi - lo
    return brow.to(device), roff.to(device)


@functools.lru_cache(maxsize=64)
def _tile_flags(n: int, slices: Optional[tuple[tuple[int, int], ...]], block_n: int,
                device: torch.device) -> torch.Tensor:
    """int32 per BLOCK_N output tile: 1 where the tile has a column in some slice. Decided on the host so the
    kernel branches on one scalar load instead of a reduction over the tile's column map."""
    tiles = triton.cdiv(n, block_n)
    if slices is None:
        return torch.ones(tiles, dtype=torch.int32, device=device)
    flags = torch.zeros(tiles, dtype=torch.int32)
    for lo, hi in slices:
        flags[lo // block_n:(hi - 1) // block_n + 1] = 1
    return flags.to(device)


def _forward(x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
             lora_B: torch.Tensor, scaling: float, slices: Optional[tuple[tuple[int, int], ...]], brow: torch.Tensor,
             roff: torch.Tensor, store_h: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    m, k = x2.shape
    n, rt, rb = weight.shape[0], lora_A.shape[0], lora_B.shape[1]
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    h = torch.empty((m, rt), dtype=x2.dtype, device=x2.device) if store_h else None
    if m == 0 or n == 0:
        if h is not None:
            h.zero_()
        return y, h
    cfg = _config(m, x2.dtype)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    tiles = _tile_flags(n, slices, cfg["BLOCK_N"], x2.device)
    h_arg = h if h is not None else y  # unused when STORE_H is off; any pointer of the right dtype
    _lora_fwd_kernel[grid](
        x2, weight, bias if bias is not None else y, lora_A, lora_B, brow, roff, tiles, y, h_arg,
        m, n, k, rt, rb,
        x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1),
        lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(1), h_arg.stride(0), h_arg.stride(1),
        float(scaling),
        HAS_BIAS=bias is not None, STORE_H=store_h, BLOCK_R=_rank_block(rt), **_dot_flags(x2.dtype), **cfg,
    )
    return y, h


def _backward_dx(dy2: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                 brow: torch.Tensor, roff: torch.Tensor, store_gh: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    m, n = dy2.shape
    k, rt, rb = weight.shape[1], lora_A.shape[0], lora_B.shape[1]
    dx = torch.empty((m, k), dtype=dy2.dtype, device=dy2.device)
    gh = torch.empty((m, rt), dtype=dy2.dtype, device=dy2.device) if store_gh else None
    if m == 0 or k == 0:
        if gh is not None:
            gh.zero_()
        return dx, gh
    cfg = _config(m, dy2.dtype)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(k, cfg["BLOCK_K"]))
    gh_arg = gh if gh is not None else dx
    _lora_bwd_dx_kernel[grid](
        dy2, weight, lora_A, lora_B, brow, roff, dx, gh_arg,
        m, n, k, rt, rb,
        dy2.stride(0), dy2.stride(1), weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1),
        lora_B.stride(0), lora_B.stride(1), dx.stride(0), dx.stride(1), gh_arg.stride(0), gh_arg.stride(1),
        float(scaling),
        STORE_GH=store_gh, BLOCK_R=_rank_block(rt), **_dot_flags(dy2.dtype), **cfg,
    )
    return dx, gh


class _LoRALinearFunction(torch.autograd.Function):
    """Autograd around the Triton kernels: the forward kernel, then the dx kernel (with g_h) in backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, slices):  # noqa: D102
        k, n, rb = weight.shape[1], weight.shape[0], lora_B.shape[1]
        shared = slices is not None and lora_A.shape[0] == rb and len(slices) > 1
        brow, roff = _column_maps(n, slices, rb, shared, x.device)
        x2 = x.reshape(math.prod(x.shape[:-1]), k)  # not -1: K may be 0
        y, h = _forward(x2, weight, bias, lora_A, lora_B, scaling, slices, brow, roff, store_h=ctx.needs_input_grad[4])
        # x only for the weight-shaped gradients (dA, dW); h only for dB. Never the merged weight.
        keep_x = ctx.needs_input_grad[1] or ctx.needs_input_grad[3]
        ctx.save_for_backward(x2 if keep_x else None, h, weight, lora_A, lora_B, brow, roff)
        ctx.scaling, ctx.slices, ctx.shared, ctx.x_shape = scaling, slices, shared, x.shape
        return y.view(*x.shape[:-1], n)

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernels' outputs carry no graph: refuse double backward
    def backward(ctx, dy):  # noqa: D102
        x2, h, weight, lora_A, lora_B, brow, roff = ctx.saved_tensors
        need_dx, need_dw, need_db, need_da, need_db_lora = ctx.needs_input_grad[:5]
        s, rb = ctx.scaling, lora_B.shape[1]
        n = weight.shape[0]
        slices = ctx.slices if ctx.slices is not None else ((0, n),)
        dy2 = dy.reshape(math.prod(ctx.x_shape[:-1]), n)
        dx = dw = db = da = dbl = gh = None
        if need_dx:
            dx, gh = _backward_dx(dy2, weight, lora_A, lora_B, s, brow, roff, store_gh=need_da)
            dx = dx.view(ctx.x_shape)
        elif need_da:
            # No dx to fuse g_h into: a rank-sized matmul per slice is cheaper than the M x K kernel.
            parts, pos = [], 0
            for lo, hi in slices:
                parts.append(dy2[:, lo:hi] @ lora_B[pos:pos + hi - lo])
                pos += hi - lo
            gh = (sum(parts) if ctx.shared else torch.cat(parts, dim=1)) * s
        # The weight-shaped gradients are single (R x K / slice x r) GEMMs reducing over M: cuBLAS at full
        # efficiency, nothing left to fuse, so they stay in torch.
        if need_da:
            da = gh.t() @ x2
        if need_db_lora:
            hs = h * s
            parts = []
            for i, (lo, hi) in enumerate(slices):
                h_i = hs if ctx.shared else hs[:, i * rb:(i + 1) * rb]
                parts.append(dy2[:, lo:hi].t() @ h_i)
            dbl = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if need_dw:  # frozen by default; only when a caller trains the base weight too
            dw = dy2.t() @ x2
        if need_db:
            db = dy2.sum(0)
        return dx, dw, db, da, dbl, None, None


# ------------------------------------------------------------------------------------------------------ public


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}"


def _check_slices(out_slices, n: int) -> Optional[tuple[tuple[int, int], ...]]:
    if out_slices is None:
        return None
    try:
        pairs = [tuple(operator.index(v) for v in s) for s in out_slices]
    except TypeError:
        raise ValueError(f"lora_linear: out_slices must be a sequence of (lo, hi) integer pairs, got {out_slices!r}") \
            from None
    if not pairs or any(len(p) != 2 for p in pairs):
        raise ValueError(f"lora_linear: out_slices must be a non-empty sequence of (lo, hi) pairs or None, "
                         f"got {out_slices!r}")
    prev = 0
    for lo, hi in pairs:
        if not (prev <= lo < hi <= n):
            raise ValueError(f"lora_linear: out_slices must be ascending, non-overlapping, non-empty ranges within "
                             f"[0, {n}) (the weight's output features), got {out_slices!r}")
        prev = hi
    return tuple(pairs)


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                lora_B: torch.Tensor, scaling: float,
                out_slices: Optional[Sequence[tuple[int, int]]] = None) -> torch.Tensor:
    """``x W^T + b`` plus ``scaling * (x A_i^T) B_i^T`` on each output slice, fused into one kernel when dispatched.

    Example (LoRA on the q and v slices of a timm ViT's fused qkv Linear, width D, rank r)::

        y = lora_linear(x, qkv.weight, qkv.bias, A, B, alpha / r, out_slices=[(0, D), (2 * D, 3 * D)])
        # A: (2 * r, D) (A_q stacked over A_v) or (r, D) shared; B: (2 * D, r) (B_q stacked over B_v)

    Args:
        x: Input ``(..., K)``; float32, float16 or bfloat16 for the kernel (the reference takes any float dtype).
            Under ``torch.autocast`` every tensor is first cast to the autocast dtype, as an eager Linear would.
        weight: Base weight ``(N, K)``, same dtype and device as ``x``.
        bias: Base bias ``(N,)`` or ``None``.
        lora_A: ``(r, K)``; with ``out_slices``, also ``(n_slices * r, K)``: rank block i belongs to slice i.
        lora_B: ``(N, r)`` when ``out_slices`` is None, else the slices' B matrices stacked in slice order:
            ``(sum(hi - lo), r)``.
        scaling: Factor on the low-rank update (LoRA's ``alpha / r``).
        out_slices: Ascending, non-overlapping ``(lo, hi)`` output column ranges that receive the update; ``None``
            for the whole output. Columns outside every slice are ``x W^T + b``.

    Returns:
        ``(..., N)`` in ``x.dtype`` (accumulated in float32). Differentiable in every tensor argument; the backward
        never forms ``W + scaling * B A``.

    Raises:
        TypeError: A tensor argument is not a tensor, or ``scaling`` is not a real number.
        ValueError: Shapes, dtypes or devices that do not fit together, or malformed ``out_slices``.
        RuntimeError: Kernel mode ``"triton"`` (:func:`vpeft.kernels.use_kernels`) and the kernel cannot run this
            call (float64, CPU tensors without ``TRITON_INTERPRET=1``, total rank above ``MAX_KERNEL_RANK``).
    """
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"lora_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"lora_linear: bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"lora_linear: scaling must be a real number (LoRA's alpha / r), got {scaling!r}")
    if weight.dim() != 2:
        raise ValueError(f"lora_linear: weight must be 2-D (out_features N, in_features K), got {_describe(weight)}")
    n, k = weight.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"lora_linear: x must have shape (..., K) with K = {k} (weight's in_features), "
                         f"got {_describe(x)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"lora_linear: bias must have shape ({n},) (weight's out_features) or be None, "
                         f"got {_describe(bias)}")
    slices = _check_slices(out_slices, n)
    if lora_B.dim() != 2 or lora_B.shape[1] < 1:
        raise ValueError(f"lora_linear: lora_B must be 2-D (rows, rank r >= 1), got {_describe(lora_B)}")
    rows = n if slices is None else sum(hi - lo for lo, hi in slices)
    r = lora_B.shape[1]
    if lora_B.shape[0] != rows:
        what = "N (weight's out_features)" if slices is None else "the total width of out_slices"
        raise ValueError(f"lora_linear: lora_B must have {rows} rows ({what}), got {_describe(lora_B)}")
    ranks = (r,) if slices is None else tuple(sorted({r, len(slices) * r}))
    if lora_A.dim() != 2 or lora_A.shape[1] != k or lora_A.shape[0] not in ranks:
        accepted = " or ".join(f"({q}, {k})" for q in ranks)
        raise ValueError(f"lora_linear: lora_A must have shape {accepted} (rank r = {r} from lora_B"
                         f"{'' if slices is None else f', {len(slices)} slices'}), got {_describe(lora_A)}")
    if torch.is_autocast_enabled(x.device.type):
        # Under autocast an eager Linear runs in the autocast dtype whatever its parameters are stored in; do the same
        # (differentiable casts) so mixed-precision training gets the kernel instead of a dtype-mismatch error.
        dt = torch.get_autocast_dtype(x.device.type)
        x, weight, bias, lora_A, lora_B = (t.to(dt) if t is not None and t.is_floating_point() else t
                                           for t in (x, weight, bias, lora_A, lora_B))
    tensors = {"x": x, "weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B}
    present = {name: t for name, t in tensors.items() if t is not None}
    if not x.is_floating_point() or len({t.dtype for t in present.values()}) != 1:
        dtypes = ", ".join(f"{name}={t.dtype}" for name, t in present.items())
        raise ValueError(f"lora_linear: all tensors must share one floating dtype (float32, float16 or bfloat16 "
                         f"for the kernel), got {dtypes}")
    if len({t.device for t in present.values()}) != 1:
        devices = ", ".join(f"{name}={t.device}" for name, t in present.items())
        raise ValueError(f"lora_linear: all tensors must be on one device, got {devices}")

    unsupported = None
    if lora_A.shape[0] > MAX_KERNEL_RANK:
        unsupported = f"total rank {lora_A.shape[0]} (rows of lora_A) exceeds the kernel's {MAX_KERNEL_RANK}"
    backend = choose("lora_linear", (x, weight, bias, lora_A, lora_B), unsupported=unsupported)
    if backend == "triton":
        return _LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, float(scaling), slices)
    return reference_lora_linear(x, weight, bias, lora_A, lora_B, float(scaling), slices)
