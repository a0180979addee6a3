"""DoRA linear (Liu et al., arXiv:2402.09353) as fused Triton kernels, with the pure-torch reference that defines it.

For each adapted output slice ``s`` (rows ``lo:hi`` of a possibly fused projection such as timm's ``qkv``)::

    n_s = ||W_s + scaling * B_s A_s||_row              (float32, detached, clamped at float32's tiny)
    y_s = (m_s / n_s) * (x W_s^T + scaling * (x A_s^T) B_s^T) + b_s

and every other output column is ``x W^T + b``. This is exactly what :class:`vpeft.methods.dora.DoRAAdapter`
computes on the site output (same float32 norm, same detach convention: the norm is a constant in backward, the
paper's Sec. 4.3), so its gradients for ``x``, ``A``, ``B`` and the magnitude are the adapter's.

Kernels (all tiles masked, so any M, N, K and rank work; the rank is padded to ``tl.dot``'s minimum of 16):

* ``_dora_norm_kernel`` (one program per adapted block of output rows): ``1 / n_s`` for its rows, streaming over K.
  ``W_s + scaling * B_s A_s`` is formed one register tile at a time and never written to memory.
* ``_dora_fwd_kernel`` (grid: row blocks of ``x`` x column tiles of the output): the base GEMM ``x W^T`` and the
  down-projection ``h = x A_s^T`` in the same pass over ``x``, then ``+ scaling * h B_s^T``, ``* m / n`` for the
  tile's rows and ``+ b``. Column tiles never straddle a slice boundary (see ``_tile_table``), so each program
  handles one slice or one unadapted span. It also writes ``h`` (rank-sized) for backward.
* ``_dora_bwd_col_kernel`` (adapted column tiles x chunks of rows): recomputes ``z = x W_s^T + scaling * h B_s^T``
  tile by tile (as vpeft's ``_DoRAScale`` does, instead of saving it) and reduces ``sum_rows(g * z)`` (the
  magnitude's gradient) and ``(g * m / n)^T h`` (B's gradient) into per-chunk partial sums.
* ``_dora_bwd_dx_kernel`` (row blocks x K tiles): ``dx = (g * m / n) W + scaling * ((g * m / n) B_s) A_s``, one pass
  over ``g``; also writes ``dh = scaling * (g * m / n) B_s`` (rank-sized) for A's gradient.

Autograd saves what LoRA saves (``x`` and the rank-sized ``h``) plus per-row vectors (``1 / n``); no output-sized
tensor. A's gradient ``dh^T x`` is one rank x K GEMM with nothing to fuse into it, left to torch (cuBLAS).

Differences from the adapter's torch path:
    * A trainable bias gets ``sum(g)``, the formula's gradient; ``_DoRAScale`` passes it only ``(m / n) * g`` (the part
      that reaches it through the base output). The bias is frozen in DoRA's recipe, so training is unaffected.
    * float16 / bfloat16: everything accumulates in float32 and ``x W^T`` is not rounded to the input dtype before
      the low-rank term and the rescale are applied (the torch path rounds ``y = x W^T + b`` first), so the two
      differ at the input dtype's rounding level, the kernel being the closer to exact arithmetic.
"""

from __future__ import annotations

import functools
import operator
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference and the validation work without Triton; dispatch then picks torch
    triton = None
    tl = None

__all__ = ["dora_linear", "reference_dora_linear"]

_TINY = torch.finfo(torch.float32).tiny  # vpeft's clamp of the norm: an all-zero row gives m / n = 0, not nan
_TILE_FIELDS = 5  # per column tile: first column, end column, rank-block offset (-1: unadapted), compact row, first


def _slices(out_slices, n: int) -> list[tuple[int, int]]:
    """``out_slices`` as a list of int pairs (the whole output when ``None``), or ``ValueError``."""
    if out_slices is None:
        return [(0, n)]
    try:  # operator.index: ints (Python, numpy, 0-d integer tensors), not floats or strings
        pairs = [(operator.index(lo), operator.index(hi)) for lo, hi in out_slices]
        ok = True
    except (TypeError, ValueError):
        ok = False
    if not ok or not pairs:
        raise ValueError(f"dora_linear: out_slices must be None or a non-empty sequence of (lo, hi) int pairs, got "
                         f"{out_slices!r}")
    pos = 0
    for lo, hi in pairs:
        if not (pos <= lo < hi <= n):
            raise ValueError(f"dora_linear: out_slices must be ascending, non-overlapping, non-empty ranges within "
                             f"the {n} output features (0 <= lo < hi <= {n}), got {pairs}")
        pos = hi
    return pairs


def _check(x, weight, bias, lora_A, lora_B, magnitude, scaling, out_slices) -> tuple[list[tuple[int, int]], int]:
    """Validate a call; returns ``(slices, rank)``. Raises ``ValueError`` naming the first bad argument."""
    tensors = dict(x=x, weight=weight, lora_A=lora_A, lora_B=lora_B, magnitude=magnitude)
    if bias is not None:
        tensors["bias"] = bias
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            what = f"a {t.dtype} tensor" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"dora_linear: {name} must be a floating-point tensor, got {what}")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise ValueError(f"dora_linear: scaling must be a Python number, got {type(scaling).__name__}")
    if weight.dim() != 2 or min(weight.shape) < 1:
        raise ValueError(f"dora_linear: weight must be 2-D (out_features, in_features) with both >= 1, got shape "
                         f"{tuple(weight.shape)}")
    n, k = weight.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"dora_linear: x must have shape (..., {k}) to match weight {tuple(weight.shape)}, got "
                         f"{tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"dora_linear: bias must have shape ({n},) or be None, got {tuple(bias.shape)}")
    slices = _slices(out_slices, n)
    n_sl, width = len(slices), sum(hi - lo for lo, hi in slices)
    if lora_A.dim() != 2 or lora_A.shape[1] != k or lora_A.shape[0] < n_sl or lora_A.shape[0] % n_sl:
        raise ValueError(f"dora_linear: lora_A must have shape ({n_sl} * r, {k}) (one rank-r block per slice, r >= 1), "
                         f"got {tuple(lora_A.shape)}")
    r = lora_A.shape[0] // n_sl
    if tuple(lora_B.shape) != (width, r):
        raise ValueError(f"dora_linear: lora_B must have shape ({width}, {r}) (the slices' widths stacked, rank r), "
                         f"got {tuple(lora_B.shape)}")
    if tuple(magnitude.shape) != (width,):
        raise ValueError(f"dora_linear: magnitude must have shape ({width},) (the slices' widths stacked), got "
                         f"{tuple(magnitude.shape)}")
    for name in ("weight", "bias", "lora_A", "lora_B"):
        t = tensors.get(name)
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"dora_linear: {name} has dtype {t.dtype} but x has {x.dtype}; weight, bias, lora_A "
                             f"and lora_B must share x's dtype (magnitude may be any floating dtype)")
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        raise ValueError(f"dora_linear: all tensors must be on one device, got {sorted(map(str, devices))}")
    return slices, r


@torch.no_grad()
def _reference_inv_norms(weight, lora_A, lora_B, scaling, slices, r) -> list[torch.Tensor]:
    """vpeft's ``DoRAAdapter.row_norms``, reciprocated: float32, detached, clamped at float32's tiny."""
    out, c = [], 0
    for i, (lo, hi) in enumerate(slices):
        v = torch.addmm(weight[lo:hi].float(), lora_B[c:c + hi - lo].float(), lora_A[i * r:(i + 1) * r].float(),
                        alpha=scaling)
        out.append(torch.linalg.vector_norm(v, dim=1).clamp_min_(_TINY).reciprocal_())
        c += hi - lo
    return out


def reference_dora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                          lora_B: torch.Tensor, magnitude: torch.Tensor, scaling: float,
                          out_slices: Optional[Sequence[tuple[int, int]]] = None) -> torch.Tensor:
    """DoRA linear in plain torch (autograd differentiates it): the semantics :func:`dora_linear` implements.

    Operation for operation what ``DoRAAdapter`` does on ``y = F.linear(x, weight, bias)``: per slice
    ``b + (y - b + scaling * (x A^T) B^T) * (m / n)`` with ``n`` the float32 row norm of ``W + scaling * B A``
    computed under ``no_grad``. Unlike the adapter it lets autograd keep the output-sized ``z`` per slice.

    Args:
        x: Input ``(..., K)``.
        weight: Frozen weight ``(N, K)``.
        bias: ``(N,)`` or ``None``.
        lora_A: ``(n_slices * r, K)``, rank block ``i`` for slice ``i``.
        lora_B: ``(sum of slice widths, r)``, slices stacked in order.
        magnitude: ``(sum of slice widths,)``, slices stacked in order.
        scaling: Multiplier of the low-rank update (``alpha / r``).
        out_slices: Ascending, non-overlapping ``(lo, hi)`` output ranges adapted, or ``None`` for all outputs.

    Returns:
        ``(..., N)`` in ``x``'s dtype.
    """
    slices, r = _check(x, weight, bias, lora_A, lora_B, magnitude, scaling, out_slices)
    inv_norms = _reference_inv_norms(weight, lora_A, lora_B, scaling, slices, r)
    y = F.linear(x, weight, bias)
    h = x @ lora_A.t()
    parts, pos, c = [], 0, 0
    for i, (lo, hi) in enumerate(slices):
        if lo > pos:
            parts.append(y[..., pos:lo])
        scale = (magnitude[c:c + hi - lo] * inv_norms[i].to(magnitude.dtype)).to(y.dtype)
        z = y[..., lo:hi] + (h[..., i * r:(i + 1) * r] @ lora_B[c:c + hi - lo].t()) * scaling
        if bias is not None:
            b = bias[lo:hi]
            parts.append(torch.addcmul(b, z - b, scale))
        else:
            parts.append(z * scale)
        pos, c = hi, c + hi - lo
    if pos < y.shape[-1]:
        parts.append(y[..., pos:])
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


# ----------------------------------------------------------------------------------------------------------- Triton

if triton is not None:
    # Row offsets are int64 (no int32 overflow on large activations, and Triton's interpreter skips its per-op
    # overflow check for 64-bit integers); pointer tiles are built once and advanced along K.

    @triton.jit
    def _dora_norm_kernel(w_ptr, a_ptr, lb_ptr, inv_ptr, tiles_ptr, K, R, scaling,
                          s_wn, s_wk, s_am, s_ak, s_bn, s_br,
                          TINY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
        # Sum of squares of W + s B A, one (BLOCK_N, BLOCK_K) tile at a time. Expanding instead,
        # ||W||^2 + 2 s <W, B A> + s^2 ||B A||^2 (via the N x r W A^T and the r x r A A^T), would cost the same
        # N K r multiply-adds as forming the tile of B A, and it cancels catastrophically when the update nearly
        # cancels a row (n^2 << ||W||^2: float32 relative error about 1e-7 * ||W||^2 / n^2). Forming the sum of
        # squares directly has no cancellation and is what vpeft computes (fp32 addmm, then vector_norm).
        tile = tl.program_id(0)
        n_lo = tl.load(tiles_ptr + tile * 5)
        n_hi = tl.load(tiles_ptr + tile * 5 + 1)
        r_off = tl.load(tiles_ptr + tile * 5 + 2)
        c_lo = tl.load(tiles_ptr + tile * 5 + 3)
        offs_n = tl.arange(0, BLOCK_N)
        rn = n_lo + offs_n
        rc = c_lo + offs_n
        mask_n = rn < n_hi
        rr = tl.arange(0, BLOCK_R)
        mask_r = rr < R
        rk = tl.arange(0, BLOCK_K)
        b = tl.load(lb_ptr + rc.to(tl.int64)[:, None] * s_bn + rr[None, :] * s_br,
                    mask=mask_n[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
        w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * s_wn + rk[None, :] * s_wk
        a_ptrs = a_ptr + (r_off + rr)[:, None] * s_am + rk[None, :] * s_ak
        ss = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask_k = rk < K - k0
            w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
            a = tl.load(a_ptrs, mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
            # Full float32 (no TF32), as vpeft's norm: this is rank-sized work next to the GEMMs.
            v = w + scaling * tl.dot(b, a, input_precision="ieee")
            ss += tl.sum(v * v, axis=1)
            w_ptrs += BLOCK_K * s_wk
            a_ptrs += BLOCK_K * s_ak
        nrm = tl.maximum(tl.sqrt_rn(ss), TINY)
        tl.store(inv_ptr + rc, tl.div_rn(tl.full((BLOCK_N,), 1.0, tl.float32), nrm), mask=mask_n)

    @triton.jit
    def _dora_fwd_kernel(x_ptr, w_ptr, bias_ptr, a_ptr, lb_ptr, mag_ptr, inv_ptr, y_ptr, h_ptr, tiles_ptr,
                         M, K, R, scaling,
                         s_xm, s_xk, s_wn, s_wk, s_am, s_ak, s_bn, s_br, s_ym, s_yn, s_hm, s_hr,
                         HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
        pid_m = tl.program_id(0)
        tile = tl.program_id(1)
        n_lo = tl.load(tiles_ptr + tile * 5)
        n_hi = tl.load(tiles_ptr + tile * 5 + 1)
        r_off = tl.load(tiles_ptr + tile * 5 + 2)
        c_lo = tl.load(tiles_ptr + tile * 5 + 3)
        first = tl.load(tiles_ptr + tile * 5 + 4)
        rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        rn = n_lo + offs_n
        rk = tl.arange(0, BLOCK_K)
        mask_m = rm < M
        mask_n = rn < n_hi
        x_ptrs = x_ptr + rm[:, None] * s_xm + rk[None, :] * s_xk
        w_ptrs = w_ptr + rn.to(tl.int64)[None, :] * s_wn + rk[:, None] * s_wk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if r_off >= 0:
            # Adapted slice: the down-projection h = x A^T rides along the base GEMM's pass over x.
            rr = tl.arange(0, BLOCK_R)
            mask_r = rr < R
            a_ptrs = a_ptr + (r_off + rr)[None, :] * s_am + rk[:, None] * s_ak
            h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                mask_k = rk < K - k0
                x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                a = tl.load(a_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
                acc = tl.dot(x, w, acc, input_precision=PRECISION)
                h = tl.dot(x, a, h, input_precision=PRECISION)
                x_ptrs += BLOCK_K * s_xk
                w_ptrs += BLOCK_K * s_wk
                a_ptrs += BLOCK_K * s_ak
            # h is rounded to x's dtype, as the torch path's activation x A^T is; backward reuses these values. The
            # first tile of each slice stores it (every tile of the slice computed the same h).
            hq = h.to(h_ptr.dtype.element_ty)
            tl.store(h_ptr + rm[:, None] * s_hm + (r_off + rr)[None, :] * s_hr, hq,
                     mask=mask_m[:, None] & mask_r[None, :] & (first != 0))
            rc = c_lo + offs_n
            b = tl.load(lb_ptr + rc.to(tl.int64)[None, :] * s_bn + rr[:, None] * s_br,
                        mask=mask_r[:, None] & mask_n[None, :], other=0.0)
            acc += scaling * tl.dot(hq, b, input_precision=PRECISION)
            mag = tl.load(mag_ptr + rc, mask=mask_n, other=0.0).to(tl.float32)
            acc = acc * (mag * tl.load(inv_ptr + rc, mask=mask_n, other=0.0))[None, :]
        else:
            for k0 in range(0, K, BLOCK_K):
                mask_k = rk < K - k0
                x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                acc = tl.dot(x, w, acc, input_precision=PRECISION)
                x_ptrs += BLOCK_K * s_xk
                w_ptrs += BLOCK_K * s_wk
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * s_ym + rn[None, :] * s_yn, acc.to(y_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def _dora_bwd_col_kernel(x_ptr, w_ptr, h_ptr, lb_ptr, mag_ptr, inv_ptr, g_ptr, pm_ptr, pb_ptr, tiles_ptr,
                             M, K, R, C, scaling, rows_per_chunk,
                             s_xm, s_xk, s_wn, s_wk, s_hm, s_hr, s_bn, s_br, s_gm, s_gn,
                             NEED_M: tl.constexpr, NEED_B: tl.constexpr, PRECISION: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             BLOCK_R: tl.constexpr):
        # Column-wise reductions over a chunk of rows for one adapted column tile: sum_rows(g * z) (magnitude) and
        # dz^T h (B), into per-chunk partial sums.
        tile = tl.program_id(0)
        chunk = tl.program_id(1)
        n_lo = tl.load(tiles_ptr + tile * 5)
        n_hi = tl.load(tiles_ptr + tile * 5 + 1)
        r_off = tl.load(tiles_ptr + tile * 5 + 2)
        c_lo = tl.load(tiles_ptr + tile * 5 + 3)
        offs_n = tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        rn = n_lo + offs_n
        rc = c_lo + offs_n
        mask_n = rn < n_hi
        rr = tl.arange(0, BLOCK_R)
        mask_r = rr < R
        rk = tl.arange(0, BLOCK_K)
        b = tl.load(lb_ptr + rc.to(tl.int64)[None, :] * s_bn + rr[:, None] * s_br,
                    mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        mag = tl.load(mag_ptr + rc, mask=mask_n, other=0.0).to(tl.float32)
        scale = mag * tl.load(inv_ptr + rc, mask=mask_n, other=0.0)
        w_base = w_ptr + rn.to(tl.int64)[None, :] * s_wn + rk[:, None] * s_wk
        dm = tl.zeros((BLOCK_N,), dtype=tl.float32)
        db = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
        m_start = chunk.to(tl.int64) * rows_per_chunk
        m_end = tl.minimum(m_start + rows_per_chunk, M)
        for m0 in range(m_start, m_end, BLOCK_M):
            rm = m0 + offs_m
            mask_m = rm < m_end
            g = tl.load(g_ptr + rm[:, None] * s_gm + rn[None, :] * s_gn, mask=mask_m[:, None] & mask_n[None, :],
                        other=0.0).to(tl.float32)
            hq = tl.load(h_ptr + rm[:, None] * s_hm + (r_off + rr)[None, :] * s_hr,
                         mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            if NEED_M:
                # z = x W^T + s h B^T, recomputed (as vpeft's _DoRAScale does) instead of saved by forward.
                z = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                x_ptrs = x_ptr + rm[:, None] * s_xm + rk[None, :] * s_xk
                w_ptrs = w_base
                for k0 in range(0, K, BLOCK_K):
                    mask_k = rk < K - k0
                    x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                    w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                    z = tl.dot(x, w, z, input_precision=PRECISION)
                    x_ptrs += BLOCK_K * s_xk
                    w_ptrs += BLOCK_K * s_wk
                z += scaling * tl.dot(hq, b, input_precision=PRECISION)
                dm += tl.sum(g * z, axis=0)
            if NEED_B:
                # dz in the operands' dtype, as the torch path's g * (m / n) is.
                dz = (g * scale[None, :]).to(hq.dtype)
                db = tl.dot(tl.trans(dz), hq, db, input_precision=PRECISION)
        if NEED_M:
            tl.store(pm_ptr + chunk * C + rc, dm, mask=mask_n)
        if NEED_B:
            tl.store(pb_ptr + (chunk * C + rc)[:, None] * R + rr[None, :], db, mask=mask_n[:, None] & mask_r[None, :])

    @triton.jit
    def _dora_bwd_dx_kernel(g_ptr, w_ptr, a_ptr, lb_ptr, mag_ptr, inv_ptr, dx_ptr, dh_ptr, tiles_ptr, n_tiles,
                            M, K, R, RT, scaling,
                            s_gm, s_gn, s_wn, s_wk, s_am, s_ak, s_bn, s_br, s_dxm, s_dxk, s_dhm, s_dhr,
                            NEED_X: tl.constexpr, STORE_DH: tl.constexpr, PRECISION: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK_RT: tl.constexpr):
        # Row-wise: one pass over every column tile of g gives dz W (dz = g on unadapted tiles) and dh = dz B for all
        # slices at once (each slice's B placed in its rank block of dh), then dx += s dh A.
        pid_m = tl.program_id(0)
        pid_k = tl.program_id(1)
        rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = rm < M
        rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = rk < K
        rt = tl.arange(0, BLOCK_RT)
        mask_t = rt < RT
        offs_n = tl.arange(0, BLOCK_N)
        g_rows = g_ptr + rm[:, None] * s_gm
        w_cols = w_ptr + rk[None, :] * s_wk
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        dh = tl.zeros((BLOCK_M, BLOCK_RT), dtype=tl.float32)
        for t in range(0, n_tiles):
            n_lo = tl.load(tiles_ptr + t * 5)
            n_hi = tl.load(tiles_ptr + t * 5 + 1)
            r_off = tl.load(tiles_ptr + t * 5 + 2)
            c_lo = tl.load(tiles_ptr + t * 5 + 3)
            rn = n_lo + offs_n
            mask_n = rn < n_hi
            g = tl.load(g_rows + rn[None, :] * s_gn, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
            if r_off >= 0:
                rc = c_lo + offs_n
                mag = tl.load(mag_ptr + rc, mask=mask_n, other=0.0).to(tl.float32)
                scale = mag * tl.load(inv_ptr + rc, mask=mask_n, other=0.0)
                dz = (g.to(tl.float32) * scale[None, :]).to(g.dtype)
                j = rt - r_off  # column j of dh is rank index j - r_off of this slice, when in range
                b = tl.load(lb_ptr + rc.to(tl.int64)[:, None] * s_bn + j[None, :] * s_br,
                            mask=mask_n[:, None] & ((j >= 0) & (j < R))[None, :], other=0.0)
                dh = tl.dot(dz, b, dh, input_precision=PRECISION)
            else:
                dz = g
            if NEED_X:
                w = tl.load(w_cols + rn.to(tl.int64)[:, None] * s_wn, mask=mask_n[:, None] & mask_k[None, :],
                            other=0.0)
                acc = tl.dot(dz, w, acc, input_precision=PRECISION)
        # dh in the operands' dtype, as the torch path's gradient of x A^T is.
        dhq = (dh * scaling).to(dh_ptr.dtype.element_ty)
        if NEED_X:
            a = tl.load(a_ptr + rt[:, None] * s_am + rk[None, :] * s_ak, mask=mask_t[:, None] & mask_k[None, :],
                        other=0.0)
            acc = tl.dot(dhq, a, acc, input_precision=PRECISION)
            tl.store(dx_ptr + rm[:, None] * s_dxm + rk[None, :] * s_dxk, acc.to(dx_ptr.dtype.element_ty),
                     mask=mask_m[:, None] & mask_k[None, :])
        if STORE_DH:
            tl.store(dh_ptr + rm[:, None] * s_dhm + rt[None, :] * s_dhr, dhq,
                     mask=mask_m[:, None] & mask_t[None, :] & (pid_k == 0))


def _interpreting() -> bool:
    from ._dispatch import interpreting

    return interpreting()


#: Compiled-kernel tiles (caps; the row block shrinks for short inputs), warps and pipeline stages.
#: ``benchmarks/kernel_tuning.py`` sweeps these on a GPU.
GPU_TILES = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)


def _blocks(m: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K)``: fixed tiles, no autotuning (the interpreter would run every candidate).

    :data:`GPU_TILES` compiled, with a K step halved for float32 (whose tiles are twice the bytes); 64-wide tiles
    with a K step of 64 under the interpreter, whose cost is per op and per program, not per element. The row block
    shrinks for short inputs, down to ``tl.dot``'s minimum of 16.
    """
    if _interpreting():
        return min(64, max(16, triton.next_power_of_2(m))), 64, 64
    bm = min(GPU_TILES["BLOCK_M"], max(16, triton.next_power_of_2(m)))
    bk = GPU_TILES["BLOCK_K"] // 2 if dtype == torch.float32 else GPU_TILES["BLOCK_K"]
    return bm, GPU_TILES["BLOCK_N"], max(16, bk)


def _launch() -> dict:
    """Launch options of the compiled kernels (the interpreter ignores them)."""
    return dict(num_warps=GPU_TILES["num_warps"], num_stages=GPU_TILES["num_stages"])


def _rank_block(r: int) -> int:
    """A rank padded to a power of two >= 16 (``tl.dot``'s minimum); the padding is masked."""
    return max(16, triton.next_power_of_2(r))


def _precision(dtype: torch.dtype) -> Optional[str]:
    # float32 operands: exact products unless torch itself allows TF32 matmuls, so the kernel matches torch's default.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return None


@functools.lru_cache(maxsize=64)
def _tile_rows(n: int, slices: tuple[tuple[int, int], ...], r: int, block_n: int) -> tuple[tuple[int, ...], ...]:
    """Column tiles of the output, none straddling a slice boundary: ``(first, end, rank offset or -1, compact row,
    first tile of its slice)``. Adapted tiles come first (the norm and column kernels use only those)."""
    adapted, plain, pos, c = [], [], 0, 0
    for i, (lo, hi) in enumerate(slices):
        for s in range(pos, lo, block_n):
            plain.append((s, min(s + block_n, lo), -1, 0, 0))
        for s in range(lo, hi, block_n):
            adapted.append((s, min(s + block_n, hi), i * r, c + s - lo, int(s == lo)))
        pos, c = hi, c + hi - lo
    for s in range(pos, n, block_n):
        plain.append((s, min(s + block_n, n), -1, 0, 0))
    return tuple(adapted + plain)


# (n, slices, r, block_n, device) -> (tile table on the device, number of adapted tiles): one small host-to-device
# copy per layout instead of one per call.
_TABLES: dict[tuple, tuple[torch.Tensor, int]] = {}


def _tile_table(n: int, slices, r: int, block_n: int, device: torch.device) -> tuple[torch.Tensor, int, int]:
    """``(table int32 (tiles, 5) on device, number of tiles, number of adapted tiles)``."""
    key = (n, tuple(slices), r, block_n, str(device))
    if key not in _TABLES:
        rows = _tile_rows(n, tuple(slices), r, block_n)
        table = torch.tensor(rows, dtype=torch.int32).reshape(-1, _TILE_FIELDS).to(device)
        _TABLES[key] = (table, sum(1 for row in rows if row[2] >= 0))
    table, n_adapted = _TABLES[key]
    return table, table.shape[0], n_adapted


def _inv_norms(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
               slices: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """``1 / ||W_s + scaling * B_s A_s||`` per adapted row, slices stacked (float32; the kernel's norm)."""
    r = lora_A.shape[0] // len(slices)
    _, bn, bk = _blocks(1, weight.dtype)
    table, _, n_adapted = _tile_table(weight.shape[0], slices, r, bn, weight.device)
    inv = torch.empty(lora_B.shape[0], device=weight.device, dtype=torch.float32)
    _dora_norm_kernel[(n_adapted,)](
        weight, lora_A, lora_B, inv, table, weight.shape[1], r, float(scaling),
        weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
        TINY=_TINY, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=_rank_block(r))
    return inv


class _DoRALinear(torch.autograd.Function):
    """Forward and backward through the kernels; saves ``x``, the rank-sized ``h = x A^T`` and ``1 / n``."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, scaling, slices):  # noqa: D102
        n, k = weight.shape
        r = lora_A.shape[0] // len(slices)
        x2 = x.reshape(-1, k)
        m = x2.shape[0]
        bm, bn, bk = _blocks(m, x.dtype)
        table, n_tiles, _ = _tile_table(n, slices, r, bn, x.device)
        inv = _inv_norms(weight, lora_A, lora_B, scaling, slices)
        y = torch.empty(m, n, device=x.device, dtype=x.dtype)
        h = torch.empty(m, lora_A.shape[0], device=x.device, dtype=x.dtype)
        if m > 0:
            _dora_fwd_kernel[(triton.cdiv(m, bm), n_tiles)](
                x2, weight, bias if bias is not None else x2, lora_A, lora_B, magnitude, inv, y, h, table,
                m, k, r, float(scaling),
                x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1),
                lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(1), h.stride(0), h.stride(1),
                HAS_BIAS=bias is not None, PRECISION=_precision(x.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                BLOCK_R=_rank_block(r), **_launch())
        ctx.save_for_backward(x2, h, weight, lora_A, lora_B, magnitude, inv)
        ctx.scaling, ctx.slices, ctx.r, ctx.x_shape = float(scaling), slices, r, x.shape
        return y.view(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, grad_y):  # noqa: D102
        x2, h, weight, lora_A, lora_B, magnitude, inv = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b, need_m = ctx.needs_input_grad[:6]
        s, slices, r = ctx.scaling, ctx.slices, ctx.r
        n, k = weight.shape
        m = x2.shape[0]
        g = grad_y.reshape(m, n).to(x2.dtype)
        bm, bn, bk = _blocks(m, x2.dtype)
        table, n_tiles, n_adapted = _tile_table(n, slices, r, bn, x2.device)
        prec = _precision(x2.dtype)
        c_total, r_total = lora_B.shape[0], lora_A.shape[0]
        dx = dw = dbias = da = db = dmag = None

        if need_m or need_b:
            if m == 0:
                pm = torch.zeros(1, c_total, device=x2.device)
                pb = torch.zeros(1, c_total, r, device=x2.device)
            else:
                # Rows split into chunks so that there are enough programs; the per-chunk partial sums are reduced
                # below (deterministic, unlike atomics).
                m_tiles = triton.cdiv(m, bm)
                want = 4 if _interpreting() else 2 * torch.cuda.get_device_properties(x2.device).multi_processor_count
                rows_per_chunk = triton.cdiv(m_tiles, max(1, min(m_tiles, triton.cdiv(want, n_adapted)))) * bm
                chunks = triton.cdiv(m, rows_per_chunk)
                pm = torch.empty(chunks, c_total, device=x2.device, dtype=torch.float32) if need_m else inv
                pb = torch.empty(chunks, c_total, r, device=x2.device, dtype=torch.float32) if need_b else inv
                _dora_bwd_col_kernel[(n_adapted, chunks)](
                    x2, weight, h, lora_B, magnitude, inv, g, pm, pb, table, m, k, r, c_total, s, rows_per_chunk,
                    x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), h.stride(0), h.stride(1),
                    lora_B.stride(0), lora_B.stride(1), g.stride(0), g.stride(1),
                    NEED_M=bool(need_m), NEED_B=bool(need_b), PRECISION=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                    BLOCK_R=_rank_block(r), **_launch())
            if need_m:
                dmag = (pm.sum(0) * inv).to(magnitude.dtype)
            if need_b:
                db = (pb.sum(0) * s).to(lora_B.dtype)

        if need_x or need_a:
            dx2 = torch.empty_like(x2) if need_x else g
            dh = torch.empty(m, r_total, device=x2.device, dtype=x2.dtype) if need_a else g
            if m > 0:
                # Without dx, a single column of programs computes dh only.
                _dora_bwd_dx_kernel[(triton.cdiv(m, bm), triton.cdiv(k, bk) if need_x else 1)](
                    g, weight, lora_A, lora_B, magnitude, inv, dx2, dh, table, n_tiles, m, k, r, r_total, s,
                    g.stride(0), g.stride(1), weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1),
                    lora_B.stride(0), lora_B.stride(1), dx2.stride(0), dx2.stride(1), dh.stride(0), dh.stride(1),
                    NEED_X=bool(need_x), STORE_DH=bool(need_a), PRECISION=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                    BLOCK_RT=_rank_block(r_total), **_launch())
            if need_x:
                dx = dx2.view(ctx.x_shape)
            if need_a:
                # dA = dh^T x: one rank x K GEMM reducing over every row, nothing left to fuse into it (cuBLAS).
                da = (dh.t() @ x2).to(lora_A.dtype)

        if need_w or need_bias:
            # A trainable base weight or bias (both frozen in DoRA's recipe): plain torch.
            if need_w:
                col = torch.ones(n, device=x2.device, dtype=torch.float32)  # m / n on adapted rows, 1 elsewhere
                pos = 0
                for lo, hi in slices:
                    col[lo:hi] = magnitude[pos:pos + hi - lo].detach().float() * inv[pos:pos + hi - lo]
                    pos += hi - lo
                dw = ((g.float() * col).to(g.dtype).t() @ x2).to(weight.dtype)
            if need_bias:
                # The bias is added after the rescale (y = (m / n) z + b), so its gradient is g's column sum. vpeft's
                # _DoRAScale instead returns only the (m / n) * g that reaches the bias through the base output.
                dbias = g.float().sum(0).to(weight.dtype)
        return dx, dw, dbias, da, db, dmag, None, None


def dora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                lora_B: torch.Tensor, magnitude: torch.Tensor, scaling: float,
                out_slices: Optional[Sequence[tuple[int, int]]] = None) -> torch.Tensor:
    """DoRA linear: ``x W^T + b`` with DoRA's normalised low-rank update on the adapted output slices.

    Per adapted slice ``s``: ``(m_s / n_s) * (x W_s^T + scaling * (x A_s^T) B_s^T) + b_s`` with
    ``n_s = ||W_s + scaling * B_s A_s||`` per output row (float32, a constant for autograd, as in vpeft's
    ``DoRAAdapter``); other columns ``x W^T + b``. Runs the fused Triton kernels or :func:`reference_dora_linear`,
    as :mod:`vpeft.kernels._dispatch` chooses (op name ``"dora_linear"``).

    Args:
        x: Input ``(..., K)``.
        weight: Base weight ``(N, K)``, x's dtype (usually frozen).
        bias: ``(N,)`` in x's dtype, or ``None``.
        lora_A: Down-projections ``(n_slices * r, K)``: rank block ``i`` belongs to slice ``i``.
        lora_B: Up-projections ``(sum of slice widths, r)``, slices stacked in order.
        magnitude: DoRA magnitudes ``(sum of slice widths,)``, slices stacked in order; any floating dtype.
        scaling: Multiplier of the low-rank update (``alpha / r``).
        out_slices: Ascending, non-overlapping ``(lo, hi)`` output ranges (e.g. q and v of a fused qkv), or
            ``None`` to adapt every output (then ``lora_A`` is ``(r, K)``, ``lora_B`` ``(N, r)``).

    Returns:
        ``(..., N)`` in x's dtype.

    Raises:
        ValueError: A shape, dtype, device or ``out_slices`` that does not fit (the message names the argument).
        RuntimeError: Mode ``"triton"`` was forced and the kernel cannot run this call.
    """
    slices, _ = _check(x, weight, bias, lora_A, lora_B, magnitude, scaling, out_slices)
    from ._dispatch import choose

    backend = choose("dora_linear", (x, weight, bias, lora_A, lora_B, magnitude), unsupported=None)
    if backend == "triton":
        return _DoRALinear.apply(x, weight, bias, lora_A, lora_B, magnitude, scaling, tuple(slices))
    return reference_dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling, out_slices)
