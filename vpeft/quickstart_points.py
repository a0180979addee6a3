"""``vpeft quickstart --task points``: few-shot point-cloud transfer on SYNTHETIC shapes, offline, on two CPU cores.

What it does:

1. Generates a *synthetic* point-cloud dataset (no real scans are used or downloaded): 10 shape classes (sphere, cube,
   cylinder, torus, octahedron, triangular prism; then cone, pyramid, capsule, ellipsoid), each cloud sampled on the
   shape's surface with random proportions, a random 3-D rotation, centring and unit-ball normalisation, a random
   scale and Gaussian jitter. Pure numpy, deterministic given ``--data-seed``.
2. *Self-pretrains* a small transformer with the Point-MAE fine-tuning architecture (FPS + kNN patches, mini-PointNet
   patch embedding, positions before every block, cls + max pooling) on the first 6 classes. This is SUPERVISED
   classification, not Point-MAE's masked autoencoding (no pretrained point weights can be downloaded here; the
   backbone is labelled "self-pretrained" everywhere). The weights are saved in the official Point-MAE key format
   (``blocks.blocks.*``, ``cls_head_finetune.*``; :func:`vpeft.backbones.point_mae.to_official_state_dict`) as a
   safetensors file in the vpeft cache keyed by the configuration, and reused on later runs.
3. For the 4 held-out classes and each shot count K and seed, trains on K labelled clouds per class with: a linear
   probe on an untrained (randomly initialised) backbone, a linear probe, IDPT, Point-PEFT, VPT-deep, LoRA and DAPT (and
   full fine-tuning when ``--methods`` names it: it is not cheap here), each built through vpeft's public API from
   the checkpoint loaded back by ``vpeft.create_backbone("point_mae:base", pretrained=path, ...)``.
4. Prints a table (accuracy mean +- std over seeds, trainable parameters, training time), writes ``results.json``
   and ``accuracy_vs_shots.png`` and says where they are.

Runtime (measured with ``time``, 2 CPU cores, otherwise nearly idle; 3 seeds, shots 1 2 4 8, default methods):
3.5 minutes on the first run (57 s of it self-pretraining; DAPT's row, added later, about 35 s of it), about
2.5 minutes with the checkpoint cached; full fine-tuning (``--methods probe IDPT PEFT VPT LoRA DAPT full``) adds
about 1 minute. With other jobs on the same cores
it is several times slower (20 minutes measured at load average ~5).

Protocol (fixed before looking at any test number):
    * Train, validation and test clouds of the held-out classes are disjoint draws. The K shots of a seed are the
      first K clouds of a seed-dependent permutation of each class's shot pool, so the subsets are nested across K.
      ``val_per_class`` clouds per held-out class are reserved as a validation set and never drawn as shots;
      ``--eval-split val`` evaluates on them, for choosing hyper-parameters. The learning rates below are the image
      quickstart's for the shared methods and were NOT tuned on this task (IDPT and Point-PEFT: set once, a
      priori; DAPT, added later: IDPT's rate, set a priori). Test clouds (a separately seeded draw) are only used
      for the reported accuracies.
    * Every method's classifier is a single ``nn.Linear`` on the backbone's pooled ``concat(cls, max)`` features
      (the Point-MAE MLP head with BatchNorm and dropout 0.5 is used for pretraining only). Training is full-batch
      AdamW on the K-shot set. Every method starts its head from the linear probe of the same shots and seed
      (LP-FT, Kumar et al., arXiv:2202.10054); its reported time includes that probe. IDPT therefore runs with
      ``head=False`` (its dynamic prompt acts through attention in the last block; the paper's 3C-input MLP head is
      not used) and Point-PEFT's memory bank is built from the K-shot training clouds before training.
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

from . import quickstart as qs
from ._fileio import atomic_write
from .quickstart import Method, Task

BACKBONE = "point_mae:base"  # the architecture family; every size below overrides the base model's
CACHE_VERSION = 2  # bump when the data generator or the pretraining recipe changes
SOURCE_SHAPES = ("sphere", "cube", "cylinder", "torus", "octahedron", "triangular prism")
TARGET_SHAPES = ("cone", "pyramid", "capsule", "ellipsoid")
SHAPES = SOURCE_SHAPES + TARGET_SHAPES
OPT_IN = ("full fine-tuning",)  # run only when ``--methods`` names them (see ``_run``)


@dataclass(frozen=True)
class Setup:
    """Sizes and schedules of one point quickstart configuration.

    Attributes:
        num_points: Points per cloud.
        num_group: Patches (FPS centres) per cloud.
        group_size: Points per patch.
        embed_dim: Transformer width.
        depth: Transformer blocks.
        num_heads: Attention heads.
        pretrain_per_class: Training clouds per source class.
        pretrain_epochs: Epochs of pretraining.
        pretrain_batch: Batch size of pretraining.
        pretrain_lr: Peak AdamW learning rate (linear warm-up, cosine decay).
        bn_calibration_clouds: Training clouds whose statistics replace the BatchNorm running averages after
            pretraining (see :func:`recalibrate_batchnorm`).
        source_test_per_class: Test clouds per source class (pretraining accuracy).
        pool_per_class: Shot-pool clouds per held-out class.
        val_per_class: Validation clouds per held-out class (never drawn as shots).
        eval_per_class: Test clouds per held-out class.
        probe_steps: Full-batch steps of the linear probe (on cached features).
        steps: Full-batch steps of every other method.
    """

    num_points: int = 512
    num_group: int = 32
    group_size: int = 16
    embed_dim: int = 128
    depth: int = 4
    num_heads: int = 4
    pretrain_per_class: int = 150
    pretrain_epochs: float = 3.0
    pretrain_batch: int = 32
    pretrain_lr: float = 1e-3
    bn_calibration_clouds: int = 512
    source_test_per_class: int = 30
    pool_per_class: int = 16
    val_per_class: int = 20
    eval_per_class: int = 30
    probe_steps: int = 100
    steps: int = 15


FULL = Setup()
# --fast: a tiny network and a few clouds, for tests and smoke runs (the numbers mean nothing)
FAST = Setup(num_points=128, num_group=8, group_size=8, embed_dim=32, depth=2, num_heads=2, pretrain_per_class=8,
             pretrain_epochs=1.0, pretrain_batch=16, source_test_per_class=4, pool_per_class=4, val_per_class=4,
             eval_per_class=5, probe_steps=10, steps=2)


# ----------------------------------------------------------------------------------------------------- data


def _tri_mesh(vertices: Sequence, faces: Sequence, n: int, rng: np.random.Generator) -> np.ndarray:
    # area-weighted triangle choice, then uniform barycentric coordinates: uniform on the mesh surface
    v = np.asarray(vertices, dtype=np.float64)
    tri = v[np.asarray(faces)]  # F 3 3
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    f = rng.choice(len(tri), size=n, p=area / area.sum())
    r1, r2 = np.sqrt(rng.random(n)), rng.random(n)
    a, b, c = tri[f, 0], tri[f, 1], tri[f, 2]
    return (1 - r1)[:, None] * a + (r1 * (1 - r2))[:, None] * b + (r1 * r2)[:, None] * c


def _unit_sphere(n: int, rng: np.random.Generator) -> np.ndarray:
    p = rng.normal(size=(n, 3))
    return p / np.linalg.norm(p, axis=1, keepdims=True)


def _cylinder_side(n: int, r: float, h: float, rng: np.random.Generator) -> np.ndarray:
    t = rng.uniform(0, 2 * np.pi, n)
    return np.stack([r * np.cos(t), r * np.sin(t), rng.uniform(-h / 2, h / 2, n)], axis=1)


def _disk(n: int, r: float, z: float, rng: np.random.Generator) -> np.ndarray:
    t, rr = rng.uniform(0, 2 * np.pi, n), r * np.sqrt(rng.random(n))
    return np.stack([rr * np.cos(t), rr * np.sin(t), np.full(n, z)], axis=1)


def _split(n: int, weights: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    # how many of the n points land on each part, proportional to the parts' areas
    return rng.multinomial(n, np.asarray(weights, dtype=np.float64) / np.sum(weights))


_CUBE_V = [(x, y, z) for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)]
_CUBE_F = [(0, 1, 3), (0, 3, 2), (4, 6, 7), (4, 7, 5), (0, 4, 5), (0, 5, 1), (2, 3, 7), (2, 7, 6), (0, 2, 6),
           (0, 6, 4), (1, 5, 7), (1, 7, 3)]
_OCTA_V = [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]
_OCTA_F = [(a, b, c) for a in (0, 1) for b in (2, 3) for c in (4, 5)]


def sample_shape(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` points on the surface of one random instance of shape ``name`` (canonical pose, before normalising).

    Proportions vary per instance (aspect ratios, radii), so a class is a family of shapes, not one template.
    """
    u = rng.uniform
    if name == "sphere":
        return _unit_sphere(n, rng)
    if name == "ellipsoid":
        return _unit_sphere(n, rng) * np.array([1.0, u(0.45, 0.75), u(0.2, 0.45)])
    if name == "cube":  # a box with mildly varying side lengths
        return _tri_mesh(_CUBE_V, _CUBE_F, n, rng) * np.array([1.0, u(0.8, 1.0), u(0.8, 1.0)])
    if name == "octahedron":
        return _tri_mesh(_OCTA_V, _OCTA_F, n, rng) * np.array([1.0, 1.0, u(0.8, 1.3)])
    if name == "pyramid":  # square base at z=0, apex above its centre
        h = u(0.9, 1.6)
        v = [(-1, -1, 0), (1, -1, 0), (1, 1, 0), (-1, 1, 0), (0, 0, h)]
        return _tri_mesh(v, [(0, 1, 2), (0, 2, 3), (0, 1, 4), (1, 2, 4), (2, 3, 4), (3, 0, 4)], n, rng)
    if name == "triangular prism":
        h = u(1.2, 2.2)
        base = [(np.cos(a), np.sin(a)) for a in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3)]
        v = [(x, y, -h / 2) for x, y in base] + [(x, y, h / 2) for x, y in base]
        f = [(0, 1, 2), (3, 5, 4), (0, 1, 4), (0, 4, 3), (1, 2, 5), (1, 5, 4), (2, 0, 3), (2, 3, 5)]
        return _tri_mesh(v, f, n, rng)
    if name == "cylinder":
        r, h = 1.0, u(1.2, 2.5)
        side, top, bottom = _split(n, [2 * np.pi * r * h, np.pi * r * r, np.pi * r * r], rng)
        return np.concatenate([_cylinder_side(side, r, h, rng), _disk(top, r, h / 2, rng),
                               _disk(bottom, r, -h / 2, rng)])
    if name == "cone":  # lateral surface (area-uniform: radius ~ sqrt) and base disk
        r, h = 1.0, u(1.2, 2.2)
        lat, base = _split(n, [np.pi * r * np.hypot(r, h), np.pi * r * r], rng)
        t, s = rng.uniform(0, 2 * np.pi, lat), np.sqrt(rng.random(lat))
        side = np.stack([r * s * np.cos(t), r * s * np.sin(t), h * (1 - s)], axis=1)
        return np.concatenate([side, _disk(base, r, 0.0, rng)])
    if name == "capsule":  # cylinder side + two hemispherical caps
        r, h = 1.0, u(1.0, 2.5)
        side, caps = _split(n, [2 * np.pi * r * h, 4 * np.pi * r * r], rng)
        cap = _unit_sphere(caps, rng)
        cap[:, 2] += np.sign(cap[:, 2]) * h / 2
        return np.concatenate([_cylinder_side(side, r, h, rng), cap])
    if name == "torus":  # tube angle drawn uniformly (slightly denser on the inside than area-uniform)
        big, small = 1.0, u(0.2, 0.45)
        a, b = rng.uniform(0, 2 * np.pi, n), rng.uniform(0, 2 * np.pi, n)
        ring = big + small * np.cos(b)
        return np.stack([ring * np.cos(a), ring * np.sin(a), small * np.sin(b)], axis=1)
    raise ValueError(f"unknown synthetic shape {name!r}; shapes: {SHAPES}")


def _rotation(rng: np.random.Generator) -> np.ndarray:
    # uniform random rotation: QR of a Gaussian matrix with the sign fix, determinant +1
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def make_cloud(name: str, num_points: int, rng: np.random.Generator, noise: float = 0.01) -> np.ndarray:
    """One augmented synthetic cloud ``(num_points, 3)``: random instance, rotation, unit-ball normalisation,
    scale in [0.7, 1] and Gaussian jitter of std ``noise``."""
    p = sample_shape(name, num_points, rng)
    p = rng.permutation(p) @ _rotation(rng).T
    p = p - p.mean(axis=0)
    p = p / np.linalg.norm(p, axis=1).max() * rng.uniform(0.7, 1.0)
    return (p + rng.normal(scale=noise, size=p.shape)).astype(np.float32)


def make_clouds(classes: Sequence[int], per_class: int, num_points: int,
                seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` clouds of each class index in ``classes`` (into :data:`SHAPES`), deterministic given ``seed``.

    Each class has its own generator (``seed``, class index), so adding classes never changes another's clouds.
    """
    xs, ys = [], []
    for c in classes:
        rng = np.random.default_rng([seed, c])
        xs += [make_cloud(SHAPES[c], num_points, rng) for _ in range(per_class)]
        ys += [c] * per_class
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys, dtype=torch.int64)


@dataclass
class PointData:
    """The synthetic dataset: source (pretraining) clouds and the held-out task.

    Attributes:
        x_source: Source-class training clouds ``(N, P, 3)``.
        y_source: Their labels (0..5).
        x_source_test: Source-class test clouds.
        y_source_test: Their labels.
        task: The few-shot task on the held-out classes (labels relabelled to 0..3).
        source: Human-readable provenance.
    """

    x_source: torch.Tensor
    y_source: torch.Tensor
    x_source_test: torch.Tensor
    y_source_test: torch.Tensor
    task: Task
    source: str


def make_data(setup: Setup, seed: int = 0, eval_split: str = "test") -> PointData:
    """Generate the synthetic clouds and the held-out task (split seeds are derived from ``seed``)."""
    if eval_split not in ("test", "val"):
        raise ValueError(f"eval_split must be 'test' or 'val', got {eval_split!r}")
    n_src = len(SOURCE_SHAPES)
    src, tgt = range(n_src), range(n_src, len(SHAPES))
    xs, ys = make_clouds(src, setup.pretrain_per_class, setup.num_points, seed)
    xst, yst = make_clouds(src, setup.source_test_per_class, setup.num_points, seed + 1)
    # held-out training draw: reserved validation clouds, then the shot pool (fixed permutation, seed 1234)
    x, y = make_clouds(tgt, setup.val_per_class + setup.pool_per_class, setup.num_points, seed + 2)
    y = y - n_src
    perm = qs._balanced(y, range(len(tgt)), len(y), seed=1234)
    val = [p[: setup.val_per_class] for p in perm]
    pool = [p[setup.val_per_class:] for p in perm]
    if eval_split == "val":
        ev = torch.cat(val)
        x_eval, y_eval = x[ev], y[ev]
    else:
        x_eval, y_eval = make_clouds(tgt, setup.eval_per_class, setup.num_points, seed + 3)
        y_eval = y_eval - n_src
    source = (f"SYNTHETIC point clouds ({setup.num_points} surface points per cloud, random proportions, rotation, "
              f"scale and jitter; generated in numpy with seed {seed}; no real scans)")
    return PointData(xs, ys, xst, yst, Task(pool, x, y, x_eval, y_eval), source)


# ------------------------------------------------------------------------------------------------- backbone


def arch_for(setup: Setup) -> dict:
    """Point-MAE keyword arguments of ``setup`` (drop path off: the few-shot runs are short and deterministic)."""
    return dict(num_group=setup.num_group, group_size=setup.group_size, embed_dim=setup.embed_dim, depth=setup.depth,
                num_heads=setup.num_heads, drop_path_rate=0.0)


def load_backbone(arch: dict, checkpoint: Optional[str], num_classes: int) -> nn.Module:
    """The point transformer through vpeft's loader (self-pretrained ``checkpoint``, or random if None), with a
    fresh linear classifier of ``num_classes`` outputs (see the protocol)."""
    model = vpeft.create_backbone(BACKBONE, pretrained=checkpoint if checkpoint else False, num_classes=num_classes,
                                  **arch)
    model.head = nn.Linear(model.head_hidden_size, num_classes)
    return model


@torch.no_grad()
def recalibrate_batchnorm(net: nn.Module, x: torch.Tensor, batch: int = 64) -> None:
    """Replace every BatchNorm's running statistics by their average over ``x`` with the final weights.

    Why: the mini-PointNet's BatchNorms see ``B * G`` patches per step and the weights still move fast at the end of
    the short pretraining, so the exponential running averages lag behind; measured on this recipe, eval mode then
    predicted a single class (source test accuracy at chance) while train-mode statistics gave 58%. Recomputing the
    statistics once with the final weights ("precise BN", Wu & Johnson, arXiv:2105.07576) removes the lag. Dropout
    is off during the pass, as at evaluation.
    """
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    was_training = net.training
    momenta = [m.momentum for m in bns]
    net.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
        m.train()
    try:
        for i in range(0, len(x), batch):
            net(x[i:i + batch])
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        net.train(was_training)


def pretrain(data: PointData, setup: Setup, arch: dict, path: str, seed: int = 0,
             log: Callable[[str], None] = print) -> dict:
    """Supervised pretraining on the source classes; saves the official Point-MAE keys (safetensors) to ``path``.

    Returns:
        A summary: clouds, steps, seconds and the accuracy on the source classes' test clouds.
    """
    from safetensors.torch import save

    from .backbones.point_mae import to_official_state_dict

    torch.manual_seed(seed)
    x, y = data.x_source, data.y_source
    g = torch.Generator().manual_seed(seed)
    net = vpeft.create_backbone(BACKBONE, num_classes=len(SOURCE_SHAPES), **dict(arch, drop_path_rate=0.1))
    steps = max(1, int(setup.pretrain_epochs * len(x) / setup.pretrain_batch))
    opt = torch.optim.AdamW(net.parameters(), lr=setup.pretrain_lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: qs._cosine(s, steps, max(1, steps // 10)))
    t0 = time.time()
    net.train()
    order = torch.randperm(len(x), generator=g)
    for step in range(steps):
        start = (step * setup.pretrain_batch) % len(x)
        if start + setup.pretrain_batch > len(x):  # next epoch: reshuffle
            order = torch.randperm(len(x), generator=g)
        idx = order[start:start + setup.pretrain_batch]
        if len(idx) < 2:  # the head's BatchNorm needs two samples
            idx = order[:2]
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % max(1, steps // 4) == 0:
            log(f"  pretraining step {step + 1}/{steps}  loss {loss.item():.3f}  ({time.time() - t0:.0f}s)")
    # a random subset: the clouds are stored class by class and every class must shape the statistics
    recalibrate_batchnorm(net, x[torch.randperm(len(x), generator=g)[: setup.bn_calibration_clouds]])
    seconds = time.time() - t0
    src_acc = qs.accuracy(net, data.x_source_test, data.y_source_test, batch=100)
    sd = {k: v.contiguous() for k, v in to_official_state_dict(net).items()}
    atomic_write(path, lambda f: f.write(save(sd)))  # a killed run never leaves a half-written cache entry
    return dict(clouds=len(x), steps=steps, batch=setup.pretrain_batch, seconds=round(seconds, 2),
                objective="supervised classification of the source shapes (not masked autoencoding)",
                source_test_accuracy=round(src_acc, 4))


def cached_pretrain(data: PointData, setup: Setup, arch: dict, cache_dir: str, data_seed: int,
                    use_cache: bool = True, log: Callable[[str], None] = print) -> tuple[str, dict]:
    """The self-pretrained checkpoint for this configuration: from the cache, or trained now and cached.

    The cache key hashes everything that determines the weights (architecture, recipe, data generator and seed).

    Returns:
        The checkpoint path and its summary (with ``cached`` telling whether it was reused).
    """
    key_src = dict(version=CACHE_VERSION, backbone=BACKBONE, arch=arch, shapes=list(SOURCE_SHAPES),
                   data_seed=data_seed, num_points=setup.num_points, source_test=setup.source_test_per_class,
                   recipe={k: v for k, v in asdict(setup).items() if k.startswith(("pretrain", "bn_"))})
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:16]
    folder = os.path.join(cache_dir, "quickstart_points", key)
    path = os.path.join(folder, "self_pretrained_point_mae_official_keys.safetensors")
    meta_path = os.path.join(folder, "meta.json")
    if use_cache and os.path.isfile(path) and os.path.isfile(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        return path, dict(meta["summary"], cached=True)
    log(f"self-pretraining the point transformer on the synthetic {', '.join(SOURCE_SHAPES)} clouds "
        "(supervised); cached for later runs ...")
    summary = pretrain(data, setup, arch, path, log=log)
    atomic_write(meta_path, lambda f: json.dump(dict(key=key_src, summary=summary), f, indent=2), binary=False)
    return path, dict(summary, cached=False)


# -------------------------------------------------------------------------------------------------- methods


def methods() -> list[Method]:
    """The compared methods (learning rates not tuned on this task; see the protocol)."""
    return [
        Method("untrained + linear probe", probe_only=True, untrained=True,
               description="linear probe on a randomly initialised backbone (no pretraining): the baseline"),
        Method("linear probe", probe_only=True, description="linear head only, on the frozen self-pretrained backbone"),
        Method("full fine-tuning", full=True, lr=1e-4, description="every backbone parameter and the head"),
        Method("IDPT", (vpeft.IDPTConfig(head=False),), lr=1e-3,
               description="IDPT defaults (DGCNN prompt generator before the last block), backbone's linear head "
                           "instead of the paper's MLP head (see the protocol)"),
        Method("Point-PEFT", (vpeft.PointPEFTConfig(),), lr=5e-3,
               description="Point-PEFT defaults (16 point-prior prompts, adapter dim 16, k 16, top-k 14); memory bank "
                           "from the K-shot training clouds"),
        Method("VPT-deep (4 tokens)", (vpeft.VPTConfig(num_tokens=4),), lr=1e-2,
               description="4 prompt tokens per block, and the head"),
        Method("LoRA (r=4, q,v)", (vpeft.LoraConfig(r=4, targets=["q", "v"]),), lr=5e-3,
               description="LoRA rank 4 on the q and v slices of qkv"),
        Method("DAPT", (vpeft.DAPTConfig(head=False),), lr=1e-3,
               description="DAPT defaults (dynamic adapter rank 64 beside every MLP, internal prompts, TFTS), "
                           "backbone's linear head instead of the paper's MLP head (see the protocol)"),
    ]


def run_one(method: Method, arch: dict, checkpoint: str, task: Task, k: int, seed: int, setup: Setup,
            eval_features: dict) -> tuple[float, float, int]:
    """Train ``method`` on K shots of ``seed`` and evaluate it: (accuracy, training seconds, trainable parameters).

    ``eval_features`` caches frozen backbones' evaluation features (filled by the linear probes).
    """
    x, y = task.shots(k, seed)
    n_cls = len(task.pool)
    torch.manual_seed(seed)  # the untrained backbone depends on the seed only
    model = load_backbone(arch, None if method.untrained else checkpoint, n_cls)
    torch.manual_seed(1000 * seed + k)
    model.head = nn.Linear(model.head_hidden_size, n_cls)  # the head's init follows (seed, K) for every method alike
    t0 = time.time()
    pm = vpeft.get_peft_model(model, [] if method.full else list(method.configs),
                              trainable_extra=qs._full_extras(model) if method.full else ["head"])
    if any(isinstance(c, vpeft.PointPEFTConfig) for c in method.configs):
        from .methods.point_peft import build_memory_bank

        build_memory_bank(pm, [x])
    qs.linear_probe(pm, x, y, setup.probe_steps)  # LP-FT (see the protocol)
    if method.probe_only:
        seconds = time.time() - t0
        key = f"untrained-{seed}" if method.untrained else "self-pretrained"
        if key not in eval_features:
            eval_features[key] = qs._features(pm, task.x_eval, batch=100)
        with torch.no_grad():
            acc = (pm.base_model.head(eval_features[key]).argmax(-1) == task.y_eval).float().mean().item()
    else:
        pm.train()
        params = [p for p in pm.parameters() if p.requires_grad]
        qs._fit(params, lambda: F.cross_entropy(pm(x), y), setup.steps, method.lr)
        seconds = time.time() - t0
        acc = qs.accuracy(pm, task.x_eval, task.y_eval, batch=100)
    return acc, seconds, pm.num_parameters(True)


# ------------------------------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    """The point quickstart's command-line options (``vpeft quickstart --task points`` passes them through)."""
    p = qs.quickstart_parser(
        "vpeft quickstart --task points", __doc__.split("\n")[0], "out/quickstart_points",
        shots="shots per class (default: 1 2 4 8; --fast: 1 2)",
        fast="tiny network and few clouds (tests; numbers mean nothing)",
        offline="accepted for symmetry with the image quickstart (the synthetic data never needs the network)",
        eval_split="evaluate on the test draw (default), or on validation clouds reserved from the held-out training "
                   "draw (for choosing hyper-parameters)",
        methods="run only methods whose name contains one of these (default: all but full fine-tuning, which runs "
                "only when named, e.g. --methods probe full IDPT)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic data generator (default: 0)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the point-cloud quickstart; see the module docstring.

    Args:
        argv: Command-line arguments (default ``sys.argv[1:]``).

    Returns:
        The exit status (0 on success).
    """
    return qs.run_quickstart(build_parser().parse_args(argv), _run, "matplotlib", hint="pip install 'vpeft[demo]'")


def _run(args: argparse.Namespace) -> int:
    from .datasets.fashion_mnist import default_cache_dir

    t_start = time.time()
    setup = FAST if args.fast else FULL
    seeds = args.seeds if args.seeds is not None else ([0] if args.fast else [0, 1, 2])
    shots = sorted(set(args.shots if args.shots is not None else ([1, 2] if args.fast else [1, 2, 4, 8])))
    if min(shots) < 1:
        raise SystemExit("--shots must be positive")
    if shots[-1] > setup.pool_per_class:
        raise SystemExit(f"--shots {shots[-1]} exceeds the {setup.pool_per_class} clouds per class in the shot pool")
    cache_dir = args.cache_dir or default_cache_dir()
    os.makedirs(args.out, exist_ok=True)
    timings: dict[str, float] = {}

    t = time.time()
    data = make_data(setup, args.data_seed, args.eval_split)
    task = data.task
    timings["data"] = time.time() - t
    print(f"data: {data.source}")
    print(f"  self-pretraining classes: {', '.join(SOURCE_SHAPES)}\n  few-shot (held-out) classes: "
          f"{', '.join(TARGET_SHAPES)}\n  evaluation: {len(task.y_eval)} {args.eval_split} clouds of the held-out "
          "classes")

    t = time.time()
    arch = arch_for(setup)
    ckpt, pre = cached_pretrain(data, setup, arch, cache_dir, args.data_seed, use_cache=not args.no_cache)
    timings["pretrain"] = time.time() - t
    how = "reused from cache" if pre["cached"] else f"trained now in {pre['seconds']:.1f}s"
    print(f"self-pretrained point transformer (Point-MAE architecture, {arch}) {how}: {ckpt}\n  supervised on "
          f"{pre['clouds']:,} synthetic clouds, {pre['steps']} steps; accuracy on the pretraining classes' test "
          f"clouds {pre['source_test_accuracy']:.3f}")

    if args.methods is None:  # full fine-tuning is opt-in: it costs about as much as the four PEFT methods together
        todo = [m for m in methods() if m.name not in OPT_IN]
    else:
        todo = [m for m in methods() if any(s.lower() in m.name.lower() for s in args.methods)]
    if not todo:
        raise SystemExit(f"--methods {args.methods} matches none of {[m.name for m in methods()]}")
    t = time.time()
    eval_features: dict = {}
    rows = qs.transfer(todo, shots, seeds, lambda m, k, s: run_one(m, arch, ckpt, task, k, s, setup, eval_features))
    timings["transfer"] = time.time() - t

    results = dict(
        vpeft_version=vpeft.__version__, task="points", fast=args.fast, seeds=seeds, shots=shots,
        data=dict(name="synthetic-shapes", title="synthetic point-cloud shape", unit="clouds", source=data.source,
                  synthetic=True,
                  data_seed=args.data_seed, source_classes=list(SOURCE_SHAPES), target_classes=list(TARGET_SHAPES),
                  n_target_classes=len(task.pool), eval_split=args.eval_split, n_eval=len(task.y_eval),
                  num_points=setup.num_points),
        backbone=dict(id=BACKBONE, label="small point transformer (Point-MAE architecture)", arch=arch,
                      weights="self-pretrained", checkpoint=ckpt,
                      checkpoint_format="official Point-MAE keys (blocks.blocks.*, cls_head_finetune.*), safetensors",
                      pretraining=pre),
        protocol=dict(steps=setup.steps, probe_steps=setup.probe_steps, optimizer="AdamW, full batch",
                      head="nn.Linear on concat(cls, max-pooled patches)",
                      head_init="linear probe on the method's step-0 features (LP-FT)",
                      std="sample standard deviation over seeds (0 for one seed)"),
        methods=rows, timings={})
    print(f"\nFew-shot accuracy on {len(task.y_eval)} {args.eval_split} clouds of {len(task.pool)} held-out SYNTHETIC "
          f"shape classes (self-pretrained point transformer; mean+-std over seeds {seeds}; s/run = mean training "
          "seconds; >LP = shot counts where the mean beats the linear probe)")
    print(qs.format_table(results))

    t = time.time()
    png = os.path.join(args.out, "accuracy_vs_shots.png")
    qs.plot(results, png)
    timings["plot"] = time.time() - t
    timings["total"] = time.time() - t_start
    results["timings"] = {k: round(v, 2) for k, v in timings.items()}
    results["plot"] = png
    out_json = os.path.join(args.out, "results.json")
    atomic_write(out_json, lambda f: json.dump(results, f, indent=2), binary=False)
    print("\ntimings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
          + f" (torch threads: {torch.get_num_threads()})")
    print(f"results: {os.path.abspath(out_json)}\nplot:    {os.path.abspath(png)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
