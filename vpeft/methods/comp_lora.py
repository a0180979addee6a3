"""Comp-LoRA: complementary-subspace low-rank adaptation (Wang, Dai, Li, Li, Guo and Xiang, "Complementary Subspace
Low-Rank Adaptation of Vision-Language Models for Few-Shot Classification", 2025, arXiv:2501.15040).

LoRA's update interferes with the most informative directions of the pretrained weight, which the paper identifies
as the cause of catastrophic forgetting of CLIP's image-text alignment in few-shot fine-tuning. Comp-LoRA keeps the
LoRA branch but runs it in the complementary subspace of the weight's principal directions: the input is projected
onto the complement of the top input (right-singular) directions before ``A``, and the branch output is projected
onto the complement of the top output (left-singular) directions after ``B``. With the SVD ``W = U S V^T`` of the
frozen weight, computed once at injection, and ``U_k``, ``V_k`` its top-``k`` singular vectors:

    P_out = I - U_k U_k^T        P_in = I - V_k V_k^T
    h = W x + s * P_out B A P_in x        i.e.  delta W = s * P_out B A P_in

so ``U_k^T delta W = 0`` and ``delta W V_k = 0``: inputs along the principal directions pass through unchanged,
and no update reaches the principal output directions. ``A`` (r x in) and ``B`` (out x r) keep LoRA's shapes (no
extra trainable parameters); the projections fold into them once per forward (``A P_in``, ``P_out B``), so the
per-token cost is LoRA's, and ``delta W`` is a plain matrix that merges into ``W`` exactly.

The projection bases are fixed (never trained) and are not stored in adapter files: they are recomputed from the
frozen base weight by a deterministic float64 SVD when the adapter is attached (``get_peft_model`` or
``PeftModel.from_pretrained``), so adapter files hold only ``A`` and ``B`` and load back bit-exactly onto the same
backbone weights. On fused/packed q|k|v projections each targeted slice (W_q, W_k, W_v) gets its own SVD, bases
and A/B pair.

Defaults: targets W_q, W_k, W_v, r=2, alpha=1 (scaling ``alpha / r = 0.5``) and dropout 0.25 follow CLIP-LoRA's
recipe, the baseline the paper extends; ``k=0.5`` protects the top half of each weight's singular directions
(``k`` may also be an absolute count). The paper adapts both CLIP encoders; vpeft's unqualified site names resolve
on the image tower only, so pass ``towers=["visual", "text"]`` to adapt both on an open_clip model.

Trainable parameters: for each adapted slice ``r * (in + out_slice)``, the same as LoRA; Comp-LoRA r=2 on q, k, v
of ViT-B/16's image tower: ``12 * 3 * 2 * (768 + 768) = 110,592``. Fixed buffers (not trainable, not saved):
``k * (in + out_slice)`` values per slice.

Deviations from the reference implementation:
    * Re-implemented from the paper's abstract and its architecture figure caption (the input is projected into the
      complementary subspace by a pre-computed matrix, the branch output back by another); its method section and
      the authors' code were not consulted. The paper's size of the principal subspace could not be confirmed:
      ``k`` is a config field (default: half of ``min(out_slice, in)``). The projections are written as
      ``I - U_k U_k^T`` / ``I - V_k V_k^T`` on the full width rather than as coordinates in a truncated
      complementary basis: both confine ``delta W`` to the same set of matrices, and this form keeps LoRA's
      parameter shapes and per-token cost and stores ``k`` instead of ``in - k`` basis vectors.
    * ``A`` uses loralib's Kaiming-uniform init and ``B`` starts at zero, as in CLIP-LoRA.
    * Merging is explicit (``PeftModel.merge``), not tied to ``train()/eval()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn as nn

from ._lowrank import LowRankConfig, SliceDeltaAdapter, WeightDeltaMethod, site_weight, slices_of
from .base import register_method
from .lora import init_lora_a


@dataclass
class CompLoraConfig(LowRankConfig):
    """Comp-LoRA configuration.

    Attributes:
        r: Rank of the update.
        k: Size of the protected principal subspace of each adapted weight (slice): an int is a count of top singular
            directions, a float in (0, 1) a fraction of ``min(out_slice, in)`` (rounded, at least 1).
        alpha: Scale numerator; the update is multiplied by ``alpha / r``. ``None`` means ``alpha = r``.
        dropout: Dropout on the branch input.
        init_a: ``"kaiming"`` (loralib) or ``"gaussian"`` (N(0, 1/r)) initialisation of ``A``.
        targets: Sites among ``q, k, v, qkv, attn_out, mlp_in, mlp_out`` (default ``["q", "k", "v"]``).
    """

    r: int = 2
    k: Union[int, float] = 0.5
    alpha: Optional[float] = 1.0
    dropout: float = 0.25
    init_a: str = "kaiming"

    def principal_dim(self, out_features: int, in_features: int) -> int:
        """The number of protected singular directions of an ``out_features x in_features`` weight."""
        if isinstance(self.k, float):
            return max(1, round(self.k * min(out_features, in_features)))
        return self.k

    def validate(self) -> None:  # noqa: D102
        super().validate()
        name = type(self).__name__
        if isinstance(self.k, bool) or not isinstance(self.k, (int, float)):
            raise TypeError(f"{name}.k must be an int (count) or a float in (0, 1) (fraction), got {self.k!r}")
        if (isinstance(self.k, int) and self.k < 1) or (isinstance(self.k, float) and not 0.0 < self.k < 1.0):
            raise ValueError(f"{name}.k must be a positive int or a float in (0, 1), got {self.k!r}")


def principal_bases(weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` left (out x k) and right (in x k) singular vectors of ``weight`` (out x in).

    The SVD runs in float64 on the CPU whatever the weight's device and dtype, so the bases (and the projectors built
    from them) are the same every time they are recomputed from the same weight; they are returned in the weight's
    dtype and on its device.
    """
    w64 = weight.detach().to(device="cpu", dtype=torch.float64)
    u, _, vh = torch.linalg.svd(w64, full_matrices=False)
    kw = dict(device=weight.device, dtype=weight.dtype)
    return u[:, :k].to(**kw).contiguous(), vh[:k].t().to(**kw).contiguous()


class CompLoraAdapter(SliceDeltaAdapter):
    """A LoRA pair per output slice (``lora_A.<slice>`` (r, in), ``lora_B.<slice>`` (out_slice, r)) whose update is
    confined to the complement of the slice weight's top-k singular directions.

    The bases live in non-persistent buffers ``out_basis_<slice>`` (out_slice, k) and ``in_basis_<slice>`` (in, k):
    they follow ``.to()`` but are neither parameters nor part of ``state_dict()``, hence not of adapter files.
    """

    def __init__(self, site, slices, weight: torch.Tensor, cfg: CompLoraConfig, ks: dict[str, int]) -> None:
        super().__init__(site, slices, cfg.scaling, cfg.dropout)
        kw = dict(device=weight.device, dtype=weight.dtype)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.ks = dict(ks)
        for name, (a, b) in slices.items():
            u_k, v_k = principal_bases(weight[a:b], ks[name])
            self.register_buffer(f"out_basis_{name}", u_k, persistent=False)
            self.register_buffer(f"in_basis_{name}", v_k, persistent=False)
            A = torch.empty(cfg.r, weight.shape[1], **kw)
            init_lora_a(A, cfg.init_a, cfg.r)
            self.lora_A[name] = nn.Parameter(A)
            self.lora_B[name] = nn.Parameter(torch.zeros(b - a, cfg.r, **kw))

    def bases(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(out_basis (out_slice, k), in_basis (in, k)) of one slice: its weight's top-k singular vectors."""
        return getattr(self, f"out_basis_{name}"), getattr(self, f"in_basis_{name}")

    def factors(self):  # noqa: D102
        # (A P_in, P_out B): the projections are folded into the factors once per call instead of per token.
        out = {}
        for n in self.slices:
            u_k, v_k = self.bases(n)
            a, b = self.lora_A[n], self.lora_B[n]
            out[n] = (a - (a @ v_k) @ v_k.t(), b - u_k @ (u_k.t() @ b))
        return out


@register_method
class CompLora(WeightDeltaMethod):
    """Comp-LoRA on Linear sites and q/k/v slices of fused or packed projections."""

    name = "comp_lora"
    config_class = CompLoraConfig
    default_targets = ("q", "k", "v")

    def make_adapter(self, model, spec, sites, module, shared):  # noqa: D102
        cfg: CompLoraConfig = self.config
        w, _ = site_weight(module)
        in_f = w.shape[1]
        slices = slices_of(sites, w.shape[0])
        ks = {}
        for name, (a, b) in slices.items():
            m = min(b - a, in_f)
            k = cfg.principal_dim(b - a, in_f)
            if k >= m or cfg.r > m - k:
                raise ValueError(
                    f"{type(cfg).__name__}: the layer at {sites[0].path!r} (slice {name!r}: {b - a} x {in_f}) has "
                    f"{m} singular directions; protecting k={k} leaves {max(m - k, 0)} for a rank r={cfg.r} update. "
                    f"Use k + r <= {m}")
            ks[name] = k
        return CompLoraAdapter(sites[0], slices, w, cfg, ks)
