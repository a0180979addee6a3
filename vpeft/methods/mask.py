"""Regularized Mask Tuning (R-AMT): Zheng, Wu, Feng, Zhu, Liu, Zhao, Zha, Chen and Shen, "Regularized Mask Tuning:
Uncovering Hidden Knowledge in Pre-trained Vision-Language Models", ICCV 2023, arXiv:2307.15049.

The pretrained weights stay frozen; each selected weight matrix ``W`` gets a real-valued score tensor ``S`` of the
same shape and the forward uses the binary mask ``M = 1[S > threshold]``::

    y = x (W * M)^T + b

The threshold is not differentiable; ``S`` gets the straight-through gradient (``dM/dS := 1``). The mask runs inside
the GEMM tiles through ``vpeft.kernels.masked_linear`` (Triton) or its reference ``reference_masked_linear``
(``vpeft.kernels.use_kernels``), never as a masked copy of ``W`` on the Triton path.

Where (calibration, :func:`vpeft.calibrate`): R-AMT first identifies the parameters important to the downstream
task and masks only those; its final design ("attention mask tuning") masks the multi-head self-attention weights of
the image encoder (the fused q/k/v in-projection and the output projection). vpeft implements the identification as a
gradient pass on a few training batches: the importance of each weight entry is its accumulated gradient magnitude
``sum_batches |dL/dW|`` on the frozen model; an entry is *important* when it is among the ``important_fraction`` most
important entries of all candidate matrices; each candidate matrix is scored by its share of important entries and
the ``select_fraction`` best-scoring matrices are masked. With the paper's default candidates (``qkv`` and
``attn_out``, i.e. the MHSA weights) and ``select_fraction=1.0`` every MHSA weight is masked, which is R-AMT;
with MLP sites among the ``targets`` and ``select_fraction < 1`` the pass chooses between them.

Paper / reference defaults (the official R-AMT code, ``configs/trainers/MASK/vit_b16.yaml`` and ``train.py``):
scores initialised to the constant ``1e-2`` (``MASK.INIT='1s'``, ``MASK.SCALE=1e-2``), threshold ``5e-3``, so every
mask starts at 1 (training starts from the pretrained function); MHSA weights only (``MASK_MLP=False``); gradient
dropout on (``GDR=True``, ``GDR_LAMBDA=1``, KL temperature ``GDR_T=1``); Adam, lr 8e-5.

Gradient-dropout regularisation (the "R" of R-AMT): the task loss (cross-entropy) gradient ``g_a`` of the scores is
kept element-wise with probability ``P = (sign(g_a) * (g_a + g_b) / (|g_a| + |g_b|) + 1) / 2``, where ``g_b`` is the
gradient of a *general-knowledge* loss, the KL divergence between the zero-shot CLIP prediction and the current one:
where the two gradients agree, ``P = 1``; where they conflict, the task update is dropped in proportion to the
conflict. The kept gradient is ``((1 - lambda) + lambda * 1[P > U]) * g_a`` with ``U ~ Uniform(0, 1)``. See
:func:`gradient_dropout_backward` (call it in the training step instead of ``loss.backward()``) and
:func:`general_knowledge_loss`; the caller passes the zero-shot logits, e.g. computed under ``pm.disabled()``.

Trainable parameters: one score per masked weight. All MHSA weights of ViT-B/16:
``12 * (3 * 768 * 768 + 768 * 768) = 28,311,552`` scores (the saved task-specific state is the binary mask, 1 bit per
weight: 3.5 MB); :func:`masked_fraction` reports how many are 0 (the paper: 2.56% on average).

Merging writes ``W * M`` into the backbone and keeps the masked-out values (their positions and original values, not in
the adapter state dict), so ``unmerge`` restores the original weights bit for bit. The adapter must be the first method
on its site: the mask applies to the pretrained weight, not to updates other methods add.

Deviations from the reference implementation (wuw2019/R-AMT):
    * The reference hard-codes the MHSA weights; the importance pass above is vpeft's reading of the paper's parameter
      identification (gradient magnitude on the downstream data), exposed through ``targets``, ``important_fraction``
      and ``select_fraction``. The paper's default placement is reproduced by the defaults.
    * The reference's optional L2 penalty on the scores (``MASK_LOSS``, weight 1e-4 in its ViT-B/16 config) is not
      built in; add ``weight * sum(s.norm() for s in score_tensors(pm))`` to the loss to use it.
    * The reference binarises in float in training and with a bool mask in eval; here both use the float32 comparison
      ``scores > threshold`` of ``vpeft.kernels.masked_linear`` (identical masks).
    * Works on timm ViTs and both open_clip towers (the packed ``in_proj_weight`` and ``out_proj``); the paper uses the
      CLIP image encoder.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._calibration import unresolved_error
from ._lowrank import site_weight
from .base import Adapter, Method, PeftConfig, register_method

if TYPE_CHECKING:  # pragma: no cover
    from .layers import AdapterLayer


class _STEMask(torch.autograd.Function):
    """``1[scores > threshold]`` (float32 comparison, as the kernel), identity gradient to the scores."""

    @staticmethod
    def forward(ctx, scores, threshold):  # noqa: D102
        return (scores.float() > threshold).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad, None


def _thr32(threshold: float) -> float:
    return float(torch.tensor(float(threshold), dtype=torch.float32))


@dataclass
class MaskTuningConfig(PeftConfig):
    """R-AMT configuration.

    Attributes:
        init: Initial value of every score (paper / reference: ``1e-2``).
        threshold: Mask threshold; ``M = 1[scores > threshold]`` (paper / reference: ``5e-3``).
        important_fraction: Calibration: share of all candidate weight entries counted as important (by accumulated
            gradient magnitude) when scoring the matrices.
        select_fraction: Calibration: share of the candidate matrices (best scores first) that get a mask; ``1.0``
            masks every candidate (the paper's attention mask tuning with the default targets).
        selection: The resolved placement, ``{"matrices": [module paths], "scores": {path: share of important
            entries}}``; ``None`` until :func:`vpeft.calibrate` sets it (or pass one explicitly).
        targets: Candidate sites among ``qkv, attn_out, mlp_in, mlp_out`` (whole weight matrices; default: the MHSA
            weights ``qkv`` and ``attn_out``).
    """

    init: float = 1e-2
    threshold: float = 5e-3
    important_fraction: float = 0.01
    select_fraction: float = 1.0
    selection: Optional[dict] = None

    def needs_calibration(self) -> bool:
        """``True`` while :attr:`selection` is unresolved."""
        return self.selection is None

    def validate(self) -> None:  # noqa: D102
        super().validate()
        name = type(self).__name__
        for f in ("init", "threshold"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name}.{f} must be a finite number, got {v!r}")
        for f in ("important_fraction", "select_fraction"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v <= 1.0:
                raise ValueError(f"{name}.{f} must be a number in (0, 1], got {v!r}")
        if self.selection is not None:
            sel = self.selection
            if (not isinstance(sel, dict) or not isinstance(sel.get("matrices"), list) or not sel["matrices"]
                    or not all(isinstance(p, str) for p in sel["matrices"])):
                raise ValueError(f"{name}.selection must be None or a dict with a non-empty list of module paths under "
                                 f"'matrices' (what vpeft.calibrate writes), got {sel!r}")


class MaskAdapter(Adapter):
    """Scores ``scores`` (the shape of the site's weight); forward ``x (W * 1[scores > threshold])^T + b``."""

    mergeable = True
    must_be_first = True

    def __init__(self, site, module: nn.Module, cfg: MaskTuningConfig) -> None:
        super().__init__(site)
        w, _ = site_weight(module)
        self.threshold = _thr32(cfg.threshold)
        self.scores = nn.Parameter(torch.full(w.shape, float(cfg.init), device=w.device, dtype=w.dtype))
        self._merged: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def mask(self) -> torch.Tensor:
        """The current binary mask (no gradient)."""
        return self.scores.detach().float() > self.threshold

    def masked_fraction(self) -> float:
        """Share of this weight's entries whose mask is 0."""
        return float((~self.mask()).float().mean())

    def num_masked(self) -> int:
        """Number of entries whose mask is 0."""
        return int((~self.mask()).sum())

    def kernel_unsupported(self, x: torch.Tensor, base: nn.Module) -> Optional[str]:
        """Why the masked-linear op cannot take this call, or ``None``."""
        if not isinstance(base, nn.Linear) and not isinstance(getattr(base, "in_proj_weight", None), torch.Tensor):
            return f"the site's module is a {type(base).__name__}, not a Linear or packed attention"
        w, b = site_weight(base)
        if x.dtype != w.dtype or (b is not None and b.dtype != w.dtype):
            return f"the input dtype {x.dtype} differs from the weight's {w.dtype}"
        return None

    def fused_forward(self, x: torch.Tensor, base: nn.Module) -> Optional[torch.Tensor]:
        """``x (W * M)^T + b`` in one op: the Triton ``masked_linear`` kernel or its torch reference, as the kernel
        dispatch chooses (the frozen matmul with the unmasked ``W`` is never run). ``None`` when the op cannot take the
        call (dtype mismatch under autocast...): then :meth:`forward` corrects the base output."""
        from ..kernels._dispatch import choose

        why = self.kernel_unsupported(x, base)
        w, b = site_weight(base)
        backend = choose("masked_linear", (x, w, self.scores, b) if why is None else (x,), unsupported=why)
        self.__dict__["kernel_backend"] = backend
        if why is not None:
            return None
        from ..kernels.masked import masked_linear, reference_masked_linear

        if backend == "triton":
            return masked_linear(x, w, self.scores, self.threshold, b)
        return reference_masked_linear(x, w, self.scores, self.threshold, b)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y - x (W * (1 - M))^T``: removes the masked-out weights' contribution from the base output ``y``
        (exact in real arithmetic; used when the fused op cannot run)."""
        w, _ = site_weight(self._layer_module())
        m = _STEMask.apply(self.scores, self.threshold).to(w.dtype)
        return y - F.linear(x.to(w.dtype), w * (1 - m)).to(y.dtype)

    def _layer_module(self) -> nn.Module:
        return self.__dict__["_module"]

    def extra_repr(self) -> str:
        backend = self.__dict__.get("kernel_backend")
        return (f"site={self.site.qualified!r}, threshold={self.threshold:g}"
                + (f", kernel={backend}" if backend else ""))

    @torch.no_grad()
    def merge(self, layer: AdapterLayer) -> None:  # noqa: D102
        w, _ = site_weight(layer)
        off = (~self.mask()).flatten().nonzero().flatten()
        flat = w.data.view(-1)
        self._merged = (off, flat[off].clone())  # the masked-out originals, for a bit-exact unmerge
        flat[off] = 0

    @torch.no_grad()
    def unmerge(self, layer: AdapterLayer) -> None:  # noqa: D102
        w, _ = site_weight(layer)
        off, vals = self._merged
        w.data.view(-1)[off] = vals
        self._merged = None


@register_method
class MaskTuning(Method):
    """R-AMT: learned binary masks on the selected weight matrices."""

    name = "mask"
    config_class = MaskTuningConfig
    site_kinds = ("linear", "packed_attn")
    mergeable = True
    default_targets = ("qkv", "attn_out")
    calibration_statistic = "grad_abs"

    def candidate_sites(self, model: nn.Module, spec) -> list:
        """All candidate sites (the config's targets), checked, before the selection filters them."""
        return super().resolve(model, spec)

    def check_site(self, model, spec, site):  # noqa: D102
        super().check_site(model, spec, site)
        if site.out_slice is not None:
            raise ValueError(f"method 'mask' masks whole weight matrices; site {site.qualified!r} is a slice of a "
                             "fused projection: target 'qkv' instead")

    def resolve(self, model, spec):  # noqa: D102
        if self.config.needs_calibration():
            raise unresolved_error(self.config)
        sites = self.candidate_sites(model, spec)
        chosen = set(self.config.selection["matrices"])
        known = {s.path for s in sites}
        missing = sorted(chosen - known)
        if missing:
            raise ValueError(f"MaskTuningConfig.selection names matrices {missing[:4]} that are not among this model's "
                             f"candidate sites for targets {self.targets(spec)} (e.g. {sorted(known)[:3]}); the "
                             "selection was calibrated on another backbone or with other targets")
        return [s for s in sites if s.path in chosen]

    # -- calibration -----------------------------------------------------------------------------------------------
    def calibration_weights(self, model, spec):  # noqa: D102
        return {s.path: (site_weight(model.get_submodule(s.path))[0], None) for s in self.candidate_sites(model, spec)}

    def resolve_calibration(self, model, spec, stats: dict[str, torch.Tensor]) -> MaskTuningConfig:
        """Score each candidate by its share of globally important entries; keep the best ``select_fraction``."""
        flat = torch.cat([s.flatten() for s in stats.values()])
        k = max(1, int(math.ceil(self.config.important_fraction * flat.numel())))
        cut = torch.topk(flat, k).values[-1]
        scores = {p: float((s >= cut).float().mean()) if cut > 0 else 0.0 for p, s in stats.items()}
        n = max(1, int(math.ceil(self.config.select_fraction * len(scores))))
        order = sorted(scores, key=lambda p: (-scores[p], list(stats).index(p)))  # stable: model order on ties
        chosen = set(order[:n])
        selection = {"matrices": [p for p in stats if p in chosen], "scores": scores}
        return dataclasses.replace(self.config, selection=selection)

    def make_adapter(self, model, spec, sites, module, shared):  # noqa: D102
        adapter = MaskAdapter(sites[0], module, self.config)
        adapter.__dict__["_module"] = module  # the wrapped module, referenced (not registered) for forward()
        return adapter


# -- reporting and the gradient-dropout regulariser -------------------------------------------------------------------


def mask_adapters(pm) -> list[MaskAdapter]:
    """Every :class:`MaskAdapter` of a ``PeftModel``."""
    return [a for layer in pm.adapter_layers().values() for _, a in layer.adapters() if isinstance(a, MaskAdapter)]


def score_tensors(pm) -> list[nn.Parameter]:
    """The trainable score tensors of a ``PeftModel`` (what the gradient dropout acts on)."""
    return [a.scores for a in mask_adapters(pm)]


def masked_fraction(pm) -> dict[str, float]:
    """How much of the model the masks switch off.

    Returns:
        ``{"selected": share of the masked (selected) weights whose mask is 0, "backbone": the same count over all
        backbone parameters, "num_masked": that count, "num_selected": number of selected weights}``.
    """
    adapters = mask_adapters(pm)
    zero = sum(a.num_masked() for a in adapters)
    selected = sum(a.scores.numel() for a in adapters)
    adapter_ids = {id(p) for layer in pm.adapter_layers().values() for _, a in layer.adapters() for p in a.parameters()}
    backbone = sum(p.numel() for p in pm.base_model.parameters() if id(p) not in adapter_ids)
    return {"selected": zero / max(selected, 1), "backbone": zero / max(backbone, 1), "num_masked": zero,
            "num_selected": selected}


def general_knowledge_loss(logits: torch.Tensor, zero_shot_logits: torch.Tensor, temperature: float = 1.0,
                           alpha: float = 1.0) -> torch.Tensor:
    """R-AMT's general-knowledge loss: KL-style distillation from the zero-shot prediction.

    ``-sum(softmax(t / T) * log_softmax(logits / T)) * T^2`` (batch mean), with the teacher
    ``t = alpha * zero_shot_logits + (1 - alpha) * logits`` (reference defaults ``T = 1``, ``alpha = 1``).

    Args:
        logits: The masked model's logits ``(batch, classes)``.
        zero_shot_logits: The zero-shot CLIP logits for the same images (no masks): compute them with
            ``with torch.no_grad(), pm.disabled(): ...``.
        temperature: Distillation temperature ``T``.
        alpha: Teacher mix.
    """
    if logits.shape != zero_shot_logits.shape:
        raise ValueError(f"general_knowledge_loss: logits {tuple(logits.shape)} and zero_shot_logits "
                         f"{tuple(zero_shot_logits.shape)} must have the same shape")
    teacher = (alpha * zero_shot_logits.detach() + (1 - alpha) * logits.detach()) / temperature
    return -(F.softmax(teacher, dim=-1) * F.log_softmax(logits / temperature, dim=-1)).sum(-1).mean() \
        * temperature ** 2


def drop_gradient(task_grad: torch.Tensor, general_grad: torch.Tensor, lam: float = 1.0,
                  generator: Optional[torch.Generator] = None, eps: float = 1e-8) -> torch.Tensor:
    """R-AMT's gradient dropout of one tensor's task gradient given the general-knowledge gradient.

    ``P = (sign(a) (a + b) / (|a| + |b| + eps) + 1) / 2`` is 1 where the two gradients agree and falls to 0 as they
    conflict; the result is ``((1 - lam) + lam * 1[P > U]) * a`` with ``U ~ Uniform(0, 1)``.
    """
    a, b = task_grad, general_grad.to(task_grad.dtype)
    p = (torch.sign(a) * (a + b) / (a.abs() + b.abs() + eps) + 1) / 2
    u = torch.rand(a.shape, generator=generator, device=a.device if generator is None else generator.device,
                   dtype=torch.float32).to(a.device)
    return ((1.0 - lam) + lam * (p > u).to(a.dtype)) * a


def gradient_dropout_backward(pm, task_loss: torch.Tensor, general_loss: torch.Tensor, lam: float = 1.0,
                              params: Optional[Iterable[torch.Tensor]] = None,
                              generator: Optional[torch.Generator] = None) -> None:
    """Backward pass with R-AMT's gradient-dropout regularity; call it instead of ``task_loss.backward()``.

    Gradients of every trainable tensor come from ``task_loss``; for the score tensors (or ``params``) the task
    gradient is then dropped element-wise where it conflicts with the gradient of ``general_loss`` (see
    :func:`drop_gradient`). Call ``optimizer.zero_grad()`` before, ``optimizer.step()`` after.

    Example (CLIP classification, one step)::

        logits = classify(pm, images)                      # masked model
        with torch.no_grad(), pm.disabled():
            zs = classify(pm, images)                      # zero-shot CLIP logits
        loss = F.cross_entropy(logits, labels)
        gradient_dropout_backward(pm, loss, general_knowledge_loss(logits, zs))
        optimizer.step()
    """
    params = [p for p in (params if params is not None else score_tensors(pm)) if p.requires_grad]
    general = torch.autograd.grad(general_loss, params, retain_graph=True, allow_unused=True) if params else []
    task_loss.backward()
    with torch.no_grad():
        for p, b in zip(params, general):
            if p.grad is None or b is None:
                continue
            p.grad = drop_gradient(p.grad, b, lam, generator)


__all__ = ["MaskAdapter", "MaskTuning", "MaskTuningConfig", "drop_gradient", "general_knowledge_loss",
           "gradient_dropout_backward", "masked_fraction", "score_tensors"]
