"""Activation memory of CLIP prompt learning (CoOp) per training step: vpeft's chunked, recomputed class encoding
against the unbounded encoding of every class prompt at once (what CoOp does; its ImageNet out-of-memory, DESIGN
section 10).

Usage::

    python -m benchmarks.prompt_memory [--classes 100 1000] [--model ViT-B-16] [--batch 4] [--json out.json]
    python -m benchmarks.prompt_memory --model vpeft-tiny-bpe        # smoke run, seconds

Setup: open_clip ``--model`` with random weights (``vpeft.create_backbone``), train mode, on CPU; CoOp with 16
learned context tokens (``vpeft.CoOpConfig()``; only the context trains, both towers are frozen); class names
``"class 0" .. "class N-1"`` (``--imagenet-names``: ImageNet's; every prompt is padded to the context length, so the
names do not change the memory); a batch of ``--batch`` random images; loss = cross entropy on random labels.

Setups, through ``vpeft.ClipClassifier``:

* chunked (vpeft): ``class_chunk=--chunk`` (100), ``checkpoint_chunks=True``: with several chunks each chunk's text
  forward runs under ``torch.utils.checkpoint`` (non-reentrant) and is recomputed in backward;
* unbounded (CoOp): ``class_chunk=N, checkpoint_chunks=False``: one text forward over all N prompts, every
  activation kept for backward. With N <= chunk both setups are the same computation (one chunk, nothing to
  recompute) and are measured once.

Numbers:

* ``saved_bytes``: bytes of the tensors autograd saves for backward in one training forward (images through the
  frozen image tower + the class prompts through the text tower + logits). Every saved tensor passes through
  ``torch.autograd.graph.saved_tensors_hooks``; each storage is counted once, deduplicated by ``data_ptr`` while a
  ``StorageWeakRef`` of the counted storage is alive (so an address freed and reused by a new storage counts again,
  and a storage saved twice counts once). ``activation_bytes`` leaves out the storages of the model's parameters and
  buffers (resident anyway): the memory training adds. Inside a checkpointed chunk the checkpoint's own hook takes
  the saved tensors (it keeps a placeholder only), so they rightly do not count.
* ``recompute_peak_bytes`` (chunked, several chunks): activation bytes of one chunk's text forward with
  checkpointing off, measured directly under the same hook; backward re-materialises one chunk at a time, so the
  per-step activation bound is ``activation_bytes + recompute_peak_bytes``.
* Method "kept": the pack hook returns the tensor (normal autograd; the check steps below also run backward), and
  the script checks that every counted storage is still alive at the end of the forward (nothing counted was freed
  before backward could use it). Method "dropped" (the unbounded setup at class counts other than
  ``--check-classes``): forward only, the pack hook counts the storage and returns ``None`` instead of the tensor,
  so the unbounded 1000-class forward (18 GB of saved tensors at ViT-B-16) is measured exactly without holding it.
  The weak-reference dedupe keeps this exact: a storage that only the graph would have held is freed and can never
  be saved again, and a new storage at its reused address counts as new. The script checks "dropped" == "kept" on
  one chunk, and prints the affine extrapolation of the unbounded setup from the smaller measurements next to the
  measured number (the table's numbers are measured, none extrapolated).
* Equality: at ``--check-classes`` (100) classes the unbounded setup and the chunked one with ``--check-chunk``
  (25, i.e. 4 recomputed chunks) give the same loss and the same gradient on the context (max relative difference
  printed); both steps are timed (forward + backward wall time). With ``--chunk`` >= ``--check-classes`` the
  chunked step at that class count is the unbounded one (one chunk) and shares its time.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.multiprocessing.reductions import StorageWeakRef

TINY = "vpeft-tiny-bpe"
MB = 2**20


class SavedCounter:
    """Context manager: distinct storages of the tensors autograd saves inside it (see the module docstring).

    Args:
        resident: ``data_ptr`` of storages that are resident anyway (parameters, buffers): left out of ``acts``.
        keep: Return the tensor from the pack hook (normal autograd); ``False``: return ``None`` (forward only).
    """

    def __init__(self, resident: set[int], keep: bool = True) -> None:
        self.resident, self.keep = resident, keep
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.total = self.acts = self.tensors = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor) -> Optional[torch.Tensor]:
        s = t.untyped_storage()
        ptr, n = s.data_ptr(), s.nbytes()
        self.tensors += 1
        seen = self.live.get(ptr)
        if seen is None or seen[0].expired():
            self.live[ptr] = (StorageWeakRef(s), n)
            self.total += n
            if ptr not in self.resident:
                self.acts += n
        return t if self.keep else None

    def _unpack(self, t: Optional[torch.Tensor]) -> torch.Tensor:
        if t is None:
            raise RuntimeError("backward through a forward measured with keep=False (saved tensors were dropped)")
        return t

    def live_total(self) -> int:
        """Bytes of the counted storages still alive."""
        return sum(n for ref, n in self.live.values() if not ref.expired())

    def __enter__(self) -> SavedCounter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def resident_storages(module: nn.Module) -> set[int]:
    """``data_ptr`` of the storages of ``module``'s parameters and buffers."""
    return {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}


def build(model_name: str):
    """(PeftModel with CoOp, tokenizer, image size)."""
    import open_clip

    import vpeft

    if model_name == TINY:
        from open_clip.factory import _MODEL_CONFIGS

        _MODEL_CONFIGS.setdefault(TINY, dict(
            embed_dim=32, vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8, head_width=16),
            text_cfg=dict(context_length=32, vocab_size=49408, width=64, heads=4, layers=2)))
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=32)
    else:
        tokenizer = open_clip.get_tokenizer(model_name)
    torch.manual_seed(0)
    clip = vpeft.create_backbone(f"open_clip:{model_name}").train()
    size = clip.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return vpeft.get_peft_model(clip, vpeft.CoOpConfig()), tokenizer, int(size)


def class_names(n: int, imagenet: bool) -> list[str]:
    if imagenet and n <= 1000:
        from vpeft.datasets.templates import IMAGENET_CLASSNAMES

        return list(IMAGENET_CLASSNAMES[:n])
    return [f"class {i}" for i in range(n)]


class Bench:
    """Shared state of one run: the model, the batch, the resident storages."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.pm, self.tokenizer, size = build(args.model)
        self.ctx = next(p for p in self.pm.parameters() if p.requires_grad)
        gen = torch.Generator().manual_seed(1)
        self.images = torch.randn(args.batch, 3, size, size, generator=gen)
        # the first checkpointed backward imports torch._dynamo (seconds): keep that out of the timed steps
        x = torch.zeros(1, requires_grad=True)
        torch.utils.checkpoint.checkpoint(torch.sin, x, use_reentrant=False).sum().backward()

    def classifier(self, n: int, chunk: int, checkpoint: bool):
        import vpeft

        return vpeft.ClipClassifier(self.pm, self.tokenizer, class_names(n, self.args.imagenet_names),
                                    class_chunk=chunk, checkpoint_chunks=checkpoint)

    def labels(self, n: int) -> torch.Tensor:
        return torch.randint(0, n, (self.args.batch,), generator=torch.Generator().manual_seed(2))

    def step(self, clf) -> dict[str, Any]:
        """One training step (forward + backward) with saved tensors kept; measured and timed."""
        self.ctx.grad = None
        with SavedCounter(resident_storages(clf)) as c:
            t0 = time.perf_counter()
            loss = F.cross_entropy(clf(self.images), self.labels(clf.num_classes))
        live = c.live_total()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        if live != c.total:
            raise AssertionError(f"saved storages freed during the forward: counted {c.total}, live {live}")
        return dict(saved_bytes=c.total, activation_bytes=c.acts, saved_tensors=c.tensors, method="kept",
                    loss=loss.item(), grad=self.ctx.grad.detach().clone(), forward_s=t1 - t0, step_s=t2 - t0)

    def forward_saved(self, clf, keep: bool, fn: Optional[Callable[[], torch.Tensor]] = None) -> dict[str, Any]:
        """Saved bytes of one forward (the loss of ``clf(images)``, or ``fn()``), graph discarded without backward."""
        with SavedCounter(resident_storages(clf), keep=keep) as c:
            t0 = time.perf_counter()
            if fn is not None:
                out = fn()
            else:
                out = F.cross_entropy(clf(self.images), self.labels(clf.num_classes))
            t1 = time.perf_counter()
        live = c.live_total()
        del out
        if keep and live != c.total:
            raise AssertionError(f"saved storages freed during the forward: counted {c.total}, live {live}")
        return dict(saved_bytes=c.total, activation_bytes=c.acts, saved_tensors=c.tensors,
                    method="kept" if keep else "dropped", forward_s=t1 - t0)

    def chunk_saved(self, chunk: int, keep: bool = False) -> dict[str, Any]:
        """Saved bytes of one chunk's text forward with checkpointing off (what backward re-materialises)."""
        clf = self.classifier(chunk, chunk, False)
        return self.forward_saved(clf, keep, lambda: clf._encode_prompts(0, chunk))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--model", default="ViT-B-16", help=f"open_clip model name ({TINY!r}: tiny smoke-test config)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=100, help="vpeft class_chunk")
    ap.add_argument("--check-classes", type=int, default=100)
    ap.add_argument("--check-chunk", type=int, default=25)
    ap.add_argument("--imagenet-names", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    b = Bench(args)
    n0, c0 = args.check_classes, args.check_chunk
    print(f"open_clip {args.model} (random init, train mode), CoOp n_ctx={b.ctx.shape[-2]} "
          f"({b.ctx.numel()} trainable), batch {args.batch} at {b.images.shape[-1]}px, CPU, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}", flush=True)

    # 1. the "dropped" measurement equals the "kept" one (one chunk of check-chunk classes)
    kept, dropped = b.chunk_saved(c0, keep=True), b.chunk_saved(c0, keep=False)
    if (kept["saved_bytes"], kept["activation_bytes"]) != (dropped["saved_bytes"], dropped["activation_bytes"]):
        raise AssertionError(f"dropped-tensor measurement differs from the kept one: {dropped} vs {kept}")
    peaks = {c0: dropped}

    # 2. equality + timing at n0 classes: unbounded vs chunked (check-chunk)
    ref = b.step(b.classifier(n0, n0, False))
    chk = b.step(b.classifier(n0, c0, True))
    diff_loss = abs(chk["loss"] - ref["loss"]) / abs(ref["loss"])
    diff_grad = _rel(chk["grad"], ref["grad"])
    print(f"check at {n0} classes: unbounded vs chunked (class_chunk={c0}, {-(-n0 // c0)} recomputed chunks): "
          f"loss rel diff {diff_loss:.2e}, context-grad max rel diff {diff_grad:.2e}; "
          f"step (fwd+bwd) {ref['step_s']:.1f} s unbounded, {chk['step_s']:.1f} s chunked", flush=True)

    # 3. the table
    rows: list[dict[str, Any]] = []
    measured: dict[int, dict[str, Any]] = {n0: ref}
    for n in args.classes:
        if n == n0:
            unb = ref
        else:
            unb = b.forward_saved(b.classifier(n, n, False), keep=False)
            measured[n] = unb
        if n <= args.chunk:
            ch = dict(unb, method=unb["method"] + ", = unbounded (one chunk)")
            peak = 0
        else:
            ch = b.forward_saved(b.classifier(n, args.chunk, True), keep=True)
            if args.chunk not in peaks:
                peaks[args.chunk] = b.chunk_saved(args.chunk)
            peak = peaks[args.chunk]["activation_bytes"]
        for name, r, p in (("chunked (vpeft)", ch, peak), ("unbounded (CoOp)", unb, 0)):
            rows.append(dict(classes=n, setup=name, method=r["method"], saved_bytes=r["saved_bytes"],
                             activation_bytes=r["activation_bytes"], recompute_peak_bytes=p,
                             bound_bytes=r["activation_bytes"] + p))
        print(f"  measured {n} classes", flush=True)
    if n0 > c0:  # the chunked check step is a row too
        rows.append(dict(classes=n0, setup=f"chunked, chunk {c0}", method="kept", saved_bytes=chk["saved_bytes"],
                         activation_bytes=chk["activation_bytes"], recompute_peak_bytes=peaks[c0]["activation_bytes"],
                         bound_bytes=chk["activation_bytes"] + peaks[c0]["activation_bytes"]))
    unbounded = {n0: ref["activation_bytes"]}
    unbounded.update({r["classes"]: r["bound_bytes"] for r in rows if r["setup"].startswith("unbounded")})
    for r in rows:
        r["vs_unbounded"] = r["bound_bytes"] / unbounded[r["classes"]]

    print(f"\n{'classes':>7}  {'setup':<20}{'saved MB':>11}{'activations MB':>16}{'recompute MB':>14}"
          f"{'bound MB':>11}{'vs unbounded':>14}  method")
    for r in sorted(rows, key=lambda r: (r["classes"], r["setup"])):
        print(f"{r['classes']:>7}  {r['setup']:<20}{r['saved_bytes'] / MB:>11.2f}{r['activation_bytes'] / MB:>16.2f}"
              f"{r['recompute_peak_bytes'] / MB:>14.2f}{r['bound_bytes'] / MB:>11.2f}{r['vs_unbounded']:>14.4f}"
              f"  {r['method']}")
    print("bound = activations + recompute (one chunk's text activations, re-materialised in backward)")

    # 4. affine extrapolation of the unbounded setup from the per-class slope of the chunk measurements
    extrapolated = {}
    if len(peaks) >= 2:
        (ca, pa), (cb, pb) = sorted((c, p["activation_bytes"]) for c, p in peaks.items())[:2]
        slope = (pb - pa) / (cb - ca)
        for n, r in sorted(measured.items()):
            if n != n0:
                est = ref["activation_bytes"] + slope * (n - n0)
                extrapolated[n] = est
                print(f"unbounded at {n} classes: measured {r['activation_bytes'] / MB:.1f} MB; extrapolated from "
                      f"{n0} classes + {slope / MB:.3f} MB/class: {est / MB:.1f} MB")
    steps = {"unbounded": ref["step_s"], f"chunked_{c0}": chk["step_s"]}
    if args.chunk >= n0:  # one chunk: the unbounded step
        steps[f"chunked_{args.chunk}"] = ref["step_s"]
    print(f"step time (forward + backward) at {n0} classes: "
          + ", ".join(f"{k.replace('_', ' class_chunk=')} {v:.1f} s" for k, v in steps.items()))
    wall = time.perf_counter() - t_start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB  # Linux: KiB
    print(f"total wall time {wall:.0f} s, process peak RSS {rss:.0f} MB")

    result = dict(model=args.model, batch=args.batch, class_chunk=args.chunk, n_ctx=int(b.ctx.shape[-2]),
                  torch=torch.__version__, threads=torch.get_num_threads(), rows=rows,
                  check=dict(classes=n0, class_chunk=c0, loss_rel_diff=diff_loss, grad_max_rel_diff=diff_grad,
                             loss=ref["loss"]),
                  step_seconds=steps, extrapolated_unbounded_activation_bytes=extrapolated, wall_s=wall,
                  peak_rss_bytes=int(rss * MB))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
