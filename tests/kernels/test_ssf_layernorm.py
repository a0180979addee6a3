"""ssf_layernorm: the Triton kernels (the interpreter on CPU) and the torch reference against an independent float64
expectation (LayerNorm, affine, scale and shift written out, gradients from plain autograd), forward and every
gradient; dispatch and argument checks.

Tolerances (max |error| / max |expected|, per output and per gradient): 1e-5 in float32. In float16 / bfloat16 the
expectation is computed in float64 from the same rounded inputs (and dy); the kernels compute in float32 and round
once (half an ulp: 4.9e-4 / 3.9e-3 of the value; the interpreter rounds to bfloat16 toward zero, up to one ulp,
7.8e-3), so 2e-3 / 1.6e-2. Observed on (2, 197, 200): float32 <= 1.6e-7, float16 <= 3.5e-4, bfloat16 <= 4e-3.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from vpeft.kernels import last_backend, use_kernels
from vpeft.kernels import ssf as mod
from vpeft.kernels.ssf import reference_ssf_layernorm, ssf_layernorm

# With a GPU the conftest leaves the interpreter off, so the Triton path needs CUDA tensors.
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}
NAMES = ("x", "ln_weight", "ln_bias", "scale", "shift")


def expected(x, w, b, s, t, eps):
    """SSF after LayerNorm written out by hand (biased variance, as nn.LayerNorm)."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    h = (x - mean) / torch.sqrt(var + eps)
    if w is not None:
        h = h * w
    if b is not None:
        h = h + b
    return h * s + t


def make_inputs(shape, affine=(True, True), seed=0):
    g = torch.Generator().manual_seed(seed)
    d = shape[-1]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5  # a non-zero mean to subtract
    w = 1 + 0.3 * torch.randn(d, generator=g, dtype=torch.float64) if affine[0] else None
    b = 0.3 * torch.randn(d, generator=g, dtype=torch.float64) if affine[1] else None
    s = 1 + 0.3 * torch.randn(d, generator=g, dtype=torch.float64)
    t = 0.3 * torch.randn(d, generator=g, dtype=torch.float64)
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    return [x, w, b, s, t], dy


def run(fn, tensors, dy, dtype, eps=1e-5, grad=(True,) * 5):
    """Output and the five gradients (``None`` where the tensor is absent or does not require grad)."""
    leaves = [t.detach().to(DEV, dtype).clone().requires_grad_(r) if t is not None else None
              for t, r in zip(tensors, grad)]
    y = fn(*leaves, eps)
    y.backward(dy.to(DEV, y.dtype))
    return y.detach(), [t.grad if t is not None else None for t in leaves]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def check(fn, tensors, dy, dtype, eps=1e-5, grad=(True,) * 5, backend="triton"):
    # The expectation sees the inputs (and dy) rounded to dtype, so only the op's own error is measured.
    rounded = [t.to(dtype).double() if t is not None else None for t in tensors]
    exp_y, exp_g = run(expected, rounded, dy.to(dtype).double(), torch.float64, eps, grad)
    with use_kernels(backend):
        y, grads = run(fn, tensors, dy, dtype, eps, grad)
    if fn is ssf_layernorm:
        assert last_backend("ssf_layernorm") == backend
    assert y.dtype == dtype and y.shape == tensors[0].shape
    assert rel_err(y, exp_y) < TOL[dtype], "y"
    for name, g, e, t, r in zip(NAMES, grads, exp_g, tensors, grad):
        if t is None or not r:
            assert g is None, name
            continue
        assert g.dtype == dtype and g.shape == t.shape, name
        assert rel_err(g, e) < TOL[dtype], (name, rel_err(g, e))


SHAPES = {
    "vit_s_tokens": ((2, 197, 192), (True, True)),  # the must-show case
    "m1_d200": ((1, 1, 200), (True, True)),
    "batch1_t257_no_affine": ((1, 257, 200), (False, False)),
    "t197_weight_only": ((2, 197, 40), (True, False)),
    "2d_bias_only": ((33, 96), (False, True)),
    "d1": ((5, 1), (True, True)),
}


@pytest.mark.parametrize("case", list(SHAPES))
def test_triton_matches_float64_expectation_fp32(case):
    shape, affine = SHAPES[case]
    tensors, dy = make_inputs(shape, affine)
    check(ssf_layernorm, tensors, dy, torch.float32)


@pytest.mark.parametrize("case", ["vit_s_tokens", "batch1_t257_no_affine"])
def test_reference_matches_float64_expectation(case):
    shape, affine = SHAPES[case]
    tensors, dy = make_inputs(shape, affine)
    check(reference_ssf_layernorm, tensors, dy, torch.float64, backend="torch")
    check(ssf_layernorm, tensors, dy, torch.float32, backend="torch")  # the public op in torch mode: the reference


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision(dtype):
    tensors, dy = make_inputs((2, 197, 200))
    check(ssf_layernorm, tensors, dy, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_compiled_kernel_on_gpu_wide_rows(dtype):
    tensors, dy = make_inputs((4, 197, 768))
    check(ssf_layernorm, tensors, dy, dtype)


def test_only_requested_gradients_are_computed():
    # The SSF adapter's case: frozen LayerNorm (and here a frozen input), trainable scale and shift.
    tensors, dy = make_inputs((2, 9, 24))
    check(ssf_layernorm, tensors, dy, torch.float32, grad=(False, False, False, True, True))
    check(ssf_layernorm, tensors, dy, torch.float32, grad=(True, False, True, False, False))


def test_strided_input_and_eps():
    # x a slice with a row stride wider than D, and a large eps that visibly changes the result.
    tensors, dy = make_inputs((3, 7, 64))
    tensors[0] = tensors[0][..., :50]
    for i in (1, 2, 3, 4):
        tensors[i] = tensors[i][:50]
    dy = dy[..., :50]
    assert tensors[0].stride(-2) == 64
    check(ssf_layernorm, tensors, dy, torch.float32, eps=0.5)


def test_empty_batch():
    tensors, _ = make_inputs((0, 5, 24))
    leaves = [t.to(DEV, torch.float32).requires_grad_() for t in tensors]
    with use_kernels("triton"):
        y = ssf_layernorm(*leaves, 1e-5)
        y.sum().backward()
    assert y.shape == (0, 5, 24) and leaves[0].grad.shape == (0, 5, 24)
    assert all(float(t.grad.abs().sum()) == 0 for t in leaves[1:])


def test_torch_mode_runs_the_reference():
    tensors, _ = make_inputs((2, 5, 24))
    args = [t.to(DEV, torch.float32) for t in tensors]
    with use_kernels("torch"):
        y = ssf_layernorm(*args, 1e-6)
    assert last_backend("ssf_layernorm") == "torch"
    torch.testing.assert_close(y, reference_ssf_layernorm(*args, 1e-6), rtol=0, atol=0)


def test_forced_triton_refuses_what_it_cannot_run():
    x = torch.randn(1, mod.MAX_D + 1, device=DEV)
    ones = torch.ones(mod.MAX_D + 1, device=DEV)
    with use_kernels("triton"), pytest.raises(RuntimeError, match="wider than the kernel's"):
        ssf_layernorm(x, None, None, ones, ones * 0, 1e-5)
    with use_kernels("triton"), pytest.raises(RuntimeError, match="float64 is not supported"):
        ssf_layernorm(x[:, :8].double(), None, None, ones[:8].double(), ones[:8].double(), 1e-5)


BAD = {
    "x_0d": (lambda x, w, b, s, t: (x[0, 0, 0], w, b, s, t, 1e-5), "x must be a floating-point tensor"),
    "x_int": (lambda x, w, b, s, t: (x.long(), w, b, s, t, 1e-5), "x must be a floating-point tensor"),
    "weight_shape": (lambda x, w, b, s, t: (x, w[:-1], b, s, t, 1e-5), r"ln_weight must be .*\(8,\).*got shape \(7,\)"),
    "bias_2d": (lambda x, w, b, s, t: (x, w, b[None], s, t, 1e-5), r"ln_bias must be .*got shape \(1, 8\)"),
    "scale_none": (lambda x, w, b, s, t: (x, w, b, None, t, 1e-5), "scale must be a floating-point tensor"),
    "shift_int": (lambda x, w, b, s, t: (x, w, b, s, t.long(), 1e-5), r"shift must be .*dtype torch.int64"),
    "eps_negative": (lambda x, w, b, s, t: (x, w, b, s, t, -1.0), "eps must be a finite real number >= 0"),
    "eps_tensor": (lambda x, w, b, s, t: (x, w, b, s, t, torch.tensor(1e-5)), "eps must be a finite real number"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_arguments_raise_value_error_before_running(case, monkeypatch):
    def no_dispatch(*a, **k):
        raise AssertionError("dispatch reached with bad arguments")

    monkeypatch.setattr(mod, "choose", no_dispatch)
    tensors, _ = make_inputs((2, 3, 8))
    build, msg = BAD[case]
    with use_kernels("triton"), pytest.raises(ValueError, match=msg):
        ssf_layernorm(*build(*[t.float() for t in tensors]))


def test_module_imports_and_runs_without_triton():
    code = ("import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
            "import torch\n"
            "from vpeft.kernels.ssf import ssf_layernorm, reference_ssf_layernorm\n"
            "from vpeft.kernels import last_backend\n"
            "x, s = torch.randn(2, 4, 8), torch.rand(8)\n"
            "y = ssf_layernorm(x, None, None, s, s, 1e-5)\n"
            "assert last_backend('ssf_layernorm') == 'torch'\n"
            "assert torch.equal(y, reference_ssf_layernorm(x, None, None, s, s, 1e-5))\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
