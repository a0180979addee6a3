"""LST: Ladder Side-Tuning (Sung, Cho and Bansal, "LST: Ladder Side-Tuning for Parameter and Memory Efficient
Transfer Learning", NeurIPS 2022, arXiv:2206.06522).

A small transformer ("side network") of width ``d = D / r`` runs next to the frozen backbone of width ``D``. Ladders
connect every backbone block to it: block ``i``'s output ``h_i`` is down-projected and mixed into the side stream
through a learned scalar gate before side block ``i`` runs::

    s_0 = Down_0(e)                                      # e: the tokens entering block 0
    s_i = SideBlock_i(mu_i * Down_i(h_i) + (1 - mu_i) * s_(i-1)),   mu_i = sigmoid(alpha_i / T)
    out = Up(LN(s_N))                                    # replaces the final norm's output, shape (B, L, D)

The backbone only feeds the side network with detached activations, so backpropagation never enters it: autograd
keeps no backbone activation and training memory is the side network's plus one tap per ladder.

vpeft attaches LST through the shared side-network machinery (:mod:`vpeft.methods._side`): parameter-free taps on the
blocks record ``h_i.detach()`` (and block 0's input ``e``), and an adapter on the tower's final norm runs the side
network and returns ``Up(LN(s_N))`` in place of the final norm's output, so pooling and the head consume it.

Side network initialisation: the paper initialises the side network from the backbone by structural pruning, keeping
in every weight matrix the rows/columns that matter most (importance from Fisher information, which needs task
data). vpeft uses the closest data-free criterion, weight magnitude (L1): one set of ``D / r`` residual channels for
the whole tower (largest L1 mass of the weights reading and writing the channel, summed over blocks); in every head
the ``head_dim / r`` dimensions with the largest L1 norm of their q, k, v rows and output column; the ``M / r`` MLP
hidden units with the largest L1 norm of their in-row plus out-column; norms and layer scale cut to the kept
channels. Side block ``i`` comes from backbone block ``i``; the side's final norm from the backbone's final norm.
Every head is kept at ``head_dim / r`` (the reference halves ``d_kv`` the same way), so attention keeps its heads.

Defaults (reference code, ``seq2seq/training_args.py`` and ``scripts/ladder_side_tuning_base.sh``): ``r = 8`` (its
T5-base GLUE runs), gate temperature ``T = 0.1`` and ``alpha_i = 0`` at init (so ``mu_i = 0.5``), biases on the
up/down projections (``add_bias_sampling``), magnitude-pruned initialisation (see below), side dropout 0 (the
backbone's), every block laddered (``layers=None``; layer dropping is ``layers=[...]``: that T5-base script keeps
blocks ``[1, 2, 3, 5, 6, 7, 9, 10, 11]``).

Trainable parameters (width ``D``, heads ``H`` of width ``h``, MLP hidden ``M``, ``n`` laddered blocks,
``d = D / r``, attention width ``a = H * h / r``, biases as in the backbone)::

    Down_0 + Up + LN      (D d + d) + (d D + D) + 2 d
    per laddered block    (D d + d) + 1 + [2 (2 d) + d 3a + 3a + a d + d + d M/r + M/r + M/r d + d]

(plus ``2 d`` per block when the backbone has layer scale). ViT-B/16 (``D = 768, H = 12, h = 64, M = 3072``),
r = 8, all 12 blocks: ``73,824 + 74,688 + 12 * 185,665 = 2,376,492`` (2.8% of the backbone; the classifier head comes
on top when trained).

Memory: each ladder keeps its tap (``D`` wide, the storage of the backbone's own block output) for the weight
gradient of its down-projection; that is the floor. The side blocks' own activations would cost about twice as much
again (r = 8), so by default (``checkpoint=True``) every ladder rung (down-projection, gate, side block) is recomputed
in backward, one rung at a time; the recompute costs about ``1 / r**2`` of a backbone forward. ViT-S/16, batch 8,
fp32: 0.080x the activation bytes full fine-tuning saves (``checkpoint=False``: 0.21x).

Deviations from the reference implementation (ylsung/Ladder-Side-Tuning, T5/CLIP-T5 encoders-decoders):
    * Only the paper's abstract was available here; the ladder, the gate (``sigmoid(alpha / T)``, T = 0.1,
      alpha = 0), the side-network shapes (``d_model``, ``d_kv``, ``d_ff`` divided by ``r``, all heads kept), the
      final ``Up(LN(.))`` and the defaults were read off the reference code.
    * Pruning criterion: weight magnitude (L1) instead of Fisher information (data-free; the reference estimates
      Fisher on 1024 training samples before training). The reference's global channel selection goes through
      torch-pruning's dependency graph; here channels, head dimensions and MLP units are selected explicitly per the
      rules above (``init="random"`` skips pruning: default PyTorch init).
    * The gate mixes as written in the paper, ``mu * Down(h) + (1 - mu) * s``; the reference code applies ``mu`` to
      the side stream and ``1 - mu`` to the ladder. Both equal 0.5 / 0.5 at init.
    * Vision transformers: the side stream starts from the tokens entering block 0 (after position embedding and
      pre-norm) instead of T5's input embeddings; the up-projected side output replaces the tower's final-norm output
      (T5: it feeds the LM head). No decoder / cross-attention side network. The reference's optional "merge_last"
      gate with the backbone's last hidden state (off by default) is not implemented.
    * Side attention uses scaled dot-product attention with ``1 / sqrt(head_dim / r)`` scaling (T5 has none) and the
      backbone's activation, norms and biases.
    * Ladder rungs are recomputed in backward by default (``checkpoint=True``; exact, see Memory); the reference
      keeps the side network's activations.
    * All blocks are laddered by default; the reference's T5-base script drops side layers 0, 4 and 8.
    * One tower per config; apply two configs (``towers=["visual"]``, ``towers=["text"]``) to tune both CLIP towers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.utils.checkpoint

from ._side import (
    BlockParts,
    SideTuningMethod,
    check_positive_int,
    check_side_fields,
    divisors,
    load_partial,
    norm_state,
    pruned_block_state,
    residual_channels,
    side_block_like,
)
from .base import PeftConfig, register_method

INITS = ("magnitude", "random")


@dataclass
class LSTConfig(PeftConfig):
    """Ladder Side-Tuning configuration.

    Attributes:
        r: Reduction factor: the side network is ``width / r`` wide, its heads ``head_dim / r``, its MLP
            ``mlp_hidden / r``. Must divide the tower's width, head width and MLP width.
        gate_T: Temperature ``T`` of the ladder gates ``mu_i = sigmoid(alpha_i / T)``.
        gate_alpha: Initial ``alpha_i`` of every gate.
        init: ``"magnitude"``: side blocks are the backbone blocks structurally pruned by weight magnitude;
            ``"random"``: default PyTorch initialisation.
        dropout: Dropout on the side blocks' attention and MLP branch outputs.
        checkpoint: Recompute each ladder rung (down-projection, gate, side block) in backward instead of keeping
            its activations: the graph then holds one side-width tensor per rung besides the taps. Exact; the
            recompute costs about ``1 / r**2`` of a backbone forward.
        layers: Blocks that get a ladder and a side block (default all; the paper's layer dropping leaves some out).
        towers: The one tower to adapt (default: the backbone's default tower, the image tower for CLIP).
    """

    r: int = 8
    gate_T: float = 0.1
    gate_alpha: float = 0.0
    init: str = "magnitude"
    dropout: float = 0.0
    checkpoint: bool = True

    def validate(self) -> None:  # noqa: D102
        super().validate()
        check_side_fields(self)
        check_positive_int(self, "r")
        for name in ("gate_T", "gate_alpha"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"LSTConfig.{name} must be a number, got {v!r}")
        if not self.gate_T > 0:
            raise ValueError(f"LSTConfig.gate_T must be > 0 (the gate temperature), got {self.gate_T!r}")
        if self.init not in INITS:
            raise ValueError(f"LSTConfig.init must be one of {INITS}, got {self.init!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1:
            raise ValueError(f"LSTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.checkpoint, bool):
            raise ValueError(f"LSTConfig.checkpoint must be a bool, got {self.checkpoint!r}")


class LadderSideNetwork(nn.Module):
    """The LST side network of one tower (every trainable tensor of the method).

    Attributes:
        down0: Down-projection of the tokens entering block 0.
        downs: Ladder down-projections, keyed by backbone block index.
        alpha: Gate logits, one per laddered block (``layers`` order).
        blocks: Side blocks, keyed by backbone block index.
        norm: Final side LayerNorm.
        up: Up-projection to the backbone's width.
    """

    def __init__(self, width: int, side_width: int, layers: list[int], blocks: list[nn.Module], norm: nn.Module,
                 gate_T: float, gate_alpha: float, like: torch.Tensor, checkpoint: bool = True) -> None:
        super().__init__()
        kw = dict(device=like.device, dtype=like.dtype)
        self.layers, self.gate_T, self.checkpoint = list(layers), float(gate_T), checkpoint
        self.down0 = nn.Linear(width, side_width, **kw)
        self.downs = nn.ModuleDict({str(i): nn.Linear(width, side_width, **kw) for i in layers})
        self.alpha = nn.Parameter(torch.full((len(layers),), float(gate_alpha), **kw))
        self.blocks = nn.ModuleDict({str(i): b for i, b in zip(layers, blocks)})
        self.norm = norm
        self.up = nn.Linear(side_width, width, **kw)

    def gates(self) -> torch.Tensor:
        """``mu = sigmoid(alpha / T)`` for every laddered block."""
        return torch.sigmoid(self.alpha / self.gate_T)

    def rung(self, j: int, s: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Ladder rung ``j`` (backbone block ``layers[j]``): ``SideBlock(mu * Down(h) + (1 - mu) * s)``."""
        i = str(self.layers[j])
        mu = torch.sigmoid(self.alpha[j] / self.gate_T)
        return self.blocks[i](mu * self.downs[i](h) + (1 - mu) * s)

    def fuse(self, tap, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``Up(LN(s_N))`` from the taps (``tap(layer, "in"|"out")``); ``x``, ``y``: the final norm's input and
        output (LST replaces ``y``)."""
        dtype = self.up.weight.dtype
        s = self.down0(tap(0, "in").to(dtype))
        recompute = self.checkpoint and torch.is_grad_enabled() and s.requires_grad
        for j, i in enumerate(self.layers):
            h = tap(i, "out").to(dtype)
            if recompute:
                s = torch.utils.checkpoint.checkpoint(self.rung, j, s, h, use_reentrant=False)
            else:
                s = self.rung(j, s, h)
        return self.up(self.norm(s)).to(y.dtype)


@register_method
class LST(SideTuningMethod):
    """Ladder Side-Tuning: a gated ladder from every block into a narrow, pruned side transformer."""

    name = "lst"
    config_class = LSTConfig

    def taps(self, depth, layers):  # noqa: D102
        plan = {i: (False, True) for i in layers}
        plan[0] = (True, plan.get(0, (False, False))[1])
        return plan

    def check_tower(self, model, spec, tower):  # noqa: D102
        super().check_tower(model, spec, tower)
        r = self.config.r
        head = tower.width // tower.num_heads
        mlp = BlockParts(model, tower, 0).mlp_hidden
        bad = [f"{n} {v}" for n, v in (("width", tower.width), ("head width", head), ("MLP width", mlp)) if v % r]
        if bad:
            ok = sorted(set(divisors(tower.width)) & set(divisors(head)) & set(divisors(mlp)))
            raise ValueError(f"LSTConfig.r={r} must divide the tower's width, head width and MLP width "
                             f"({', '.join(bad)} are not divisible); valid r: {ok}")

    def build_shared(self, model, spec, sites):  # noqa: D102
        cfg = self.config
        tower = spec.towers[sites[0].tower]
        layers = self.layer_indices(model, spec)
        d, r = tower.width // cfg.r, cfg.r
        parts = {i: BlockParts(model, tower, i) for i in range(tower.depth)}
        head_keep = tower.width // tower.num_heads // r
        channels = residual_channels(list(parts.values()), d) if cfg.init == "magnitude" else None
        blocks = []
        for i in layers:
            p = parts[i]
            blk = side_block_like(p, d, tower.num_heads, head_keep, p.mlp_hidden // r, tower.causal, cfg.dropout)
            if channels is not None:
                load_partial(blk, pruned_block_state(p, channels, tower.num_heads, head_keep, p.mlp_hidden // r)[0])
            blocks.append(blk)
        like = parts[0].qkv_w
        final = model.get_submodule(tower.global_sites["final_norm"])
        norm = nn.LayerNorm(d, eps=getattr(final, "eps", 1e-6)).to(device=like.device, dtype=like.dtype)
        if channels is not None:
            load_partial(norm, {k.partition(".")[2]: v for k, v in norm_state(final, "n", channels).items()})
        return LadderSideNetwork(tower.width, d, layers, blocks, norm, cfg.gate_T, cfg.gate_alpha, like, cfg.checkpoint)
