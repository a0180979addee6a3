"""SPT: Sensitivity-aware visual Parameter-efficient fine-Tuning (He, Zhang, Zhuang, Jiang and Cai, ICCV 2023,
arXiv:2303.08566).

SPT decides from the downstream data *where* the trainable parameters go, for a given budget of ``tau`` of them:

1. Sensitivity (calibration, :func:`vpeft.calibrate`): the sensitivity of a pretrained weight ``w_n`` is the loss
   reduction from updating it alone. With a first-order Taylor expansion around the frozen model and one gradient
   step ``w_n* = w_n - eps * g_n`` it is ``s_n ~ g_n (w_n - w_n*) = eps * g_n^2``, accumulated over the calibration
   batches: ``s_n = sum_batches g_n^2`` (the reference accumulates ``grad ** 2`` over ``sensitivity_batch_num`` batches;
   ``eps`` is a common factor and drops out of the ranking).
2. Allocation: the ``tau`` most sensitive positions over all candidate weight matrices are selected. A matrix whose
   number of selected positions ``sigma`` reaches the threshold ``r (d_in + d_out) / alpha`` is tuned *structurally*
   with LoRA of rank ``r`` (which costs ``r (d_in + d_out)`` parameters instead of ``sigma``); the other matrices are
   tuned *unstructurally*: a sparse delta ``W + Delta`` at exactly their selected positions.
3. The budget counts LoRA parameters and sparse positions: ``sum_LoRA r (d_in + d_out) + sum_sparse sigma``.

Defaults (paper / reference ``ziplab/SPT``): candidates are the q, k, v (separately), attention output and the two MLP
weight matrices of every block; LoRA rank ``r = 8``; ``alpha = 10``; budget ``400_000`` (0.4M, the middle of the
0.2M-1.0M budgets the reference scripts sweep for ViT-B/16); LoRA init as loralib (Kaiming-uniform ``A``, zero ``B``)
with scaling 1; sparse deltas start at zero, so training starts from the pretrained function.

Trainable parameters: exactly ``budget`` (plus ``trainable_extra`` such as the head, counted separately). On
ViT-B/16 with the default budget: 400,000. For reference, one structured q slice costs ``8 * (768 + 768) = 12,288``
and becomes structured from ``1,229`` selected positions on.

Storage: sparse deltas are saved sparsely, per adapted module: ``sparse_index`` (int64 flat positions in the
module's weight, a persistent buffer) and ``sparse_value`` (the trained values), both of length ``sigma``; never a
dense matrix. ``vpeft_config.json`` records the selection (which slices get LoRA, how many sparse positions each other
slice has), so the adapter reloads onto a fresh backbone without data.

Merging adds the LoRA products and the sparse deltas into the weights; the original values at the sparse positions
are kept, so ``unmerge`` restores them exactly (the LoRA part is subtracted, as LoRA does).

Deviations from the reference implementation (ziplab/SPT):
    * Exact budget: the reference sweeps ``tau`` in 0.02M steps and keeps the configuration whose total is closest to
      each target budget. vpeft walks the positions in decreasing sensitivity (each one costs 1, or nothing in a
      matrix that is LoRA already) and stops when the budget is spent; when a matrix reaches the threshold but its
      LoRA would overshoot what is left of the budget, it stays sparse (its position is taken as a sparse one, and it
      turns into LoRA later if that becomes affordable). The total therefore equals ``budget`` exactly, and a matrix
      can keep more sparse positions than the threshold only at the budget's edge.
    * Only weight matrices are candidates; the reference can also tune bias / LayerNorm vectors ("structured
      vector" trick, ``beta``) and fully tunes the class token; train those through ``trainable_extra`` if wanted.
    * The sensitivity pass runs in eval mode (no dropout / drop-path noise); the reference runs it in train mode.
    * The structured variant is LoRA only (the paper also offers an Adapter variant).
    * Works on timm ViTs and both open_clip towers (q/k/v slices of the packed ``in_proj_weight``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Union

import torch
import torch.nn as nn

from ._calibration import attach_tensors, calibration_tensors, unresolved_error
from ._lowrank import add_into_slices, site_weight, slices_of
from .base import Adapter, Method, PeftConfig, register_method
from .lora import init_lora_a

if TYPE_CHECKING:  # pragma: no cover
    from .layers import AdapterLayer


def matrix_key(path: str, slice_name: str) -> str:
    """Selection key of one weight matrix: the module path and the slice (``"w"`` for a whole weight)."""
    return f"{path}:{slice_name}"


@dataclass
class SPTConfig(PeftConfig):
    """SPT configuration.

    Attributes:
        budget: Trainable-parameter budget ``tau`` (int), or a float in (0, 1): that fraction of all candidate weights
            (a vpeft convenience; the paper states budgets in parameters). Paper / reference: 0.4M for ViT-B/16.
        r: LoRA rank of structurally tuned matrices (paper / reference: 8).
        alpha: Structured-tuning threshold factor: a matrix with at least ``r (d_in + d_out) / alpha`` selected
            positions gets LoRA (paper / reference: 10).
        lora_alpha: LoRA scale numerator (scaling ``lora_alpha / r``); ``None`` means scaling 1.
        init_a: ``"kaiming"`` (loralib) or ``"gaussian"`` initialisation of the LoRA down-projections.
        selection: The resolved placement ``{"budget": int, "lora": [keys], "sparse": {key: count}}`` with keys
            ``"<module path>:<slice>"``; ``None`` until :func:`vpeft.calibrate` sets it.
        targets: Candidate sites among ``q, k, v, qkv, attn_out, mlp_in, mlp_out`` (default: q, k, v, attn_out,
            mlp_in, mlp_out).
    """

    budget: Union[int, float] = 400_000
    r: int = 8
    alpha: float = 10.0
    lora_alpha: Optional[float] = None
    init_a: str = "kaiming"
    selection: Optional[dict] = None

    @property
    def scaling(self) -> float:
        """LoRA scaling ``lora_alpha / r`` (1 when ``lora_alpha`` is None)."""
        return 1.0 if self.lora_alpha is None else self.lora_alpha / self.r

    def needs_calibration(self) -> bool:
        """``True`` while :attr:`selection` is unresolved."""
        return self.selection is None

    def validate(self) -> None:  # noqa: D102
        super().validate()
        name = type(self).__name__
        b = self.budget
        if isinstance(b, bool) or not isinstance(b, (int, float)) or (isinstance(b, int) and b < 1) or \
                (isinstance(b, float) and not 0.0 < b < 1.0):
            raise ValueError(f"{name}.budget must be a positive int (trainable parameters) or a float in (0, 1) "
                             f"(a fraction of the candidate weights), got {b!r}")
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"{name}.r must be a positive int, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha >= 1:
            raise ValueError(f"{name}.alpha must be a number >= 1 (the LoRA cost over the threshold), got "
                             f"{self.alpha!r}")
        if self.lora_alpha is not None and (isinstance(self.lora_alpha, bool)
                                            or not isinstance(self.lora_alpha, (int, float))):
            raise TypeError(f"{name}.lora_alpha must be a number or None, got {self.lora_alpha!r}")
        if self.init_a not in ("kaiming", "gaussian"):
            raise ValueError(f"{name}.init_a must be 'kaiming' or 'gaussian', got {self.init_a!r}")
        sel = self.selection
        if sel is not None:
            ok = (isinstance(sel, dict) and isinstance(sel.get("lora", []), list)
                  and isinstance(sel.get("sparse", {}), dict)
                  and all(isinstance(k, str) for k in sel.get("lora", []))
                  and all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v > 0
                          for k, v in sel.get("sparse", {}).items()))
            if not ok or not (sel.get("lora") or sel.get("sparse")):
                raise ValueError(f"{name}.selection must be None or a dict with 'lora' (list of '<path>:<slice>' keys) "
                                 "and 'sparse' ({key: positive count}) selecting at least one matrix (what "
                                 f"vpeft.calibrate writes), got {sel!r}")


class SPTAdapter(Adapter):
    """Per module: LoRA factors ``lora_A.<slice>`` / ``lora_B.<slice>`` on structurally tuned slices, and one sparse
    delta over the unstructured slices: ``sparse_index`` (int64 flat positions in the module weight, persistent
    buffer) with ``sparse_value`` (trainable)."""

    mergeable = True

    def __init__(self, site, module: nn.Module, slices: dict[str, tuple[int, int]], lora: list[str],
                 sparse_index: Optional[torch.Tensor], cfg: SPTConfig) -> None:
        super().__init__(site)
        w, _ = site_weight(module)
        kw = dict(device=w.device, dtype=w.dtype)
        self.in_features = w.shape[1]
        self.out_features = w.shape[0]
        self.scaling = cfg.scaling
        self.lora_slices = {n: slices[n] for n in lora}
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for n, (a, b) in self.lora_slices.items():
            A = torch.empty(cfg.r, self.in_features, **kw)
            init_lora_a(A, cfg.init_a, cfg.r)
            self.lora_A[n] = nn.Parameter(A)
            self.lora_B[n] = nn.Parameter(torch.zeros(b - a, cfg.r, **kw))
        self.sparse_value = None
        if sparse_index is not None and sparse_index.numel():
            self.register_buffer("sparse_index", sparse_index.to(device=w.device, dtype=torch.long).clone())
            self.sparse_value = nn.Parameter(torch.zeros(sparse_index.numel(), **kw))
        self._merged_sparse: Optional[torch.Tensor] = None

    def num_trainable(self) -> int:
        """LoRA parameters plus sparse positions."""
        return sum(p.numel() for p in self.parameters())

    def dense_sparse_delta(self) -> torch.Tensor:
        """The sparse delta as a dense (out, in) matrix (differentiable in ``sparse_value``)."""
        flat = torch.zeros(self.out_features * self.in_features, device=self.sparse_value.device,
                           dtype=self.sparse_value.dtype)
        return flat.index_add(0, self.sparse_index, self.sparse_value).view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.lora_slices:
            deltas = {n: (x @ self.lora_A[n].t()) @ self.lora_B[n].t() * self.scaling for n in self.lora_slices}
            y = add_into_slices(y, self.lora_slices, deltas)
        if self.sparse_value is not None:
            y = y + x @ self.dense_sparse_delta().t().to(x.dtype)
        return y

    def extra_repr(self) -> str:
        n = 0 if self.sparse_value is None else self.sparse_value.numel()
        return f"site={self.site.qualified!r}, lora={list(self.lora_slices)}, sparse={n}"

    @torch.no_grad()
    def merge(self, layer: AdapterLayer) -> None:  # noqa: D102
        w, _ = site_weight(layer)
        if self.sparse_value is not None:
            flat = w.data.view(-1)
            self._merged_sparse = flat[self.sparse_index].clone()  # originals, for an exact unmerge
            flat.index_add_(0, self.sparse_index, self.sparse_value.to(w.dtype))
        for n, (a, b) in self.lora_slices.items():
            w.data[a:b] += ((self.lora_B[n] @ self.lora_A[n]) * self.scaling).to(w.dtype)

    @torch.no_grad()
    def unmerge(self, layer: AdapterLayer) -> None:  # noqa: D102
        w, _ = site_weight(layer)
        for n, (a, b) in self.lora_slices.items():
            w.data[a:b] -= ((self.lora_B[n] @ self.lora_A[n]) * self.scaling).to(w.dtype)
        if self.sparse_value is not None:
            w.data.view(-1)[self.sparse_index] = self._merged_sparse
            self._merged_sparse = None


@register_method
class SPT(Method):
    """SPT: sensitivity-driven LoRA / sparse-delta allocation under a parameter budget."""

    name = "spt"
    config_class = SPTConfig
    site_kinds = ("linear", "packed_attn")
    mergeable = True
    default_targets = ("q", "k", "v", "attn_out", "mlp_in", "mlp_out")
    calibration_statistic = "grad_sq"

    # -- candidates ------------------------------------------------------------------------------------------------
    def candidate_sites(self, model: nn.Module, spec) -> list:
        """All candidate sites (the config's targets), checked, before the selection filters them."""
        return super().resolve(model, spec)

    def candidate_matrices(self, model: nn.Module, spec) -> dict[str, tuple[torch.Tensor, tuple[int, int]]]:
        """Selection key -> (module weight, (row start, row stop)) for every candidate matrix, in model order."""
        out = {}
        for group in self.group_sites(self.candidate_sites(model, spec)):
            w, _ = site_weight(model.get_submodule(group[0].path))
            for n, rows in slices_of(group, w.shape[0]).items():
                out[matrix_key(group[0].path, n)] = (w, rows)
        return out

    def resolve(self, model, spec):  # noqa: D102
        if self.config.needs_calibration():
            raise unresolved_error(self.config)
        sel = self.config.selection
        chosen = set(sel.get("lora", [])) | set(sel.get("sparse", {}))
        both = sorted(set(sel.get("lora", [])) & set(sel.get("sparse", {})))
        if both:
            raise ValueError(f"SPTConfig.selection lists {both[:4]} both as LoRA and as sparse matrices")
        cands = self.candidate_matrices(model, spec)
        missing = sorted(chosen - set(cands))
        if missing:
            raise ValueError(f"SPTConfig.selection names matrices {missing[:4]} that are not among this model's "
                             f"candidates for targets {self.targets(spec)} (e.g. {list(cands)[:3]}); the selection was "
                             "calibrated on another backbone or with other targets")
        for key, count in sel.get("sparse", {}).items():
            _, (a, b) = cands[key]
            numel = (b - a) * cands[key][0].shape[1]
            if count > numel:
                raise ValueError(f"SPTConfig.selection: {count} sparse positions for {key!r}, which has {numel} "
                                 "weights")
        for key in sel.get("lora", []):
            w, (a, b) = cands[key]
            if self.config.r > min(b - a, w.shape[1]):
                raise ValueError(f"SPTConfig: rank r={self.config.r} is larger than the matrix {key!r} "
                                 f"({b - a} x {w.shape[1]})")
        tensors = calibration_tensors(self.config)
        for key in sel.get("sparse", {}):
            t = tensors.get(f"sparse_index:{key}")
            if t is not None and t.numel() != sel["sparse"][key]:
                raise ValueError(f"SPTConfig: calibration indices for {key!r} hold {t.numel()} positions, the "
                                 f"selection records {sel['sparse'][key]}")
        sites = self.candidate_sites(model, spec)
        return [s for s in sites if any(matrix_key(s.path, n) in chosen for n in _slice_names(s))]

    # -- calibration -----------------------------------------------------------------------------------------------
    def calibration_weights(self, model, spec):  # noqa: D102
        return self.candidate_matrices(model, spec)

    def resolve_calibration(self, model, spec, stats: dict[str, torch.Tensor]) -> SPTConfig:
        """Allocate the budget over the most sensitive positions (see the module docstring)."""
        keys = list(stats)
        sizes = [stats[k].numel() for k in keys]
        total = sum(sizes)
        budget = self.config.budget
        if isinstance(budget, float):
            budget = max(1, int(round(budget * total)))
        if budget > total:
            raise ValueError(f"SPTConfig.budget={budget} is more than the {total} candidate weights of targets "
                             f"{self.targets(spec)}; lower it or add targets")
        r, alpha = self.config.r, float(self.config.alpha)
        shapes = [tuple(stats[k].shape) for k in keys]
        lora_cost = [r * (h + w) for h, w in shapes]
        thresh = [c / alpha for c in lora_cost]
        can_lora = [r <= min(h, w) for h, w in shapes]

        flat = torch.cat([stats[k].flatten().cpu() for k in keys])
        order = torch.argsort(flat, descending=True, stable=True)  # ties: model order, then row-major
        del flat
        offsets = [0]
        for s in sizes:
            offsets.append(offsets[-1] + s)
        bounds = torch.tensor(offsets[1:])

        count = [0] * len(keys)
        lora = [False] * len(keys)
        picked: list[list[int]] = [[] for _ in keys]
        spent = 0
        for pos, m in _ranked(order, bounds):
            if spent == budget:
                break
            if lora[m]:
                continue  # the matrix is tuned by LoRA already: the position costs nothing more
            if can_lora[m] and count[m] + 1 >= thresh[m]:
                cost = lora_cost[m] - count[m]  # LoRA replaces the matrix's sparse positions
                if spent + cost <= budget:
                    lora[m] = True
                    spent += cost
                    picked[m] = []
                    count[m] = 0
                    continue
                # LoRA would overshoot the budget: the position stays a sparse one (exact budget, module docstring)
            spent += 1
            count[m] += 1
            picked[m].append(pos - offsets[m])
        if spent != budget:
            raise ValueError(f"SPTConfig.budget={budget} cannot be spent exactly on targets {self.targets(spec)}: the "
                             f"allocation reaches {spent} parameters (matrices turn into LoRA of rank {r}, which is "
                             "cheaper than their positions); lower the budget or raise alpha")
        selection = {"budget": budget, "lora": [k for k, lo in zip(keys, lora) if lo],
                     "sparse": {k: len(p) for k, p, lo in zip(keys, picked, lora) if p and not lo}}
        tensors = {f"sparse_index:{k}": torch.tensor(sorted(p), dtype=torch.long)
                   for k, p, lo in zip(keys, picked, lora) if p and not lo}
        return attach_tensors(dataclasses.replace(self.config, selection=selection), tensors)

    # -- building --------------------------------------------------------------------------------------------------
    def make_adapter(self, model, spec, sites, module, shared):  # noqa: D102
        sel = self.config.selection
        w, _ = site_weight(module)
        slices = slices_of(sites, w.shape[0])
        path = sites[0].path
        lora = [n for n in slices if matrix_key(path, n) in set(sel.get("lora", []))]
        tensors = calibration_tensors(self.config)
        parts = []
        for n, (a, _b) in slices.items():
            key = matrix_key(path, n)
            if key not in sel.get("sparse", {}):
                continue
            idx = tensors.get(f"sparse_index:{key}")
            if idx is None:
                # Rebuilt from a saved config: placeholder positions of the recorded size (distinct, so that merging
                # stays well defined); load_adapter fills the real ones from the adapter file.
                idx = torch.arange(sel["sparse"][key], dtype=torch.long)
            parts.append(idx.to(torch.long) + a * w.shape[1])  # slice-local row-major -> module-flat positions
        index = torch.cat(parts) if parts else None
        return SPTAdapter(sites[0], module, slices, lora, index, self.config)


def _ranked(order: torch.Tensor, bounds: torch.Tensor, chunk: int = 1 << 16):
    """(flat position, matrix index) in ranking order, converted to Python ints a chunk at a time (a ViT-B has 85M
    candidates; the walk stops long before the end)."""
    for part in order.split(chunk):
        owners = torch.searchsorted(bounds, part, right=True).tolist()
        yield from zip(part.tolist(), owners)


def _slice_names(site) -> list[str]:
    return ["w"] if site.out_slice is None else [site.name]


def trainable_count(pm, key: str = "spt") -> int:
    """Trainable parameters of the SPT adapters under method key ``key`` (LoRA parameters + sparse positions)."""
    return sum(a.num_trainable() for layer in pm.adapter_layers().values() for k, a in layer.adapters() if k == key)


__all__ = ["SPT", "SPTAdapter", "SPTConfig", "matrix_key", "trainable_count"]
