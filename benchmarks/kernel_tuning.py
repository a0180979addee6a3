"""Tile sweep for the GEMM-shaped kernels (``lora_linear``, ``dora_linear``, ``masked_linear``) on a CUDA GPU.

For each candidate tiling it sets the kernel module's ``GPU_TILES``, checks the forward output against the eager
reference, and times forward + backward with the harness of :mod:`benchmarks.kernels` (median of ``--reps`` steps);
it prints the time of every candidate relative to the eager reference and the fastest candidate per case. The
defaults in ``vpeft/kernels/{lora,dora,masked}.py`` are chosen from its output (see the README's Kernels section).

Usage (needs a CUDA GPU; exits 0 with a message without one)::

    python -m benchmarks.kernel_tuning --json tuning.json
    TRITON_INTERPRET=1 python -m benchmarks.kernel_tuning --smoke     # CPU harness check only
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Optional

import torch

from benchmarks.kernels import DTYPES, _measure, make_cases

LORA_BIG = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for M >= big_m
    (128, 128, 64, 8, 3), (128, 128, 64, 4, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
    (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 32, 4, 4),
]
MASKED = [  # (output-side cap, reduction cap, num_warps, num_stages)
    (64, 32, 4, 3), (128, 64, 8, 3), (128, 64, 4, 4), (128, 32, 8, 4), (64, 64, 4, 4), (128, 64, 8, 4),
]
DORA = [  # (BLOCK_M cap, BLOCK_N, BLOCK_K, num_warps, num_stages)
    (64, 64, 64, 4, 3), (128, 64, 64, 4, 4), (128, 64, 64, 8, 3), (64, 128, 64, 4, 4), (128, 128, 64, 8, 3),
    (64, 64, 64, 4, 4),
]
SHAPES = [("vit_b16", 32), ("vit_b16", 128), ("vit_l14", 128)]


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    """Run the sweep; returns the rows (also printed, and written with ``--json``)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--ops", nargs="+", default=["lora_linear", "dora_linear", "masked_linear"],
                    choices=["lora_linear", "dora_linear", "masked_linear"])
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true", help="CPU harness check under TRITON_INTERPRET=1 (tiny shapes)")
    args = ap.parse_args(argv)
    shapes, device, cuda = SHAPES, "cuda", True
    if args.smoke:
        import os

        from benchmarks.kernels import MODELS

        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--smoke runs the kernels through Triton's interpreter: set TRITON_INTERPRET=1")
        MODELS["smoke"] = (48, 5)
        shapes, device, cuda, args.dtype, args.reps, args.warmup = [("smoke", 2)], "cpu", False, "fp32", 1, 0
    elif not torch.cuda.is_available():
        print("benchmarks.kernel_tuning: no CUDA device here; the sweep times compiled kernels on a GPU.")
        return []
    from vpeft.kernels import dora, lora, masked, use_kernels

    dtype = DTYPES[args.dtype]
    lora_default, dora_default = dict(lora.GPU_TILES["big"]), dict(dora.GPU_TILES)
    masked_default = dict(masked.GPU_TILES)
    rows: list[dict[str, Any]] = []
    print(f"{'case':<44} {'tiles':<24} {'ms':>8} {'x eager':>8} {'max rel err':>12}", flush=True)
    try:
        for model, batch in shapes:
            for op, module, candidates in (("lora_linear", lora, LORA_BIG), ("dora_linear", dora, DORA),
                                           ("masked_linear", masked, MASKED)):
                if op not in args.ops:
                    continue
                for case in make_cases([op], model, batch, device, dtype):
                    kernel_call, reference, call_with, tensors = case.build()
                    eager_t, _ = _measure(lambda c=call_with, r=reference: c(r), tensors, args.warmup, args.reps, cuda)
                    with torch.no_grad():
                        ref = call_with(reference).float()
                    for cand in candidates:
                        if op == "lora_linear":
                            tiles = dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"), cand))
                            module.GPU_TILES["big"] = tiles
                        elif op == "dora_linear":
                            tiles = dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"), cand))
                            module.GPU_TILES.update(tiles)
                        else:
                            tiles = dict(zip(("out", "red", "num_warps", "num_stages"), cand))
                            module.GPU_TILES.update(tiles)

                        def step(kernel_call=kernel_call):
                            with use_kernels("triton"):
                                return kernel_call()
                        try:
                            with torch.no_grad():
                                got = step().float()
                            err = ((got - ref).abs().max() / ref.abs().max()).item()
                            t, _ = _measure(step, tensors, args.warmup, args.reps, cuda)
                        except Exception as e:  # noqa: BLE001 - a tiling the compiler or the SMs refuse is reported
                            print(f"{case.label:<44} {cand!s:<24} failed: {type(e).__name__}: {e}"[:200], flush=True)
                            continue
                        row = dict(op=op, case=case.label, tiles=tiles, time_s=t, eager_s=eager_t,
                                   time_vs_eager=t / eager_t, max_rel_err=err)
                        rows.append(row)
                        print(f"{case.label:<44} {cand!s:<24} {t * 1e3:8.3f} {t / eager_t:8.3f} {err:12.2e}",
                              flush=True)
                    best = min((r for r in rows if r["case"] == case.label), key=lambda r: r["time_s"], default=None)
                    if best:
                        print(f"  best for {case.label}: {best['tiles']} ({best['time_vs_eager']:.3f}x eager)",
                              flush=True)
    finally:
        lora.GPU_TILES["big"] = lora_default
        dora.GPU_TILES.update(dora_default)
        masked.GPU_TILES.update(masked_default)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
