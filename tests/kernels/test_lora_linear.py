"""vpeft.kernels.lora_linear: the fused LoRA Linear kernel (Triton's interpreter on CPU) and its torch reference.

Every check compares against an independent expectation: the merged-weight formula ``x (W + s B_full A)^T + b``
evaluated with plain torch autograd in float64, where ``B_full`` (N x total rank) is built by writing each slice's B
into its rows and rank block. Neither the kernel nor ``reference_lora_linear`` computes it that way.

Tolerances are relative to the expectation's largest magnitude (``conftest.rel_err``): 1e-5 in float32; in float16
and bfloat16 about four units of the dtype's rounding at that magnitude (2**-11 and 2**-8 relative): 2e-3 and 2e-2.
Measured: fp16 errors 3e-4 to 5e-4 and bf16 5e-3 to 7e-3, about the same as the eager reference run in that dtype.
"""

from __future__ import annotations

import importlib
from typing import Optional

import pytest
import torch
from conftest import rel_err

from vpeft.kernels import last_backend, use_kernels
from vpeft.kernels.lora import MAX_KERNEL_RANK, lora_linear, reference_lora_linear

# The module object itself (for monkeypatching its dispatch): the package attribute of the same name is the op.
ll = importlib.import_module("vpeft.kernels.lora")

HALF_TOL = {torch.float16: 2e-3, torch.bfloat16: 2e-2}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make(shape: tuple[int, ...], n: int, r: int, out_slices: Optional[list[tuple[int, int]]], *, shared: bool = False,
         bias: bool = True, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0,
         grads: str = "x,A,B") -> dict:
    """Random inputs with every path of similar magnitude (x W^T and s (x A^T) B^T both ~1), so a wrong low-rank
    term cannot hide under the base GEMM. ``grads`` names the tensors that require grad."""
    g = torch.Generator().manual_seed(seed)
    k = shape[-1]
    n_slices = 1 if out_slices is None else len(out_slices)
    rows = n if out_slices is None else sum(hi - lo for lo, hi in out_slices)
    t = {
        "x": torch.randn(shape, generator=g),
        "weight": torch.randn(n, k, generator=g) / k ** 0.5,
        "bias": torch.randn(n, generator=g) if bias else None,
        "lora_A": torch.randn(r if shared else n_slices * r, k, generator=g) / k ** 0.5,
        "lora_B": torch.randn(rows, r, generator=g) / r ** 0.5,
    }
    names = {"x": "x", "W": "weight", "b": "bias", "A": "lora_A", "B": "lora_B"}
    want = {names[s] for s in grads.split(",") if s}
    out = {}
    for name, v in t.items():
        out[name] = None if v is None else v.to(device=device, dtype=dtype).requires_grad_(name in want)
    out.update(scaling=0.75, out_slices=out_slices)
    return out


def expected(args: dict, dy: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The written-out formula in float64 on CPU with autograd: y and the gradients of the tensors that require
    grad."""
    leaf = {k: (v.detach().double().cpu().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
            for k, v in args.items()}
    w, a, b = leaf["weight"], leaf["lora_A"], leaf["lora_B"]
    n, r = w.shape[0], b.shape[1]
    slices = leaf["out_slices"] or [(0, n)]
    shared = a.shape[0] == r
    b_full = torch.zeros(n, a.shape[0], dtype=torch.float64)
    row = 0
    for i, (lo, hi) in enumerate(slices):
        col = 0 if shared else i * r
        b_full[lo:hi, col:col + r] = b[row:row + hi - lo]
        row += hi - lo
    y = leaf["x"] @ (w + leaf["scaling"] * b_full @ a).t()
    if leaf["bias"] is not None:
        y = y + leaf["bias"]
    y.backward(dy.double().cpu())
    return y.detach(), {k: v.grad for k, v in leaf.items() if isinstance(v, torch.Tensor) and v.requires_grad}


def run(fn, args: dict, dy: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """``fn(**args)`` forward and backward; returns y and the gradients (None where not required)."""
    for v in args.values():
        if isinstance(v, torch.Tensor):
            v.grad = None
    y = fn(**args)
    y.backward(dy)
    return y.detach(), {k: v.grad for k, v in args.items() if isinstance(v, torch.Tensor)}


def upstream(args: dict, n: int, seed: int = 5) -> torch.Tensor:
    x = args["x"]
    dy = torch.randn(*x.shape[:-1], n, generator=torch.Generator().manual_seed(seed))
    return dy.to(device=x.device, dtype=x.dtype)


def check(args: dict, tol: float, *, check_reference: bool = True) -> dict:
    """Triton forward and every gradient against the float64 expectation (and the reference too); returns the
    errors."""
    n = args["weight"].shape[0]
    dy = upstream(args, n)
    y_exp, g_exp = expected(args, dy)
    with use_kernels("triton"):
        y, grads = run(lora_linear, args, dy)
        assert last_backend("lora_linear") == "triton"
    assert y.dtype == args["x"].dtype and y.shape == (*args["x"].shape[:-1], n)
    errs = {"y": rel_err(y.double().cpu(), y_exp)}
    for name, g in grads.items():
        if name in g_exp:
            assert g is not None and g.dtype == args[name].dtype, name
            errs[name] = rel_err(g.double().cpu(), g_exp[name])
        else:
            assert g is None, f"{name} does not require grad but got one"
    assert all(e < tol for e in errs.values()), errs  # not max(): a NaN would compare False and slip through
    if check_reference:
        y_ref, g_ref = run(reference_lora_linear, args, dy)
        ref_errs = {"y": rel_err(y_ref.double().cpu(), y_exp)}
        ref_errs.update({k: rel_err(g_ref[k].double().cpu(), v) for k, v in g_exp.items()})
        assert all(e < tol for e in ref_errs.values()), ref_errs
    return errs


# ---------------------------------------------------------------------------------------------------- numerics


def test_vit_qkv_q_and_v_slices_fp32():
    """The must-show case: ViT-Ti width 192, 197 tokens, batch 2, rank 4 on the q and v slices of the fused qkv."""
    args = make((2, 197, 192), 3 * 192, 4, [(0, 192), (384, 576)])
    check(args, 1e-5)
    # The frozen base weight and bias get no gradient.
    assert args["weight"].grad is None and args["bias"].grad is None


AWKWARD = {
    # batch 1, 257 tokens (CLIP ViT-L/14 at 224), widths off powers of two, slice edges inside 64-wide tiles,
    # one down-projection shared by both slices, no bias.
    "seq257_k200_shared_A_no_bias": dict(shape=(1, 257, 200), n=600, r=3, out_slices=[(0, 200), (400, 600)],
                                         shared=True, bias=False),
    # M = 1 (a single vector), rank 1, the whole output; x frozen: dx is None and g_h comes from the torch path.
    "vector_rank1_whole_output_x_frozen": dict(shape=(72,), n=100, r=1, out_slices=None, grads="A,B"),
    # Three adjacent slices crossing tile edges, total rank 15 (rank block padded to 16); A frozen (no g_h stored).
    "three_adjacent_slices_A_frozen": dict(shape=(3, 7, 72), n=216, r=5,
                                                out_slices=[(0, 72), (72, 144), (144, 216)], grads="x,B"),
}


@pytest.mark.parametrize("case", list(AWKWARD))
def test_awkward_shapes_fp32(case):
    kw = dict(AWKWARD[case])
    check(make(kw.pop("shape"), kw.pop("n"), kw.pop("r"), kw.pop("out_slices"), **kw), 1e-5)


def test_strided_inputs_and_rank_above_16():
    """Column-major x and weight, a transposed lora_B, rank 20 (block 32), and one slice that starts inside the
    third 64-wide output tile: the first tiles need no low-rank term but one of them must still store h."""
    args = make((197, 96), 200, 20, [(137, 190)], seed=3)
    with torch.no_grad():
        args["x"] = args["x"].t().contiguous().t().requires_grad_()
        args["weight"] = args["weight"].t().contiguous().t()
        args["lora_B"] = args["lora_B"].t().contiguous().t().requires_grad_()
    assert not args["x"].is_contiguous() and not args["weight"].is_contiguous()
    check(args, 1e-5, check_reference=False)


def test_base_weight_and_bias_gradients_when_they_train():
    """Also K = 24, less than one K tile: a single program along K stores g_h for dA."""
    args = make((1, 33, 24), 72, 2, [(0, 24), (48, 72)], grads="x,W,b,A,B", seed=4)
    errs = check(args, 1e-5, check_reference=False)
    assert {"weight", "bias"} <= errs.keys()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision(dtype):
    """16-bit inputs accumulate in float32: errors stay at the dtype's rounding, relative to the output scale.
    (bf16 runs under the interpreter because the kernel widens bf16 dot operands there; see ``_dot_flags``.)"""
    args = make((2, 197, 96), 3 * 96, 4, [(0, 96), (192, 288)], dtype=dtype, seed=6)
    check(args, HALF_TOL[dtype])


def test_inference_without_grad_matches_training_forward():
    args = make((1, 50, 40), 120, 2, [(0, 40), (80, 120)], seed=7)
    with use_kernels("triton"):
        y = lora_linear(**args)
        with torch.no_grad():
            y_inf = lora_linear(**args)
    assert not y_inf.requires_grad
    torch.testing.assert_close(y_inf, y.detach(), rtol=0, atol=0)


def test_double_backward_is_refused_not_silently_wrong():
    """dx depends on A and B, but the kernel's dx carries no graph: a second backward must raise."""
    args = make((1, 4, 16), 32, 2, None, grads="x,A,B")
    v = torch.randn(1, 4, 32, requires_grad=True)
    with use_kernels("triton"):
        (dx,) = torch.autograd.grad(lora_linear(**args), args["x"], grad_outputs=v, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        dx.sum().backward()


def test_autocast_runs_in_the_autocast_dtype():
    args = make((1, 20, 48), 96, 2, None, seed=8)
    with torch.autocast("cpu", dtype=torch.bfloat16), use_kernels("triton"):
        y = lora_linear(**args)
    assert y.dtype == torch.bfloat16 and last_backend("lora_linear") == "triton"
    y.float().sum().backward()
    assert args["lora_A"].grad.dtype == torch.float32  # the cast is differentiable back to the fp32 parameter
    y_exp, _ = expected(args, torch.ones_like(y))
    assert rel_err(y.double(), y_exp) < HALF_TOL[torch.bfloat16]


# ---------------------------------------------------------------------------------------------------- dispatch


def test_torch_mode_runs_the_reference():
    args = make((2, 9, 24), 72, 2, [(0, 24), (48, 72)])
    with use_kernels("torch"):
        y = lora_linear(**args)
    assert last_backend("lora_linear") == "torch"
    torch.testing.assert_close(y, reference_lora_linear(**args), rtol=0, atol=0)


def test_auto_mode_on_cpu_uses_the_reference():
    args = make((2, 9, 24), 72, 2, None)
    with use_kernels("auto"):
        lora_linear(**args)
    assert last_backend("lora_linear") == "torch"  # CPU tensors: auto never takes the interpreter


def test_forced_triton_refuses_float64_instead_of_falling_back():
    args = make((2, 9, 24), 72, 2, [(0, 24)], dtype=torch.float64)
    with use_kernels("triton"), pytest.raises(RuntimeError, match="float64"):
        lora_linear(**args)
    with use_kernels("auto"):  # auto takes it to the reference, which handles any float dtype
        y = lora_linear(**args)
    assert y.dtype == torch.float64 and last_backend("lora_linear") == "torch"


def test_rank_above_the_kernel_limit():
    args = make((1, 3, 8), 8, MAX_KERNEL_RANK + 1, None, grads="")
    with use_kernels("triton"), pytest.raises(RuntimeError, match=f"exceeds the kernel's {MAX_KERNEL_RANK}"):
        lora_linear(**args)
    with use_kernels("auto"):
        lora_linear(**args)
    assert last_backend("lora_linear") == "torch"


def _bad(**changes):
    args = make((2, 5, 16), 48, 2, [(0, 16), (32, 48)], grads="")
    args.update(changes)
    return args


BAD = {
    "x_last_dim": (lambda: _bad(x=torch.randn(2, 5, 15)), ValueError, r"x must have shape \(\.\.\., K\) with K = 16"),
    "weight_3d": (lambda: _bad(weight=torch.randn(1, 48, 16)), ValueError, "weight must be 2-D"),
    "bias_shape": (lambda: _bad(bias=torch.randn(47)), ValueError, r"bias must have shape \(48,\)"),
    "lora_B_rows": (lambda: _bad(lora_B=torch.randn(48, 2)), ValueError, "lora_B must have 32 rows"),
    "lora_A_rank": (lambda: _bad(lora_A=torch.randn(3, 16)), ValueError, r"lora_A must have shape \(2, 16\) or "
                                                                         r"\(4, 16\)"),
    "lora_A_in_features": (lambda: _bad(lora_A=torch.randn(4, 17)), ValueError, "lora_A must have shape"),
    "slices_overlap": (lambda: _bad(out_slices=[(0, 20), (16, 28)], lora_B=torch.randn(32, 2)), ValueError,
                       "ascending, non-overlapping"),
    "slices_descending": (lambda: _bad(out_slices=[(32, 48), (0, 16)]), ValueError, "ascending, non-overlapping"),
    "slices_out_of_range": (lambda: _bad(out_slices=[(0, 16), (40, 56)]), ValueError, r"within \[0, 48\)"),
    "slices_empty": (lambda: _bad(out_slices=[]), ValueError, "non-empty sequence"),
    "slices_not_pairs": (lambda: _bad(out_slices=[(0, 16, 1)]), ValueError, r"\(lo, hi\) pairs"),
    "dtype_mismatch": (lambda: _bad(lora_B=torch.randn(32, 2, dtype=torch.float16)), ValueError,
                       "lora_B=torch.float16"),
    "scaling_tensor": (lambda: _bad(scaling=torch.tensor(2.0)), TypeError, "scaling must be a real number"),
    "x_not_tensor": (lambda: _bad(x=[[1.0] * 16]), TypeError, "x must be a torch.Tensor"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_arguments_raise_before_dispatch(case, monkeypatch):
    build, exc, msg = BAD[case]

    def no_dispatch(*a, **k):
        raise AssertionError("dispatch reached with invalid arguments")

    monkeypatch.setattr(ll, "choose", no_dispatch)
    with use_kernels("triton"), pytest.raises(exc, match=msg):
        lora_linear(**build())


def test_import_does_not_need_triton():
    import subprocess
    import sys

    code = ("import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
            "import importlib, torch\n"
            "ll = importlib.import_module('vpeft.kernels.lora')\n"
            "assert ll.triton is None\n"
            "x = torch.randn(3, 8)\n"
            "y = ll.lora_linear(x, torch.randn(4, 8), None, torch.randn(2, 8), torch.randn(4, 2), 1.0)\n"
            "assert y.shape == (3, 4)\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --------------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_gpu_numerics(dtype):
    args = make((2, 197, 192), 3 * 192, 4, [(0, 192), (384, 576)], dtype=dtype, device="cuda")
    check(args, 1e-5 if dtype == torch.float32 else HALF_TOL[dtype])


# Speed is measured by `python -m benchmarks.kernels` (it prints the ratios), not asserted in a timed test.
