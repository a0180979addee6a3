"""masked_linear: the Triton kernels (the interpreter on CPU) and the torch reference against an independent float64
expectation, forward and every gradient; the threshold convention; what backward saves; dispatch and argument checks.

The expectation builds the masked weight explicitly with the straight-through trick
``W * (M + (S - S.detach()))`` (value ``W * M``, ``d/dS = 1``), so plain autograd gives
``dx = dy (W*M)``, ``dW = (dy^T x) * M``, ``dS = (dy^T x) * W``, ``db = sum dy``.

Tolerances (max |error| / max |expected|, per output and per gradient): 1e-5 in float32 (IEEE float32 dots). In
float16 / bfloat16 the expectation is computed in float64 from the same rounded inputs; the kernels accumulate in
float32 and round once (half an ulp: 4.9e-4 / 3.9e-3 of the value; the interpreter rounds to bfloat16 toward zero,
up to one ulp, 7.8e-3), so 2e-3 / 1.6e-2. Observed on (2, 65, 96) x (80, 96): float32 <= 2.7e-7, float16 <= 4.4e-4,
bfloat16 <= 5.9e-3.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from vpeft.kernels import last_backend, use_kernels
from vpeft.kernels import masked as mod
from vpeft.kernels.masked import masked_linear, reference_masked_linear

# With a GPU the conftest leaves the interpreter off, so the Triton path needs CUDA tensors.
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}
NAMES = ("x", "weight", "scores", "bias")


def expected(x, w, s, thr, b):
    """The masked weight written out, with the straight-through estimator as a detach trick."""
    m = (s > float(thr)).to(w.dtype)
    w_eff = w * (m + (s - s.detach()))
    y = x @ w_eff.T
    return y + b if b is not None else y


def make_inputs(x_shape, n, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = x_shape[-1]
    x = torch.randn(x_shape, generator=g, dtype=torch.float64)
    w = torch.randn(n, k, generator=g, dtype=torch.float64) / math.sqrt(k)
    s = torch.randn(n, k, generator=g, dtype=torch.float64)  # threshold 0 masks about half
    b = torch.randn(n, generator=g, dtype=torch.float64) if bias else None
    dy = torch.randn(*x_shape[:-1], n, generator=g, dtype=torch.float64)
    return [x, w, s, b], dy


def run(fn, tensors, dy, thr, dtype, scores_dtype=None, grad=(True,) * 4):
    """Output and the four gradients (``None`` where the tensor is absent or does not require grad)."""
    dts = (dtype, dtype, scores_dtype or dtype, dtype)
    leaves = [t.detach().to(DEV, dt).clone().requires_grad_(r) if t is not None else None
              for t, dt, r in zip(tensors, dts, grad)]
    x, w, s, b = leaves
    y = fn(x, w, s, thr, b)
    y.backward(dy.to(DEV, y.dtype))
    return y.detach(), [t.grad if t is not None else None for t in leaves]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def check(fn, tensors, dy, thr, dtype, scores_dtype=None, grad=(True,) * 4, backend="triton"):
    # The expectation sees the inputs (and dy) rounded to the dtypes the op gets: only the op's own error counts.
    sdt = scores_dtype or dtype
    rounded = [t.to(dt).double() if t is not None else None for t, dt in zip(tensors, (dtype, dtype, sdt, dtype))]
    exp_y, exp_g = run(expected, rounded, dy.to(dtype).double(), thr, torch.float64, grad=grad)
    with use_kernels(backend):
        y, grads = run(fn, tensors, dy, thr, dtype, scores_dtype, grad)
    if fn is masked_linear:
        assert last_backend("masked_linear") == backend
    assert y.dtype == dtype and y.shape == (*tensors[0].shape[:-1], tensors[1].shape[0])
    assert rel_err(y, exp_y) < TOL[dtype], ("y", rel_err(y, exp_y))
    for name, g, e, t, r, dt in zip(NAMES, grads, exp_g, tensors, grad, (dtype, dtype, sdt, dtype)):
        if t is None or not r:
            assert g is None, name
            continue
        assert g.dtype == dt and g.shape == t.shape, name
        assert rel_err(g, e) < TOL[dtype], (name, rel_err(g, e))
    return exp_y, exp_g


SHAPES = {
    "vit_s_qkv": ((2, 197, 192), 576, True),  # the must-show case
    "m1_no_bias": ((1, 1, 200), 300, False),
    "batch1_t257": ((1, 257, 200), 300, True),
    "2d_small": ((5, 24), 40, True),
}


@pytest.mark.parametrize("case", list(SHAPES))
def test_triton_matches_float64_expectation_fp32(case):
    x_shape, n, bias = SHAPES[case]
    tensors, dy = make_inputs(x_shape, n, bias)
    check(masked_linear, tensors, dy, 0.0, torch.float32)


def test_reference_matches_float64_expectation():
    tensors, dy = make_inputs(*SHAPES["vit_s_qkv"])
    check(reference_masked_linear, tensors, dy, 0.0, torch.float64, backend="torch")
    check(masked_linear, tensors, dy, 0.0, torch.float32, backend="torch")  # the public op in torch mode


@pytest.mark.parametrize("thr", [-1e9, 1e9, torch.tensor(0.5)], ids=["none_masked", "all_masked", "tensor_0.5"])
def test_thresholds(thr):
    tensors, dy = make_inputs((3, 37, 72), 100)
    exp_y, exp_g = check(masked_linear, tensors, dy, thr, torch.float32)
    if isinstance(thr, float) and thr > 0:
        # Everything masked: y is the bias, no gradient reaches x or W, but the scores still get (dy^T x) * W.
        assert torch.equal(exp_y, tensors[3].float().double().expand_as(exp_y).to(DEV))
        assert float(exp_g[0].abs().max()) == 0 and float(exp_g[1].abs().max()) == 0
        assert float(exp_g[2].abs().max()) > 0


def test_threshold_is_strict():
    # Scores exactly at the threshold are masked (the official Binarizer: S <= thr -> 0, S > thr -> 1).
    k, n = 20, 24
    s = torch.randint(-2, 3, (n, k)).float().to(DEV)
    w = torch.randn(n, k, device=DEV)
    with use_kernels("triton"):
        y = masked_linear(torch.eye(k, device=DEV), w, s, 1.0)  # row i of y = column i of (W * M)
    assert torch.equal(y, (w * (s > 1.0)).T)
    assert (s == 1.0).any() and (s > 1.0).any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision(dtype):
    tensors, dy = make_inputs((2, 65, 96), 80)
    check(masked_linear, tensors, dy, 0.0, dtype)  # scores in the weight's dtype
    check(masked_linear, tensors, dy, 0.0, dtype, scores_dtype=torch.float32)  # float32 scores on a half weight


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_compiled_kernels_on_gpu_vit_b(dtype):
    # Compiled kernels (native bfloat16 dot, 64x64x32 tiles); ViT-B's qkv projection.
    tensors, dy = make_inputs((4, 197, 768), 2304)
    check(masked_linear, tensors, dy, 0.0, dtype)


def test_only_requested_gradients_are_computed():
    # Mask tuning's case: frozen weight and bias, trainable scores; then a frozen input and trainable weight.
    tensors, dy = make_inputs((2, 9, 40), 24)
    check(masked_linear, tensors, dy, 0.0, torch.float32, grad=(True, False, True, False))
    check(masked_linear, tensors, dy, 0.0, torch.float32, grad=(False, True, False, True))


def test_backward_saves_only_the_inputs():
    x = torch.randn(2, 5, 24, device=DEV, requires_grad=True)
    w = torch.randn(40, 24, device=DEV)
    s = torch.randn(40, 24, device=DEV, requires_grad=True)
    with use_kernels("triton"):
        y = masked_linear(x, w, s, 0.0)
    saved = y.grad_fn.saved_tensors
    assert [t.data_ptr() for t in saved] == [x.data_ptr(), w.data_ptr(), s.data_ptr()]
    assert [tuple(t.shape) for t in saved] == [(10, 24), (40, 24), (40, 24)]
    with use_kernels("triton"):
        y = masked_linear(x, w, s.detach(), 0.0)  # only dx wanted: x is not kept
    assert [t.data_ptr() if t is not None else None for t in y.grad_fn.saved_tensors] == [None, w.data_ptr(),
                                                                                           s.data_ptr()]


def test_strided_operands():
    # x a slice whose rows are wider than K, and a transposed weight and scores: the kernels take the strides as
    # they are (no copies), so the leaves are the wide / transposed tensors and the op sees views of them.
    tensors, dy = make_inputs((3, 7, 64), 48)
    xw, ww, sw, b = [t.float().to(DEV).requires_grad_() for t in tensors]
    wt, st = [t.detach().T.contiguous().requires_grad_() for t in (ww, sw)]  # (64, 48): .T is a (48, 64) view
    x, w, s = xw[..., :40], wt.T[:, :40], st.T[:, :40]
    assert x.stride(-2) == 64 and w.stride() == (1, 48) and s.stride() == (1, 48)
    with use_kernels("triton"):
        y = masked_linear(x, w, s, 0.0, b)
    y.backward(dy.float().to(DEV))
    leaves = [t.detach().double().requires_grad_() for t in (x, w, s, b)]
    exp = expected(*leaves[:3], 0.0, leaves[3])
    exp.backward(dy.float().double().to(DEV))
    assert rel_err(y, exp) < 1e-5
    for g, e in zip((xw.grad[..., :40], wt.grad.T[:, :40], st.grad.T[:, :40], b.grad), leaves):
        assert rel_err(g, e.grad) < 1e-5
    assert float(xw.grad[..., 40:].abs().max()) == 0 and float(wt.grad.T[:, 40:].abs().max()) == 0


def test_empty_batch():
    x = torch.randn(0, 24, device=DEV, requires_grad=True)
    w = torch.randn(40, 24, device=DEV, requires_grad=True)
    s = torch.randn(40, 24, device=DEV, requires_grad=True)
    with use_kernels("triton"):
        y = masked_linear(x, w, s, 0.0)
        y.sum().backward()
    assert y.shape == (0, 40) and x.grad.shape == (0, 24)
    assert float(w.grad.abs().sum()) == 0 and float(s.grad.abs().sum()) == 0


def test_torch_mode_runs_the_reference():
    tensors, _ = make_inputs((2, 5, 24), 40)
    x, w, s, b = [t.to(DEV, torch.float32) for t in tensors]
    with use_kernels("torch"):
        y = masked_linear(x, w, s, 0.25, b)
    assert last_backend("masked_linear") == "torch"
    torch.testing.assert_close(y, reference_masked_linear(x, w, s, 0.25, b), rtol=0, atol=0)


def test_forced_triton_refuses_float64():
    x, w = torch.randn(2, 8, device=DEV, dtype=torch.float64), torch.randn(4, 8, device=DEV, dtype=torch.float64)
    with use_kernels("triton"), pytest.raises(RuntimeError, match="float64 is not supported"):
        masked_linear(x, w, w, 0.0)


def _bad(case):
    x, w, s, b = [t.float() for t in make_inputs((2, 3, 8), 6)[0]]
    return {
        "x_int": ((x.long(), w, s, 0.0, b), "x must be a floating-point tensor"),
        "weight_k": ((x, w[:, :7], s, 0.0, b), r"weight must be a non-empty \(N, K\) tensor with K = .* = 8.*"
                                               r"got shape \(6, 7\)"),
        "weight_1d": ((x, w[0], s, 0.0, b), r"weight must be .*got shape \(8,\)"),
        "weight_dtype": ((x, w.half(), s, 0.0, b), r"weight must be .*dtype of x \(torch.float32\).*float16"),
        "scores_shape": ((x, w, s.T, 0.0, b), r"scores must be .*\(6, 8\).*got shape \(8, 6\)"),
        "scores_int": ((x, w, s.long(), 0.0, b), r"scores must be a floating-point tensor"),
        "threshold_nan": ((x, w, s, float("nan"), b), "threshold must be a real number"),
        "threshold_1d": ((x, w, s, torch.zeros(1), b), r"threshold must be .*got shape \(1,\)"),
        "threshold_str": ((x, w, s, "0.5", b), "threshold must be a real number"),
        "threshold_bool": ((x, w, s, True, b), "threshold must be a real number"),
        "bias_shape": ((x, w, s, 0.0, b[:5]), r"bias must be None or a \(6,\) tensor.*got shape \(5,\)"),
        "bias_dtype": ((x, w, s, 0.0, b.half()), r"bias must be .*float16"),
    }[case]


@pytest.mark.parametrize("case", ["x_int", "weight_k", "weight_1d", "weight_dtype", "scores_shape", "scores_int",
                                  "threshold_nan", "threshold_1d", "threshold_str", "threshold_bool", "bias_shape",
                                  "bias_dtype"])
def test_bad_arguments_raise_value_error_before_running(case, monkeypatch):
    def no_dispatch(*a, **k):
        raise AssertionError("dispatch reached with bad arguments")

    monkeypatch.setattr(mod, "choose", no_dispatch)
    args, msg = _bad(case)
    with use_kernels("triton"), pytest.raises(ValueError, match=msg):
        masked_linear(*args)


def test_module_imports_and_runs_without_triton():
    code = ("import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
            "import torch\n"
            "from vpeft.kernels.masked import masked_linear, reference_masked_linear\n"
            "from vpeft.kernels import last_backend\n"
            "x, w, s = torch.randn(2, 4, 8), torch.randn(6, 8), torch.randn(6, 8)\n"
            "y = masked_linear(x, w, s, 0.0)\n"
            "assert last_backend('masked_linear') == 'torch'\n"
            "assert torch.equal(y, reference_masked_linear(x, w, s, 0.0))\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
