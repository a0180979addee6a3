"""NOLA: Compressing LoRA using Linear Combination of Random Basis (Koohpayegani, Navaneet, Nooralinejad, Kolouri and
Pirsiavash, ICLR 2024, arXiv:2310.02556).

LoRA's update ``delta W = s B A`` keeps its low-rank form, but its factors are not free matrices: each is a linear
combination of fixed random basis matrices,

    A = sum_{i=1..k} alpha_i A_i        (A_i: r x in)
    B = sum_{j=1..l} beta_j  B_j        (B_j: out x r)
    W x + s B A x,                      s = alpha_scale / r,

and only the ``k + l`` coefficients per adapted matrix are trained. The bases come from a pseudo-random generator and
a seed, so an adapter is stored as its coefficients and that seed: the number of trainable (and stored) values is
decoupled from both the rank and the layer shape. Since ``B A`` is a plain matrix, NOLA merges into ``W`` exactly
like LoRA, and it runs on the same sites: q/k/v slices of timm's fused ``qkv`` and open_clip's packed
``in_proj_weight``, ``attn_out``, ``mlp_in`` and ``mlp_out``.

Bases. They are regenerated, never stored: each basis tensor is drawn on the CPU by a dedicated ``torch.Generator``
whose seed is derived (SHA-256) from the adapter seed and the tensor's role and shape, then moved to the weight's
device and dtype -- the same values on every device and whatever the global RNG state. ``A_i`` entries are uniform
in ``[-1/sqrt(in), 1/sqrt(in)]`` (loralib's Kaiming-uniform bound for ``A``) and ``B_j`` entries uniform in
``[-1/sqrt(r), 1/sqrt(r)]``. One basis set exists per distinct shape and is shared by every adapted matrix of that
shape (the A bases by input width, the B bases by output width), as in the authors' ViT code, where every layer
re-seeds its generator identically; this keeps basis memory at a few shapes' worth instead of one per layer. The
bases are non-persistent buffers of the method's shared module; the seed is its persistent int64 buffer
``_shared.nola.seed``, so an adapter file holds exactly ``nola_alpha`` / ``nola_beta`` per adapted matrix plus that
one seed. Loading a file regenerates the bases from the seed it holds (they are rebuilt lazily whenever the seed
tensor is written).

Paper defaults for ViTs (the authors' ViT code, NOLA on the MLP layers: ``train_type=nola_mlp``): targets
``mlp_in`` and ``mlp_out``; ``k = l = 1024`` bases; rank 4 (the ViT trainer's default ``--rank``; the released
ViT-L few-shot script passes rank 1 -- the trainable count does not depend on it); scale
``1 / r`` (``alpha_scale = 1``); no dropout. Coefficients: ``beta = 0`` so training starts from the pretrained
function, ``alpha ~ N(0, 1/k)`` so that ``A`` has the spread of a single basis matrix. (The language-model runs use
q and v, rank 8 and 1024 bases; pass ``targets=["q", "v"], r=8`` for that variant.)

Trainable parameters: ``k + l`` per adapted matrix (slice), independent of rank and shape. NOLA on mlp_in and
mlp_out of ViT-B/16: ``12 * 2 * (1024 + 1024) = 49,152`` (LoRA r=1 on the same layers: 92,160). Fixed, unsaved basis
buffers for ViT-B/16 at r=4: the A bases for widths 768 and 3072 and the B bases for widths 3072 and 768, i.e.
``1024 * 4 * (768 + 3072) * 2 = 31.5M`` values (126 MB in fp32), whatever the depth.

Deviations from the reference implementation (UCDvision/NOLA):
    * Only the paper's abstract and method summary could be consulted here; the ViT defaults (MLP layers, 1024
      bases, rank, scale ``1/r``) are read from the authors' ViT code (``vit/train_timm.py``, ``vit/run.sh``).
    * Bases are shared per width, not per full shape: q (768 -> 768) and fc1 (768 -> 3072) of ViT-B use the same
      A bases (they read the same input width), each with its own coefficients.
    * The reference ViT code initialises both coefficient vectors to ``1/k`` (a small non-zero update at step 0)
      and its bases Kaiming-uniform over the stacked basis tensor; here ``beta = 0`` (the model starts exactly at
      the backbone, as LoRA does) and each basis matrix gets LoRA's per-matrix bound.
    * Bases are generated from a per-shape seed derived from one adapter seed (``seed``, default 0) by a CPU
      generator instead of re-seeding the global RNG; the values differ from the reference's, the scheme (one
      shared basis set per shape, regenerated from a stored seed) is the same.
    * Bases are kept in memory (the paper notes they can instead be regenerated on the fly in forward and
      backward to save memory; vpeft does not do this).
    * Merging is explicit (``PeftModel.merge``), as for LoRA.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from ._lowrank import SliceDeltaAdapter, WeightDeltaMethod, site_weight
from .base import PeftConfig, register_method

_MAX_SEED = 2 ** 63 - 1


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class NOLAConfig(PeftConfig):
    """NOLA configuration.

    Attributes:
        r: Rank of ``delta W = s B A`` (the bases' inner dimension).
        num_basis_a: Number ``k`` of random bases (and trained coefficients ``alpha``) for ``A``.
        num_basis_b: Number ``l`` of random bases (and trained coefficients ``beta``) for ``B``.
        alpha: Scale numerator; the update is multiplied by ``alpha / r`` (the reference's ``1 / r`` at 1.0). Not
            the coefficients (those are the adapter's ``nola_alpha`` / ``nola_beta``).
        dropout: Dropout on the branch input.
        seed: Seed of the random bases (stored in adapter files; the bases are regenerated from it).
        targets: Sites among ``q, k, v, qkv, attn_out, mlp_in, mlp_out`` (default ``["mlp_in", "mlp_out"]``).
    """

    r: int = 4
    num_basis_a: int = 1024
    num_basis_b: int = 1024
    alpha: float = 1.0
    dropout: float = 0.0
    seed: int = 0

    @property
    def scaling(self) -> float:
        """``alpha / r``."""
        return self.alpha / self.r

    def validate(self) -> None:  # noqa: D102
        super().validate()
        name = type(self).__name__
        for fname in ("r", "num_basis_a", "num_basis_b"):
            v = getattr(self, fname)
            if not _is_int(v) or v < 1:
                raise ValueError(f"{name}.{fname} must be a positive int, got {v!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise TypeError(f"{name}.alpha must be a number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1:
            raise ValueError(f"{name}.dropout must be in [0, 1), got {self.dropout!r}")
        if not _is_int(self.seed) or not 0 <= self.seed <= _MAX_SEED:
            raise ValueError(f"{name}.seed must be an int in [0, 2**63 - 1], got {self.seed!r}")


def basis_seed(seed: int, role: str, count: int, rows: int, cols: int) -> int:
    """The generator seed of one basis tensor, derived from the adapter seed, its role and its shape."""
    digest = hashlib.sha256(f"vpeft.nola/{seed}/{role}/{count}x{rows}x{cols}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & _MAX_SEED


def generate_bases(seed: int, role: str, count: int, rows: int, cols: int, bound: float) -> torch.Tensor:
    """``count`` matrices (rows x cols) uniform in ``[-bound, bound)``, float32 on the CPU, from a dedicated generator
    (deterministic: independent of device and of the global RNG state)."""
    g = torch.Generator(device="cpu").manual_seed(basis_seed(seed, role, count, rows, cols))
    return (torch.rand(count, rows, cols, generator=g, dtype=torch.float32) * 2.0 - 1.0) * bound


class NOLABases(nn.Module):
    """The random bases of one NOLA method, shared by its adapters.

    ``seed`` (int64, shape (1,)) is the only persistent tensor. Non-persistent buffers ``basis_a_<in>`` (k, r, in)
    and ``basis_b_<out>`` (l, out, r) hold one basis set per input / output width; they follow ``.to()`` and are
    regenerated from ``seed`` whenever the seed tensor is written (e.g. by loading an adapter file).
    """

    def __init__(self, seed: int, r: int, ka: int, kb: int, in_widths, out_widths, like: torch.Tensor) -> None:
        super().__init__()
        self.r, self.ka, self.kb = r, ka, kb
        self.in_widths, self.out_widths = sorted(set(in_widths)), sorted(set(out_widths))
        self.register_buffer("seed", torch.tensor([seed], dtype=torch.int64, device=like.device))
        self._generate(seed, like.device, like.dtype)

    def _generate(self, seed: int, device, dtype) -> None:
        r = self.r
        meta = torch.device(device).type == "meta"  # shapes only (parameter / FLOP counting): draw nothing

        def make(role: str, count: int, rows: int, cols: int, bound: float) -> torch.Tensor:
            if meta:
                return torch.empty(count, rows, cols, device="meta", dtype=dtype)
            return generate_bases(seed, role, count, rows, cols, bound).to(device=device, dtype=dtype)

        for w in self.in_widths:
            self.register_buffer(f"basis_a_{w}", make("A", self.ka, r, w, 1.0 / math.sqrt(w)), persistent=False)
        for w in self.out_widths:
            self.register_buffer(f"basis_b_{w}", make("B", self.kb, w, r, 1.0 / math.sqrt(r)), persistent=False)
        self.__dict__["_seed_value"] = seed
        self.__dict__["_seen"] = self._seed_state()

    def _seed_state(self):
        try:
            return id(self.seed), self.seed._version
        except RuntimeError:  # inference-mode tensors keep no version counter: read the value every time
            return None

    def sync(self) -> None:
        """Regenerate the bases if the seed tensor changed since they were built (one host read, only then)."""
        state = self._seed_state()
        if (state is not None and state == self.__dict__.get("_seen")) or self.seed.is_meta:
            return
        value = int(self.seed.reshape(-1)[0])
        if value != self.__dict__["_seed_value"]:
            ref = getattr(self, f"basis_a_{self.in_widths[0]}")
            self._generate(value, ref.device, ref.dtype)
        self.__dict__["_seen"] = state

    def basis_a(self, in_features: int) -> torch.Tensor:
        """The A bases (k, r, in) for input width ``in_features``."""
        self.sync()
        return getattr(self, f"basis_a_{in_features}")

    def basis_b(self, out_features: int) -> torch.Tensor:
        """The B bases (l, out, r) for output width ``out_features``."""
        self.sync()
        return getattr(self, f"basis_b_{out_features}")

    def extra_repr(self) -> str:
        return (f"r={self.r}, num_basis_a={self.ka}, num_basis_b={self.kb}, in_widths={self.in_widths}, "
                f"out_widths={self.out_widths}")


class NOLAAdapter(SliceDeltaAdapter):
    """Coefficients per output slice: ``nola_alpha.<slice>`` (k,) and ``nola_beta.<slice>`` (l,); the factors are
    their combinations of the shared bases."""

    def __init__(self, site, slices, in_features: int, cfg: NOLAConfig, like: torch.Tensor) -> None:
        super().__init__(site, slices, cfg.scaling, cfg.dropout)
        self.in_features = in_features
        kw = dict(device=like.device, dtype=like.dtype)
        self.nola_alpha = nn.ParameterDict()
        self.nola_beta = nn.ParameterDict()
        for name in slices:
            # N(0, 1/k): A = sum_i alpha_i A_i then has about the spread of one basis matrix (Kaiming-like).
            self.nola_alpha[name] = nn.Parameter(torch.randn(cfg.num_basis_a, **kw) / math.sqrt(cfg.num_basis_a))
            self.nola_beta[name] = nn.Parameter(torch.zeros(cfg.num_basis_b, **kw))  # delta W = 0 at step 0

    def factors(self):  # noqa: D102
        bases: Optional[NOLABases] = self.shared
        if bases is None:
            raise RuntimeError("this NOLA adapter has no bases (build it with vpeft.get_peft_model)")
        basis_a = bases.basis_a(self.in_features)
        out = {}
        for n, (lo, hi) in self.slices.items():
            basis_b = bases.basis_b(hi - lo)
            a = (self.nola_alpha[n] @ basis_a.flatten(1)).view(basis_a.shape[1:])
            b = (self.nola_beta[n] @ basis_b.flatten(1)).view(basis_b.shape[1:])
            out[n] = (a, b)
        return out


@register_method
class NOLA(WeightDeltaMethod):
    """NOLA on Linear sites and q/k/v slices of fused or packed projections."""

    name = "nola"
    config_class = NOLAConfig
    default_targets = ("mlp_in", "mlp_out")

    def build_shared(self, model, spec, sites):  # noqa: D102
        cfg: NOLAConfig = self.config
        ins, outs, like = set(), set(), None
        for s in sites:
            w, _ = site_weight(model.get_submodule(s.path))
            like = w if like is None else like
            ins.add(w.shape[1])
            outs.add(w.shape[0] if s.out_slice is None else s.out_slice[1] - s.out_slice[0])
        return NOLABases(cfg.seed, cfg.r, cfg.num_basis_a, cfg.num_basis_b, ins, outs, like)

    def make_adapter(self, model, spec, sites, module, shared):  # noqa: D102
        slices, in_f = self.check_rank(sites, module, self.config.r)
        return NOLAAdapter(sites[0], slices, in_f, self.config, site_weight(module)[0])
