"""Fused Triton kernels against their eager torch reference and ``torch.compile`` of it: forward + backward time and
peak memory at ViT-B/16 and ViT-L/14 shapes.

Usage (needs a CUDA GPU; on a machine without one it says so and exits 0)::

    python -m benchmarks.kernels                       # every op, ViT-B/16 and ViT-L/14, batch 32 and 128
    python -m benchmarks.kernels --ops lora_linear --batch 64 --dtype bf16 --json kernels.json
    TRITON_INTERPRET=1 python -m benchmarks.kernels --smoke   # CPU: tiny shapes through the interpreter (harness
                                                              # check only: times are meaningless)

Cases (``D`` the width, ``L`` the tokens: ViT-B/16 ``D=768, L=197``; ViT-L/14 ``D=1024, L=257``):

* ``lora_linear``: timm's fused ``qkv`` Linear ``(3D, D)`` with LoRA r=8 on the q and v slices (the LoRA paper's
  targets), and on the whole output.
* ``dora_linear``: the same q and v slices with DoRA.
* ``ssf_layernorm``: a LayerNorm over ``D`` followed by SSF's scale and shift.
* ``masked_linear``: the MLP's first Linear ``(4D, D)`` with about half of the weights masked.

For each case and implementation (``triton``; ``eager``: the op's ``reference_*``; ``compiled``:
``torch.compile(reference_*)``), one step is: forward, ``backward`` of ``sum(y * g)`` for a fixed random ``g``.
Time is the median over ``--reps`` CUDA-event-timed steps after ``--warmup`` steps; peak memory is
``torch.cuda.max_memory_allocated`` during one step minus what was allocated before it (inputs and parameters
excluded). Frozen weights do not require grad, as in fine-tuning. Ratios are printed against eager (``< 1``: faster
or smaller).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

MODELS = {"vit_b16": (768, 197), "vit_l14": (1024, 257)}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OPS = ("lora_linear", "dora_linear", "ssf_layernorm", "masked_linear")


@dataclass
class Case:
    """One benchmark case: the op, a label, and a builder of ``(kernel call, reference call, grad-requiring
    tensors)`` on given inputs."""

    op: str
    label: str
    build: Callable[[], tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor], Callable[..., torch.Tensor],
                              tuple[Any, ...]]]


def _param(*shape, device, dtype, scale=0.02, grad=True) -> torch.Tensor:
    return (torch.randn(*shape, device=device, dtype=dtype) * scale).requires_grad_(grad)


def make_cases(ops: list[str], model: str, batch: int, device: str, dtype: torch.dtype, r: int = 8) -> list[Case]:
    """The benchmark cases of ``ops`` at ``model``'s width and token count."""
    from vpeft.kernels import dora_linear, lora_linear, masked_linear, ssf_layernorm
    from vpeft.kernels.dora import reference_dora_linear
    from vpeft.kernels.lora import reference_lora_linear
    from vpeft.kernels.masked import reference_masked_linear
    from vpeft.kernels.ssf import reference_ssf_layernorm

    d, length = MODELS[model]
    kw = dict(device=device, dtype=dtype)
    qv = [(0, d), (2 * d, 3 * d)]
    cases: list[Case] = []

    def x_in():
        return torch.randn(batch, length, d, **kw).requires_grad_(True)

    if "lora_linear" in ops:
        for name, slices in (("q,v", qv), ("qkv", None)):
            def build(slices=slices):
                n_sl = len(slices) if slices else 1
                args = (x_in(), _param(3 * d, d, grad=False, **kw), _param(3 * d, grad=False, **kw),
                        _param(n_sl * r, d, **kw), _param(sum(b - a for a, b in slices) if slices else 3 * d, r, **kw),
                        2.0)
                return (lambda: lora_linear(*args, out_slices=slices), reference_lora_linear,
                        lambda f: f(*args, out_slices=slices), args)
            cases.append(Case("lora_linear", f"{model} b{batch} qkv LoRA r={r} on {name}", build))
    if "dora_linear" in ops:
        def build_dora():
            w = _param(3 * d, d, grad=False, **kw)
            args = (x_in(), w, _param(3 * d, grad=False, **kw), _param(2 * r, d, **kw), _param(2 * d, r, **kw),
                    torch.cat([w[a:b].float().norm(dim=1) for a, b in qv]).to(dtype).requires_grad_(True), 2.0)
            return (lambda: dora_linear(*args, out_slices=qv), reference_dora_linear,
                    lambda f: f(*args, out_slices=qv), args)
        cases.append(Case("dora_linear", f"{model} b{batch} qkv DoRA r={r} on q,v", build_dora))
    if "ssf_layernorm" in ops:
        def build_ssf():
            args = (x_in(), _param(d, grad=False, **kw), _param(d, grad=False, **kw), _param(d, **kw),
                    _param(d, **kw), 1e-6)
            return (lambda: ssf_layernorm(*args), reference_ssf_layernorm, lambda f: f(*args), args)
        cases.append(Case("ssf_layernorm", f"{model} b{batch} LayerNorm + SSF", build_ssf))
    if "masked_linear" in ops:
        def build_mask():
            args = (x_in(), _param(4 * d, d, grad=False, **kw), _param(4 * d, d, scale=1.0, **kw), 0.0,
                    _param(4 * d, grad=False, **kw))
            return (lambda: masked_linear(*args), reference_masked_linear, lambda f: f(*args), args)
        cases.append(Case("masked_linear", f"{model} b{batch} MLP fc1 masked (half)", build_mask))
    return cases


def _measure(step: Callable[[], torch.Tensor], grads_of: tuple, warmup: int, reps: int, cuda: bool
             ) -> tuple[float, Optional[int]]:
    """Median seconds and peak extra bytes of ``step()`` forward + backward."""
    import time

    g = None

    def run():
        nonlocal g
        y = step()
        if g is None:
            g = torch.randn_like(y)
        y.backward(g)
        for t in grads_of:
            if isinstance(t, torch.Tensor):
                t.grad = None

    for _ in range(warmup):
        run()
    peak = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), peak


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    """Run the benchmark; returns the rows (also printed, and written with ``--json``)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU harness check under TRITON_INTERPRET=1: tiny shapes, fp32, 1 rep, no compile")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--smoke runs the kernels through Triton's interpreter: set TRITON_INTERPRET=1")
        MODELS["smoke"] = (48, 5)
        args.models, args.batch, args.dtype = ["smoke"], [2], "fp32"
        args.reps, args.warmup, args.no_compile = 1, 0, True
        device = "cpu"
    elif not cuda:
        print("benchmarks.kernels: no CUDA device here; the kernels are benchmarked on a GPU (nothing to do). "
              "`TRITON_INTERPRET=1 python -m benchmarks.kernels --smoke` checks the harness on CPU.")
        return []
    else:
        device = "cuda"
    from vpeft.kernels import use_kernels

    dtype = DTYPES[args.dtype]
    rows: list[dict[str, Any]] = []
    _print_header()
    torch.manual_seed(0)
    for model in args.models:
        for batch in args.batch:
            for case in make_cases(args.ops, model, batch, device, dtype):
                kernel_call, reference, call_with, tensors = case.build()
                impls: dict[str, Callable[[], torch.Tensor]] = {}

                def triton_step(kernel_call=kernel_call):
                    with use_kernels("triton"):
                        return kernel_call()
                impls["triton"] = triton_step
                impls["eager"] = lambda call_with=call_with, reference=reference: call_with(reference)
                if not args.no_compile:
                    compiled = torch.compile(reference, dynamic=False)
                    impls["compiled"] = lambda call_with=call_with, compiled=compiled: call_with(compiled)
                res = {}
                for name, fn in impls.items():
                    try:
                        res[name] = _measure(fn, tensors, args.warmup, args.reps, device == "cuda")
                    except Exception as e:  # noqa: BLE001 - report the failure in the table, keep going
                        res[name] = (None, None)
                        print(f"  {case.label} [{name}] failed: {type(e).__name__}: {e}", file=sys.stderr)
                eager_t, eager_m = res["eager"]
                for name, (t, m) in res.items():
                    rows.append(dict(op=case.op, case=case.label, impl=name, dtype=args.dtype, device=device,
                                     time_s=t, peak_bytes=m,
                                     time_vs_eager=(t / eager_t) if t and eager_t else None,
                                     mem_vs_eager=(m / eager_m) if m and eager_m else None))
                    _print_row(rows[-1])  # as they come, so a run cut short still shows what it measured
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


def _print_header() -> None:
    print(f"{'case':<48} {'impl':<9} {'ms':>9} {'x eager':>8} {'peak MB':>9} {'x eager':>8}", flush=True)


def _print_row(r: dict[str, Any]) -> None:
    t = f"{r['time_s'] * 1e3:9.3f}" if r["time_s"] is not None else f"{'failed':>9}"
    tr = f"{r['time_vs_eager']:8.3f}" if r["time_vs_eager"] is not None else f"{'-':>8}"
    m = f"{r['peak_bytes'] / 2**20:9.1f}" if r["peak_bytes"] is not None else f"{'-':>9}"
    mr = f"{r['mem_vs_eager']:8.3f}" if r["mem_vs_eager"] is not None else f"{'-':>8}"
    print(f"{r['case']:<48} {r['impl']:<9} {t} {tr} {m} {mr}", flush=True)


if __name__ == "__main__":
    main()
