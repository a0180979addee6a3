"""Every PEFT method on one backbone, against full fine-tuning measured in the same run: bytes saved for backward,
training and inference FLOPs (and merged inference FLOPs), training-step time, trainable parameters, adapter size.

Usage::

    python -m benchmarks.methods --model timm:vit_small_patch16_224 --batch-size 8 --threads 2 \\
        --json out.json --png docs/benchmark_methods.png
    python -m benchmarks.methods --model open_clip:ViT-B-32 --batch-size 8 --json clip.json
    python -m benchmarks.methods --model timm:vit_tiny_patch16_224 --img-size 64 --batch-size 2  # smoke run

Setup: the backbone with random weights (``vpeft.create_backbone``), fp32, on CPU, in train mode, classifying
``--batch-size`` random images into ``--num-classes`` (100) classes with a new linear head that trains in every
setup; loss = cross entropy on random labels; optimizer AdamW over the trainable parameters.

* timm: the model's own head resized to ``--num-classes`` (vpeft: ``trainable_extra=["head"]``; HF peft:
  ``modules_to_save=["head"]``).
* open_clip: the image tower (``model.visual``, what ``encode_image`` runs; the text tower is dropped) and a linear
  head on its L2-normalised output, as ``vpeft.modules.FewShotClassifier`` classifies CLIP images. Text-prompt
  methods need the text tower and are skipped (``benchmarks.prompt_memory`` measures CoOp's memory).

Rows (``method``):

* ``full_ft``: every parameter trains. The reference of every ratio.
* ``linear_probe``: only the head (``vpeft.get_peft_model(model, [], trainable_extra=["head"])`` on timm).
* every method of ``vpeft.list_methods()``, under its registry name, with its config's paper defaults (``lora`` and
  ``dora``: r=8, alpha=r, targets q and v). A method that does not fit the backbone raises ``ValueError`` in
  ``get_peft_model`` and is listed as skipped with that message (e.g. text-prompt methods on a timm ViT).
* ``vpeft_lora_qkv``, ``vpeft_dora_qkv``: vpeft LoRA / DoRA on the whole fused ``qkv`` projection (``--r``, alpha=r),
  the target HF peft can express on timm (it cannot adapt the q and v slices of the fused Linear separately).
* ``peft_lora_qkv``, ``peft_dora_qkv`` (timm only; needs ``pip install vpeft[bench]``): HF peft ``LoraConfig(r,
  lora_alpha=r, lora_dropout=0, target_modules=["qkv"], use_dora=...)`` through ``peft.get_peft_model``: the same
  adapted weights, rank, scaling and head as the ``vpeft_*_qkv`` rows.

Numbers (one JSON object per row, exactly these keys plus ``method``, ``model``, ``batch_size``, ``threads``):

* ``saved_bytes``: bytes of the tensors autograd saves for backward during one training forward (default attention
  backend, as training runs), through ``torch.autograd.graph.saved_tensors_hooks``: the distinct storages (each
  counted once, deduplicated while a weak reference to it is alive, ``benchmarks.prompt_memory.SavedCounter``) that
  are still alive when the forward ends, i.e. held by the graph for backward, excluding the storages of parameters
  and buffers: those are resident anyway, so this is the memory that training adds on top of the model (the measure
  the DoRA memory target was set with). The printed table also shows the number including parameter storages, and
  notes storages that were saved but freed before the forward ended (an autograd branch dropped by ``detach``).
* ``train_flops``: one forward + backward; ``infer_flops``: one forward in eval mode without grad; both counted by
  ``torch.utils.flop_counter.FlopCounterMode`` under the math SDPA backend (so the attention matmuls count; the fused
  kernels are invisible to the counter). The counter sees matmuls and convolutions, not elementwise ops.
* ``merged_infer_flops``: ``infer_flops`` after merging (vpeft ``merge_and_unload``, HF peft ``merge_and_unload``)
  for mergeable methods, ``null`` otherwise. The run checks it equals the plain backbone's ``infer_flops`` exactly.
* ``step_time``: median seconds of a full training step (forward, backward, ``AdamW.step``). All models are built
  first; one warm-up step each (the one whose forward is measured for ``saved_bytes``), then ``--reps`` rounds over
  all methods in rotation (each round starts one method later), in one process, with ``torch.set_num_threads``.
* ``trainable_params``; ``adapter_bytes``: size of what is saved to fine-tune the model: vpeft ``save_adapter``'s
  ``adapter_model.safetensors`` (plus the head as safetensors on open_clip, where the head is outside the backbone),
  HF peft ``save_pretrained``'s ``adapter_model.safetensors``, and for full fine-tuning the whole state dict.

Ratios against ``full_ft`` (``merged_infer_flops`` against ``full_ft``'s ``infer_flops``, the plain backbone) are
printed and written to a sibling file ``<json stem>.ratios.json`` together with the skipped methods, the checks and
the run's settings, so the rows in ``--json`` keep exactly the keys above.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _measure as M

MB = 2**20
KEYS = ("method", "model", "batch_size", "threads", "saved_bytes", "train_flops", "infer_flops", "merged_infer_flops",
        "step_time", "trainable_params", "adapter_bytes")
METRICS = ("saved_bytes", "train_flops", "infer_flops", "merged_infer_flops", "step_time", "trainable_params",
           "adapter_bytes")
#: Targets checked on every run (ratios against full fine-tuning).
DORA_SAVED_MAX = 0.75
SIDE_SAVED_MAX = 0.10
SIDE_METHODS = ("lst", "unipt")


class ImageHead(nn.Module):
    """``head(normalize(backbone(x)))``: a CLIP image tower classified by a linear head on its features."""

    def __init__(self, backbone: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.head(F.normalize(self.backbone(x), dim=-1))


@dataclass
class Entry:
    """One row: the network called on images, how to save and merge it, its measurements."""

    name: str
    desc: str
    net: nn.Module
    save: Callable[[str], None]  # writes the adapter file(s) into a directory
    merge: Optional[Callable[[], nn.Module]] = None  # the merged plain network (mergeable methods only)
    opt: Optional[torch.optim.Optimizer] = None
    out: dict[str, Any] = field(default_factory=dict)
    times: list[float] = field(default_factory=list)


class Suite:
    """Builds the rows for one backbone id."""

    def __init__(self, model_id: str, num_classes: int, img_size: Optional[int], r: int) -> None:
        import vpeft

        self.model_id, self.r, self.num_classes = model_id, r, num_classes
        self.family = model_id.split(":", 1)[0]
        torch.manual_seed(0)
        if self.family == "timm":
            kw = dict(num_classes=num_classes)
            if img_size:
                kw["img_size"] = img_size
            self.base = vpeft.create_backbone(model_id, **kw).train()
            size = self.base.pretrained_cfg["input_size"][1:] if not img_size else (img_size, img_size)
            self.extra = ["head"]
        elif self.family == "open_clip":
            if img_size:
                raise ValueError("--img-size applies to timm models only")
            clip = vpeft.create_backbone(model_id)
            self.base = clip.visual.train()
            self.base.vpeft_backbone_id = model_id
            del clip
            self.head = nn.Linear(self.base.output_dim, num_classes)
            s = self.base.image_size
            size = tuple(s) if isinstance(s, (tuple, list)) else (s, s)
            self.extra = []
        else:
            raise ValueError(f"--model must be 'timm:<name>' or 'open_clip:<name>', got {model_id!r}")
        self.image_size = tuple(int(v) for v in size)

    # -- pieces ----------------------------------------------------------------------------------------------------
    def fresh(self) -> nn.Module:
        """A copy of the plain backbone (same initial weights for every row)."""
        return copy.deepcopy(self.base)

    def plain_net(self) -> nn.Module:
        """The plain network (backbone + head), every parameter trainable."""
        net = self.fresh() if self.family == "timm" else ImageHead(self.fresh(), copy.deepcopy(self.head))
        return net.requires_grad_(True)

    def _wrap(self, backbone: nn.Module) -> nn.Module:
        return backbone if self.family == "timm" else ImageHead(backbone, copy.deepcopy(self.head))

    # -- rows ------------------------------------------------------------------------------------------------------
    def full_ft(self) -> Entry:
        net = self.plain_net()
        return Entry("full_ft", "every parameter trains", net, lambda d: M.save_tensors(net, f"{d}/model.safetensors"))

    def linear_probe(self) -> Entry:
        import vpeft

        if self.family == "timm":
            pm = vpeft.get_peft_model(self.fresh(), [], trainable_extra=["head"])
            return Entry("linear_probe", "head only (vpeft, no configs)", pm, pm.save_adapter)
        net = ImageHead(self.fresh().requires_grad_(False), copy.deepcopy(self.head))
        return Entry("linear_probe", "head only", net, lambda d: M.save_tensors(net.head, f"{d}/head.safetensors"))

    def vpeft(self, name: str, config) -> Entry:
        import torch.nn.functional as F

        import vpeft
        from vpeft.methods._calibration import needs_calibration

        if needs_calibration(config):
            # Mask tuning and SPT place their parameters from training gradients: one seeded random batch here, so
            # the placement is arbitrary but the counts (and so every cost measured) are the method's.
            gen = torch.Generator().manual_seed(2)
            xb = torch.randn(2, 3, *self.image_size, generator=gen)
            yb = torch.randint(0, self.num_classes, (2,), generator=gen)
            (config,) = vpeft.calibrate(self.fresh(), [config], [(xb, yb)],
                                        loss_fn=lambda m, x, y: F.cross_entropy(self._wrap(m)(x), y))
        pm = vpeft.get_peft_model(self.fresh(), config, trainable_extra=self.extra)  # ValueError: does not fit
        net = self._wrap(pm)

        def save(d: str) -> None:
            pm.save_adapter(d)
            if net is not pm:
                M.save_tensors(net.head, f"{d}/head.safetensors")

        def merge() -> nn.Module:
            return self._wrap(pm.merge_and_unload()) if net is pm else ImageHead(pm.merge_and_unload(), net.head)

        mergeable = all(a.mergeable for layer in pm.adapter_layers().values() for _, a in layer.adapters())
        return Entry(name, _describe(config), net, save, merge if mergeable and pm.adapter_layers() else None)

    def hf_peft(self, name: str, use_dora: bool) -> Entry:
        if self.family != "timm":
            raise ValueError("HF peft rows run on timm models only (open_clip's packed attention projection is "
                             "not an nn.Linear that peft's LoRA targets)")
        try:
            import peft
        except ImportError:
            raise ValueError("HF peft is not installed (pip install 'vpeft[bench]')") from None
        cfg = peft.LoraConfig(r=self.r, lora_alpha=self.r, lora_dropout=0.0, target_modules=["qkv"],
                              modules_to_save=["head"], use_dora=use_dora)
        pm = peft.get_peft_model(self.fresh(), cfg)
        desc = (f"HF peft {peft.__version__} LoraConfig(r={self.r}, lora_alpha={self.r}, target_modules=['qkv'], "
                f"use_dora={use_dora}, modules_to_save=['head'])")
        return Entry(name, desc, pm, lambda d: pm.save_pretrained(d, safe_serialization=True), pm.merge_and_unload)


def _describe(config) -> str:
    d = {k: v for k, v in config.to_dict().items() if k != "method" and v is not None}
    return f"{type(config).__name__}({', '.join(f'{k}={v!r}' for k, v in d.items())})"


def parse_overrides(items: list[str], error: Callable[[str], Any]) -> dict[str, dict[str, Any]]:
    """``["spt.budget=200000", ...]`` -> ``{"spt": {"budget": 200000}}``; ``error`` is called on a malformed item."""
    import ast

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, eq, value = item.partition("=")
        method, dot, field_name = key.partition(".")
        if not (eq and dot and method and field_name):
            error(f"--set takes METHOD.FIELD=VALUE, got {item!r}")
        try:
            out.setdefault(method, {})[field_name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            error(f"--set {item!r}: VALUE must be a Python literal (number, string in quotes, list...)")
    return out


def build_entries(suite: Suite, only: Optional[list[str]], overrides: Optional[dict[str, dict[str, Any]]] = None
                  ) -> tuple[list[Entry], list[dict[str, str]]]:
    """All rows in order, and the skipped ones with the reason; ``overrides`` changes registered methods' configs."""
    import vpeft
    from vpeft.methods.base import get_method
    from vpeft.methods.dora import DoRAConfig

    plans: list[tuple[str, Callable[[], Entry]]] = [("full_ft", suite.full_ft), ("linear_probe", suite.linear_probe)]
    overrides = overrides or {}
    unknown = sorted(set(overrides) - set(vpeft.list_methods()))
    if unknown:
        raise ValueError(f"--set names unknown methods {unknown}; registered: {vpeft.list_methods()}")
    for m in vpeft.list_methods():
        plans.append((m, lambda m=m: suite.vpeft(m, get_method(m).config_class(**overrides.get(m, {})))))
    r = suite.r
    # each vpeft row next to its HF peft counterpart, so that they run back to back in every timed round
    plans += [("vpeft_lora_qkv", lambda: suite.vpeft("vpeft_lora_qkv", vpeft.LoraConfig(r=r, alpha=r,
                                                                                         targets=["qkv"]))),
              ("peft_lora_qkv", lambda: suite.hf_peft("peft_lora_qkv", False)),
              ("vpeft_dora_qkv", lambda: suite.vpeft("vpeft_dora_qkv", DoRAConfig(r=r, alpha=r, targets=["qkv"]))),
              ("peft_dora_qkv", lambda: suite.hf_peft("peft_dora_qkv", True))]
    entries, skipped = [], []
    for name, make in plans:
        if only and name not in only and name != "full_ft":
            continue
        try:
            entries.append(make())
        except ValueError as e:
            reason = str(e)
            if suite.family == "open_clip" and "text tower" in reason:
                reason += " (this suite runs the image tower only; benchmarks.prompt_memory measures prompt learning)"
            skipped.append(dict(method=name, reason=reason))
        except Exception as e:  # a method that breaks must not take the suite down
            skipped.append(dict(method=name, reason=f"error while building: {type(e).__name__}: {e}"))
    return entries, skipped


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or not b else a / b


def _run_each(entries: list[Entry], skipped: list[dict[str, str]], what: str, fn: Callable[[Entry], None]
              ) -> list[Entry]:
    """Run ``fn`` per entry; an entry that raises is moved to ``skipped`` (full_ft must not fail)."""
    keep = []
    for e in entries:
        try:
            fn(e)
            keep.append(e)
        except Exception as err:
            if e.name == "full_ft":
                raise
            skipped.append(dict(method=e.name, reason=f"error while {what}: {type(err).__name__}: {err}"))
    return keep


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="timm:vit_small_patch16_224", help="timm:<name> or open_clip:<name>")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    ap.add_argument("--num-classes", type=int, default=100)
    ap.add_argument("--r", type=int, default=8, help="rank of the *_qkv rows (vpeft and HF peft)")
    ap.add_argument("--reps", type=int, default=5, help="timed rounds over all methods (after one warm-up round)")
    ap.add_argument("--img-size", type=int, default=None, help="timm only: smaller images for smoke runs")
    ap.add_argument("--methods", nargs="+", default=None, help="only these rows (full_ft is always run)")
    ap.add_argument("--set", nargs="+", default=[], metavar="METHOD.FIELD=VALUE", dest="overrides",
                    help="change a registered method's paper-default config, e.g. spt.budget=200000 (VALUE is a "
                         "Python literal)")
    ap.add_argument("--json", default=None, help="rows as JSON; ratios etc. go to <stem>.ratios.json")
    ap.add_argument("--png", default=None, help="chart of saved bytes vs trainable params")
    args = ap.parse_args(argv)
    if args.reps < 1:
        ap.error("--reps must be >= 1")
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    suite = Suite(args.model, args.num_classes, args.img_size, args.r)
    entries, skipped = build_entries(suite, args.methods, parse_overrides(args.overrides, ap.error))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch_size, 3, *suite.image_size, generator=gen)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=gen)
    print(f"{args.model} (random init, fp32, train mode), batch {args.batch_size} at "
          f"{'x'.join(map(str, suite.image_size))}, {args.num_classes} classes, CPU, {threads} threads, "
          f"torch {torch.__version__}; {len(entries)} rows, {args.reps} timed rounds", flush=True)

    plain_infer = M.infer_flops(suite.plain_net(), x)

    def static(e: Entry) -> None:
        e.out["trainable_params"] = M.num_trainable(e.net)
        with tempfile.TemporaryDirectory() as d:
            e.save(d)
            e.out["adapter_bytes"] = M.file_bytes(d)
        e.out["infer_flops"] = M.infer_flops(e.net, x)
        e.out["train_flops"] = M.train_flops(e.net, x, y)
        e.opt = torch.optim.AdamW(M.trainable(e.net), lr=1e-4)

    entries = _run_each(entries, skipped, "counting FLOPs / saving", static)
    print(f"  sizes and FLOPs done ({time.perf_counter() - t_start:.0f} s)", flush=True)

    def warm(e: Entry) -> None:
        e.out.update(M.saved_step(e.net, x, y, e.opt))

    entries = _run_each(entries, skipped, "measuring saved tensors", warm)
    print(f"  saved bytes (warm-up round) done ({time.perf_counter() - t_start:.0f} s)", flush=True)

    for rep in range(args.reps):
        k = rep % len(entries)
        for e in entries[k:] + entries[:k]:
            e.times.append(M.timed_step(e.net, x, y, e.opt))
        print(f"  timed round {rep + 1}/{args.reps} done ({time.perf_counter() - t_start:.0f} s)", flush=True)

    def merged(e: Entry) -> None:
        e.out["merged_infer_flops"] = M.infer_flops(e.merge(), x) if e.merge is not None else None

    entries = _run_each(entries, skipped, "merging", merged)

    rows, ratios = [], []
    ref = next(e for e in entries if e.name == "full_ft").out
    ref = dict(ref, step_time=statistics.median(next(e for e in entries if e.name == "full_ft").times))
    for e in entries:
        e.out["step_time"] = statistics.median(e.times)
        rows.append(dict(method=e.name, model=args.model, batch_size=args.batch_size, threads=threads,
                         **{k: e.out[k] for k in METRICS}))
        rr = {k: _ratio(e.out[k], ref[k]) for k in METRICS}
        rr["merged_infer_flops"] = _ratio(e.out["merged_infer_flops"], ref["infer_flops"])
        ratios.append(dict(method=e.name, **rr))
    assert all(tuple(r) == KEYS for r in rows)

    _print_table(entries, ratios)
    checks = _checks(rows, ratios, skipped, plain_infer, {e.name: e.times for e in entries})
    wall = time.perf_counter() - t_start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB
    print(f"total wall time {wall:.0f} s, process peak RSS {rss:.0f} MB")

    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
        side = dict(reference="full_ft", note="value / full_ft value; merged_infer_flops / full_ft infer_flops",
                    ratios=ratios, skipped=skipped, checks=checks, plain_infer_flops=plain_infer,
                    descriptions={e.name: e.desc for e in entries},
                    step_times={e.name: e.times for e in entries},
                    settings=dict(model=args.model, batch_size=args.batch_size, threads=threads,
                                  num_classes=args.num_classes, image_size=list(suite.image_size), r=args.r,
                                  reps=args.reps, torch=torch.__version__, machine=platform.machine(),
                                  cpu_count=os.cpu_count(), wall_s=wall, peak_rss_bytes=int(rss * MB)))
        with open(ratios_path(args.json), "w") as f:
            json.dump(side, f, indent=2)
    if args.png:
        from .plot_methods import plot

        plot(rows, args.png, title=f"{args.model}, batch {args.batch_size}, fp32, CPU")
        print(f"wrote {args.png}")
    return rows


def ratios_path(json_path: str) -> str:
    stem, _ = os.path.splitext(json_path)
    return stem + ".ratios.json"


def _fmt(v: Optional[float], scale: float = 1.0, nd: int = 2) -> str:
    return "-" if v is None else f"{v / scale:.{nd}f}"


def _print_table(entries: list[Entry], ratios: list[dict[str, Any]]) -> None:
    hdr = (f"\n{'method':<16}{'trainable':>11}{'x full':>8}{'adapter MB':>11}{'saved MB':>10}{'x full':>8}"
           f"{'+params MB':>11}{'train GF':>10}{'x full':>8}{'infer GF':>10}{'merged GF':>10}{'step s':>8}"
           f"{'x full':>8}{'min-max s':>12}")
    print(hdr)
    for e, r in zip(entries, ratios):
        o = e.out
        print(f"{e.name:<16}{o['trainable_params']:>11,}{r['trainable_params']:>8.4f}"
              f"{_fmt(o['adapter_bytes'], MB):>11}{_fmt(o['saved_bytes'], MB, 1):>10}{r['saved_bytes']:>8.3f}"
              f"{_fmt(o['saved_bytes_with_params'], MB, 1):>11}{_fmt(o['train_flops'], 1e9, 1):>10}"
              f"{r['train_flops']:>8.3f}{_fmt(o['infer_flops'], 1e9, 2):>10}"
              f"{_fmt(o['merged_infer_flops'], 1e9, 2):>10}{o['step_time']:>8.3f}{r['step_time']:>8.3f}"
              f"{min(e.times):>6.2f}-{max(e.times):<5.2f}")
    print("saved MB: saved for backward, parameter/buffer storages excluded (+params MB: included); "
          "GF = GFLOPs (FlopCounterMode, math attention); x full = ratio to full_ft")
    for e in entries:
        print(f"  {e.name}: {e.desc}")
    for e in entries:
        if e.out["transient_bytes"]:
            print(f"  {e.name}: {e.out['transient_bytes'] / MB:.1f} MB more were saved during the forward but freed "
                  "before it ended (a dropped autograd branch); not counted")


def _checks(rows: list[dict[str, Any]], ratios: list[dict[str, Any]], skipped: list[dict[str, str]],
            plain_infer: int, times: dict[str, list[float]]) -> list[dict[str, Any]]:
    """Print PASS/FAIL for the targets; return them as dicts."""
    by = {r["method"]: r for r in rows}
    rat = {r["method"]: r for r in ratios}
    out: list[dict[str, Any]] = []

    def check(name: str, ok: Optional[bool], detail: str) -> None:
        status = "n/a" if ok is None else ("PASS" if ok else "FAIL")
        out.append(dict(check=name, status=status, detail=detail))
        print(f"  [{status}] {name}: {detail}")

    print(f"\nchecks (plain backbone infer FLOPs {plain_infer:,}):")
    for r in rows:
        if r["merged_infer_flops"] is not None:
            check(f"{r['method']} merged_infer_flops == plain infer_flops", r["merged_infer_flops"] == plain_infer,
                  f"{r['merged_infer_flops']:,} vs {plain_infer:,}")
    if "dora" in rat:
        d = rat["dora"]["saved_bytes"]
        check(f"vpeft dora (q,v) saved_bytes <= {DORA_SAVED_MAX} x full_ft", d <= DORA_SAVED_MAX, f"{d:.3f}")
    for ours, theirs in (("vpeft_lora_qkv", "peft_lora_qkv"), ("vpeft_dora_qkv", "peft_dora_qkv")):
        if ours in by and theirs in by:
            a, b = by[ours]["saved_bytes"], by[theirs]["saved_bytes"]
            check(f"{ours} saved_bytes <= {theirs} (same targets)", a <= b, f"{a:,} vs {b:,} ({a / b:.3f}x)")
            # the verdict compares the medians; the per-round ratio (same round, back to back) and the ranges
            # tell whether a difference stands out of the run's noise
            a, b, ta, tb = by[ours]["step_time"], by[theirs]["step_time"], times[ours], times[theirs]
            paired = statistics.median(u / v for u, v in zip(ta, tb))
            overlap = min(ta) <= max(tb) and min(tb) <= max(ta)
            check(f"{ours} step_time <= {theirs} (same targets)", a <= b,
                  f"median {a:.3f} s vs {b:.3f} s ({a / b:.3f}x); median per-round ratio {paired:.3f}; ranges "
                  f"{min(ta):.2f}-{max(ta):.2f} vs {min(tb):.2f}-{max(tb):.2f} s"
                  + (" (overlap: within this run's noise)" if overlap and a > b else ""))
    if "lora" in by and "peft_lora_qkv" in by:  # different targets (q, v slices vs the fused qkv): information only
        a, b = by["lora"], by["peft_lora_qkv"]
        print(f"  [info] lora (q,v) vs peft_lora_qkv (whole qkv): saved_bytes "
              f"{a['saved_bytes'] / b['saved_bytes']:.3f}x, step_time {a['step_time'] / b['step_time']:.3f}x")
    for m in SIDE_METHODS:
        if m in rat:
            check(f"{m} saved_bytes <= {SIDE_SAVED_MAX} x full_ft", rat[m]["saved_bytes"] <= SIDE_SAVED_MAX,
                  f"{rat[m]['saved_bytes']:.3f}")
        else:
            import vpeft

            why = next((s["reason"] for s in skipped if s["method"] == m),
                       "not selected (--methods)" if m in vpeft.list_methods() else "not in vpeft.list_methods()")
            check(f"{m} saved_bytes <= {SIDE_SAVED_MAX} x full_ft", None, f"not measured: {why}")
    for s in skipped:
        print(f"  skipped {s['method']}: {s['reason']}")
    return out


__all__ = ["KEYS", "main", "ratios_path"]

if __name__ == "__main__":
    main()
