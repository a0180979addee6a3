"""Block-LoRA: block-matrix low-rank adaptation with a shared down-projection block (Zhou, Shen, Yu, Bu and Wang,
"One Head Eight Arms: Block Matrix based Low Rank Adaptation for CLIP-based Few-Shot Learning", 2025,
arXiv:2501.16720).

LoRA adds ``W x + s * B A x`` with ``A`` (r x in) and ``B`` (out x r). Block-LoRA reads ``B A`` as a block-matrix
product: the input is cut into ``n`` equal blocks ``x = [x_1; ...; x_n]`` (each ``in / n`` features), so the
down-projection is the row of blocks ``A = [A_1, ..., A_n]`` with ``A_j`` (r x in/n), and all ``n`` down-projection
blocks are one shared matrix ``A_s`` ("one head", shared by the ``n`` "arms"):

    A = [A_s, A_s, ..., A_s]        delta W = s * B A

(cutting ``B`` into ``n`` row blocks ``B_i`` makes ``delta W`` the ``n x n`` block matrix with blocks
``s * B_i A_s``), so the ``n`` block products ``A_j x_j`` collapse into additions followed by one small product:

    h = W x + s * B (A_s (x_1 + x_2 + ... + x_n))

The down-projection costs ``r * in / n`` multiply-adds per token instead of ``r * in``, the down-projection has
``n`` times fewer parameters, and the update stays a plain matrix, so it merges into ``W`` exactly.

On timm's fused ``qkv`` Linear and open_clip's packed ``in_proj_weight`` the q, k and v targets are slices of one
projection: each targeted slice gets its own ``A_s``/``B`` pair (as CLIP-LoRA gives each of W_q, W_k, W_v its own
LoRA), the block sum ``x_1 + ... + x_n`` is computed once for all slices, and the down-projections of all slices run
as one matmul over it.

Defaults (CLIP-LoRA's recipe, which the paper builds on and compares against, and ``num_blocks=8``, the "eight
arms" of the title): targets W_q, W_k, W_v; r=2; alpha=1 (scaling ``alpha / r = 0.5``); dropout 0.25 on the
branch input; ``A_s`` Kaiming-uniform and ``B`` zero, so training starts from the pretrained function. The paper
adapts both CLIP encoders; vpeft's unqualified site names resolve on the image tower only, so pass
``towers=["visual", "text"]`` to reproduce the paper on an open_clip model.

Trainable parameters: for each adapted slice ``r * (in / n + out_slice)`` (vanilla LoRA: ``r * (in + out_slice)``).
Block-LoRA r=2, n=8 on q, k, v of ViT-B/16's image tower: ``12 * 3 * 2 * (768 / 8 + 768) = 62,208`` (LoRA r=2:
110,592); with the text tower (width 512) added: ``62,208 + 12 * 3 * 2 * (512 / 8 + 512) = 103,680``.

Deviations from the reference implementation:
    * Re-implemented from the paper's abstract (partition the LoRA decomposition into sub-matrices, share all
      down-projection sub-matrices, turn matrix products into additions); its method section and the authors' code
      were not consulted. The partition axis is therefore a reconstruction: the input blocks are the ``n``
      contiguous feature chunks of ``x`` and ``in_features`` must be divisible by ``n`` (``ValueError`` otherwise,
      no padding). Splitting along the rank instead (``delta W = sum_i B_i A_s``) would collapse to a rank ``r / n``
      LoRA and cannot give n=8 at CLIP-LoRA's r=2, so it was not used. ``num_blocks=8`` is read off the title.
    * ``A_s`` uses loralib's Kaiming-uniform init (a=sqrt(5)) on its ``(r, in / n)`` shape, as CLIP-LoRA does for
      ``A``; ``init_a="gaussian"`` gives N(0, 1/r).
    * Merging is explicit (``PeftModel.merge``), not tied to ``train()/eval()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from ._lowrank import LowRankConfig, SliceDeltaAdapter, WeightDeltaMethod, site_weight, slices_of
from .base import register_method
from .lora import init_lora_a


@dataclass
class BlockLoraConfig(LowRankConfig):
    """Block-LoRA configuration.

    Attributes:
        r: Rank of the update (rows of the shared down-projection block ``A_s``).
        num_blocks: Number ``n`` of input blocks sharing ``A_s``; must divide the adapted layer's input width.
        alpha: Scale numerator; the update is multiplied by ``alpha / r``. ``None`` means ``alpha = r``.
        dropout: Dropout on the branch input (before the block sum).
        init_a: ``"kaiming"`` (loralib) or ``"gaussian"`` (N(0, 1/r)) initialisation of ``A_s``.
        targets: Sites among ``q, k, v, qkv, attn_out, mlp_in, mlp_out`` (default ``["q", "k", "v"]``).
    """

    r: int = 2
    num_blocks: int = 8
    alpha: Optional[float] = 1.0
    dropout: float = 0.25
    init_a: str = "kaiming"

    def validate(self) -> None:  # noqa: D102
        super().validate()
        if not isinstance(self.num_blocks, int) or isinstance(self.num_blocks, bool) or self.num_blocks < 1:
            raise ValueError(f"{type(self).__name__}.num_blocks must be a positive int, got {self.num_blocks!r}")


class BlockLoraAdapter(SliceDeltaAdapter):
    """One shared down-projection block and one up-projection per output slice: ``lora_A.<slice>`` is ``A_s``
    (r, in / n) and ``lora_B.<slice>`` is ``B`` (out_slice, r)."""

    def __init__(self, site, slices, in_features: int, cfg: BlockLoraConfig, like: torch.Tensor) -> None:
        super().__init__(site, slices, cfg.scaling, cfg.dropout)
        self.num_blocks = cfg.num_blocks
        self.block_features = in_features // cfg.num_blocks
        kw = dict(device=like.device, dtype=like.dtype)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name, (a, b) in slices.items():
            A = torch.empty(cfg.r, self.block_features, **kw)
            init_lora_a(A, cfg.init_a, cfg.r)
            self.lora_A[name] = nn.Parameter(A)
            self.lora_B[name] = nn.Parameter(torch.zeros(b - a, cfg.r, **kw))

    def factors(self):  # noqa: D102
        # The full down-projection [A_s, ..., A_s]; used for merging, never in the forward pass.
        return {n: (self.lora_A[n].repeat(1, self.num_blocks), self.lora_B[n]) for n in self.slices}

    def block_sum(self, x: torch.Tensor) -> torch.Tensor:
        """``x_1 + ... + x_n`` over the ``n`` contiguous input blocks: (..., in) -> (..., in / n)."""
        return x.unflatten(-1, (self.num_blocks, self.block_features)).sum(dim=-2)

    def deltas(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Slice name -> ``scaling * B A_s (x_1 + ... + x_n)``; the block sum and the down-projections of all slices
        are computed once."""
        names = list(self.slices)
        a_all = torch.cat([self.lora_A[n] for n in names], dim=0) if len(names) > 1 else self.lora_A[names[0]]
        h = self.block_sum(self.dropout(x)) @ a_all.t()
        out, pos = {}, 0
        for n in names:
            r = self.lora_A[n].shape[0]
            out[n] = (h[..., pos:pos + r] @ self.lora_B[n].t()) * self.scaling
            pos += r
        return out


@register_method
class BlockLora(WeightDeltaMethod):
    """Block-LoRA on Linear sites and q/k/v slices of fused or packed projections."""

    name = "block_lora"
    config_class = BlockLoraConfig
    default_targets = ("q", "k", "v")

    def make_adapter(self, model, spec, sites, module, shared):  # noqa: D102
        cfg: BlockLoraConfig = self.config
        w, _ = site_weight(module)
        in_f, n = w.shape[1], cfg.num_blocks
        if in_f % n:
            divisors = [d for d in range(1, in_f + 1) if in_f % d == 0]
            raise ValueError(f"{type(cfg).__name__}: num_blocks={n} does not divide the input width {in_f} of the "
                             f"layer at {sites[0].path!r}; use one of {divisors}")
        slices = slices_of(sites, w.shape[0])
        for name, (a, b) in slices.items():
            if cfg.r > min(in_f // n, b - a):
                raise ValueError(f"{type(cfg).__name__}: rank r={cfg.r} is larger than the shared block of the layer "
                                 f"at {sites[0].path!r} (slice {name!r}: {b - a} x {in_f // n} with num_blocks={n}); "
                                 f"use r <= {min(in_f // n, b - a)} or fewer blocks")
        return BlockLoraAdapter(sites[0], slices, in_f, cfg, w)
