"""DAPT: Dynamic Adapter Meets Prompt Tuning: Parameter-Efficient Transfer Learning for Point Cloud Analysis (Zhou,
Liang, Xu, Zhu, Xu, Zou and Bai, CVPR 2024, arXiv:2403.01439).

The backbone is frozen; three light parts train, in every block of ``layers`` (default all):

* **Dynamic Adapter.** A bottleneck beside the MLP that reads the MLP input ``x`` (the ``norm2`` output) and whose
  output is scaled per token by a learned *dynamic scale*:
  ``A(x) = s(x) * (GELU(x' W_down + b_down) W_up + b_up)`` with ``x' = LN_a(x)`` and ``s(x) = ReLU(x' W_s + b_s)``
  (``W_s``: ``C -> 1``, one scale per token). The block computes ``x = x + MLP(x_n) + A(x_n)`` with ``x_n`` the MLP
  input; in vpeft it attaches to the ``mlp`` site, like AdaptFormer, and adds ``A`` to the MLP output.
* **Internal Prompt.** The adapter's output becomes an instance-specific prompt:
  ``P = TFTS(mean over the block's tokens of GELU(A(x_n)))`` (one ``(B, 1, C)`` token per block), inserted after the
  prefix (cls) tokens of the sequence that the next block receives. Prompts accumulate: after block ``i`` the
  sequence holds ``i + 1`` prompts (the newest first), each further processed by every later block.
* **TFTS** (task-agnostic feature transform strategy, SSF-style): a per-channel ``y * gamma + beta`` after ``norm1``,
  the fused ``qkv`` projection, ``attn_out``, ``norm2``, ``mlp_in``, ``mlp_out`` of each adapted block, on each
  internal prompt, on the patch embedding (``embed``) and after the final norm (``final_norm``).

On point-cloud transformers (``point_mae`` / ``point_bert``) with a classifier, the paper's head replaces the
backbone's: ``concat(cls token, mean over the normalised prompts, max over the patch tokens)`` ->
``Linear(3C, 256), BN, ReLU, Dropout(0.5), Linear(256, 256), BN, ReLU, Dropout(0.5), Linear(256, K)`` (official
``class_token: use, prompt_token: mean, patch_token: max``).

Paper / official defaults (``cfgs/finetune_*_dapt.yaml`` and ``models/DAPT.py`` of LMD0311/DAPT): bottleneck
``rank = 64``, adapter dropout 0 (``drop_adapter_rate: 0.``), a LayerNorm at the adapter input (the official
``Adapter``'s ``adapter_layernorm_option="in"``), every block, TFTS on, head hidden 256 with dropout 0.5.
Initialisation (official): ``W_down`` and ``W_s`` Kaiming-uniform (``a = sqrt(5)``, as LoRA's A), ``W_up`` and all
three biases zero, ``LN_a`` weight 1 / bias 0, TFTS ``gamma ~ N(1, 0.02)``, ``beta ~ N(0, 0.02)``. So the adapter
output is exactly zero at init, but the model is *not* the frozen one at init: TFTS starts near (not at) the identity
and the prompts (``TFTS(0) = beta``) already take part in attention. With ``tfts=False, internal_prompt=False`` the
model equals the frozen backbone at init.

Trainable parameters (width C, MLP hidden H, bottleneck r, L adapted blocks, patch-embedding channels E):
    per block: Dynamic Adapter ``2Cr + r + 2C + 1`` (+ ``2C`` for ``LN_a``), block TFTS
    ``2 (C + 3C + C + C + H + C) = 14C + 2H``; prompt TFTS ``2C`` per prompt-making block; once: TFTS on embed and
    final norm ``2 (E + C)``; point-cloud head (Point-MAE layout, hidden h, K classes): ``3Ch + h^2 + hK + 6h + K``.
    Every block makes a prompt when the DAPT head reads them; without that head the last block's prompt would reach
    nothing, so the last block makes none (``L - 1`` prompts).
Point-MAE base (L = 12, C = E = 384, H = 1536, r = 64): ``12 (50,753 + 768 + 8,448) + 1,536 = 721,164`` for the
method, plus the head: 365,839 for ScanObjectNN (K = 15) -> 1,087,003; 372,264 for ModelNet40 (K = 40) -> 1,093,428.
The paper reports 1.1M tunable parameters: the official optimiser also trains the cls token and its position
(names containing ``cls``; 768 more, 1,087,771 for ScanObjectNN), which here train only when listed in
``trainable_extra`` (the preset does).
ViT-B/16 (timm, L = 12, C = E = 768, H = 3072, r = 64, no DAPT head there, 11 prompts):
``12 (101,441 + 16,896) + 11 * 1,536 + 3,072 = 1,440,012``.

Deviations from the reference implementation (LMD0311/DAPT):
    * Prompts are inserted by block wrappers and removed from every block output; the accumulated prompts travel to
      the next block (and the head) through the forward context. The backbone's token layout never changes, and the
      sequence each block sees equals the official one (cls, newest prompt, ..., oldest prompt, patches).
    * Positions: vpeft's Point-MAE backbone adds the positions before every block (as Point-MAE's own fine-tuning
      model); the official DAPT model adds them once, before the first block, since its sequence grows. The
      prompts carry no position either way.
    * TFTS on the patch embedding acts on the ``embed`` site: for Point-MAE the mini-PointNet's last 1x1 conv, before
      its max-pool over the points of a patch (official: after the max-pool). The two agree while every ``gamma`` is
      positive (max commutes with a positive scale and a shift).
    * The cls token and its position stay frozen unless ``trainable_extra=["cls_token", "cls_pos"]``.
    * The head is an adapter on the ``head`` site that replaces the backbone head's output (like IDPT's): it needs
      the prompts of the same top-level call, so ``pm.forward_head(feats)`` on features of a separate call raises,
      and ``pre_logits=True`` returns the backbone's 2C pooled features.
    * Beyond the paper: the method attaches to any NLC token tower with a spec (timm ViT, open_clip's image tower),
      where the backbone's own pooling and head stay and the prompts act through attention. ``internal_prompt=False``
      (the paper's "Dynamic Adapter only" ablation) also runs on causal text towers and SAM's windowed NHWC encoder,
      where prompts cannot be inserted; with prompts those towers are refused before any change to the model.
    * ``layers`` may select a subset of blocks (official: all): those get the Dynamic Adapter and TFTS; prompts are
      carried through every block after the first selected one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .adaptformer import mlp_features
from .base import Adapter, Method, PeftConfig, register_method
from .ssf import AffineAdapter, channels_of

__all__ = ["DAPTConfig", "DAPT", "DynamicAdapter", "dapt_num_parameters"]

#: TFTS sites inside each adapted block (official: after norm1, qkv, proj, norm2, fc1, fc2).
TFTS_BLOCK_SITES = ("norm1", "qkv", "attn_out", "norm2", "mlp_in", "mlp_out")
#: TFTS sites once per tower (official: on the patch tokens and after the final norm).
TFTS_GLOBAL_SITES = ("embed", "final_norm")
POINT_FAMILY = "point_transformer"


def _bool(cfg: PeftConfig, name: str, optional: bool = False) -> None:
    v = getattr(cfg, name)
    if not (isinstance(v, bool) or (optional and v is None)):
        raise TypeError(f"DAPTConfig.{name} must be a bool{' or None' if optional else ''}, got {v!r}")


def _int(cfg: PeftConfig, name: str, low: int) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"DAPTConfig.{name} must be an int >= {low}, got {v!r}")


def _prob(cfg: PeftConfig, name: str) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
        raise ValueError(f"DAPTConfig.{name} must be a number in [0, 1), got {v!r}")


@dataclass
class DAPTConfig(PeftConfig):
    """DAPT configuration.

    Attributes:
        rank: Bottleneck width ``r`` of the Dynamic Adapter (official ``rank: 64``).
        dropout: Dropout on the bottleneck activations (official ``drop_adapter_rate: 0.``).
        adapter_norm: LayerNorm at the adapter input (official ``Adapter`` default ``"in"``).
        internal_prompt: Build a prompt from each adapter's output and insert it into the next block's sequence
            (paper: on; off is the paper's "Dynamic Adapter only" ablation, and the only mode on causal text
            towers and windowed NHWC encoders).
        tfts: Per-channel scale and shift (TFTS) after norm1, qkv, attn_out, norm2, mlp_in, mlp_out of each adapted
            block, on each prompt, on the patch embedding and after the final norm (paper: on).
        tfts_init_std: Standard deviation of TFTS' ``N(1, std)`` scale / ``N(0, std)`` shift init (official 0.02;
            0 gives the exact identity).
        head: The paper's classifier on ``concat(cls, mean prompt, max patches)`` replacing the backbone head.
            ``None``: on point-cloud backbones with a classifier when ``internal_prompt`` is on (the paper's setting),
            else off. ``True`` needs such a backbone and ``internal_prompt``.
        head_hidden: Hidden width of the head (official 256).
        head_dropout: Dropout of the head (official 0.5).
        layers: Blocks with a Dynamic Adapter, a prompt and TFTS (default all, as the paper).
        towers: Towers to adapt (default: the backbone's default tower).
        targets: Must be None: the method places itself (mlp, block, TFTS and head sites).
    """

    rank: int = 64
    dropout: float = 0.0
    adapter_norm: bool = True
    internal_prompt: bool = True
    tfts: bool = True
    tfts_init_std: float = 0.02
    head: Optional[bool] = None
    head_hidden: int = 256
    head_dropout: float = 0.5

    def validate(self) -> None:  # noqa: D102
        super().validate()
        _int(self, "rank", 1)
        _int(self, "head_hidden", 1)
        _prob(self, "dropout")
        _prob(self, "head_dropout")
        for name in ("adapter_norm", "internal_prompt", "tfts"):
            _bool(self, name)
        _bool(self, "head", optional=True)
        s = self.tfts_init_std
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s < 0:
            raise ValueError(f"DAPTConfig.tfts_init_std must be a finite number >= 0, got {s!r}")
        if self.targets is not None:
            raise ValueError(f"DAPTConfig.targets must be None (DAPT places itself on the mlp, block, TFTS and head "
                             f"sites; choose blocks with layers), got {self.targets!r}")
        if self.head and not self.internal_prompt:
            raise ValueError("DAPTConfig.head=True needs internal_prompt=True: the paper's head reads the mean of the "
                             "internal prompts; set head=None/False or internal_prompt=True")


class DynamicAdapter(Adapter):
    """The Dynamic Adapter beside an MLP: ``forward(x, y) = y + s(x) * up(dropout(GELU(down(LN_a(x)))))`` with
    ``s(x) = ReLU(scale(LN_a(x)))``, one scale per token. With ``prompt`` it also stores the internal prompt
    ``TFTS(mean_tokens(GELU(A)))`` ``(B, 1, C)`` in the forward context for the block wrapper to insert.

    Args:
        site: The ``mlp`` site.
        key: The method key (context namespace).
        in_features: MLP input width.
        out_features: MLP output width.
        cfg: The config (rank, dropout, adapter_norm, tfts, tfts_init_std).
        like: A tensor whose device and dtype the parameters take.
        prompt: Whether this block generates an internal prompt.
    """

    mergeable = False

    def __init__(self, site, key: str, in_features: int, out_features: int, cfg: DAPTConfig, like: torch.Tensor,
                 prompt: bool) -> None:
        super().__init__(site)
        kw = dict(device=like.device, dtype=like.dtype)
        self.key, self.prompt = key, prompt
        self.norm = nn.LayerNorm(in_features, **kw) if cfg.adapter_norm else None
        self.scale = nn.Linear(in_features, 1, **kw)
        self.down = nn.Linear(in_features, cfg.rank, **kw)
        self.up = nn.Linear(cfg.rank, out_features, **kw)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.prompt_scale = self.prompt_shift = None
        if prompt and cfg.tfts:
            std = float(cfg.tfts_init_std)
            self.prompt_scale = nn.Parameter(torch.empty(out_features, **kw).normal_(1.0, std) if std > 0
                                             else torch.ones(out_features, **kw))
            self.prompt_shift = nn.Parameter(torch.empty(out_features, **kw).normal_(0.0, std) if std > 0
                                             else torch.zeros(out_features, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: Kaiming-uniform (a = sqrt(5)) down-projection and scale; zero up-projection and biases."""
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.scale.weight, a=math.sqrt(5))
        for t in (self.down.bias, self.scale.bias, self.up.weight, self.up.bias):
            nn.init.zeros_(t)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """``A(x) = ReLU(scale(x')) * up(dropout(GELU(down(x'))))`` with ``x' = LN_a(x)``."""
        h = self.norm(x) if self.norm is not None else x
        s = F.relu(self.scale(h))
        return self.up(self.dropout(F.gelu(self.down(h)))) * s

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # noqa: D102
        a = self.branch(x)
        if self.prompt:
            p = F.gelu(a).mean(dim=1, keepdim=True)
            if self.prompt_scale is not None:
                p = p * self.prompt_scale + self.prompt_shift
            # Keyed write: a re-run under gradient checkpointing overwrites it with the same value.
            self.ctx.set(_ctx_key(self.key, self.site.tower, "new", self.site.layer), p)
        return y + a

    def extra_repr(self) -> str:
        return f"site={self.site.qualified!r}, prompt={self.prompt}"


def _ctx_key(key: str, tower: str, what: str, layer: int) -> tuple:
    return (key, tower, what, layer)


class PromptCarrier(Adapter):
    """On a block: inserts the accumulated internal prompts after the prefix tokens of the block input and, after the
    block, removes them again, prepending the block's new prompt (when it generates one) to their outputs."""

    def __init__(self, site, key: str, num_prefix: int, first: bool, generates: bool) -> None:
        super().__init__(site)
        self.key, self.num_prefix, self.first, self.generates = key, num_prefix, first, generates

    def _carried(self, ctx, batch: int) -> Optional[torch.Tensor]:
        p = ctx.get(_ctx_key(self.key, self.site.tower, "prompts", self.site.layer))
        if p is None and not self.first:
            raise RuntimeError(f"DAPT: no internal prompts reached block {self.site.layer}; blocks must run in order "
                               "within one PeftModel forward")
        if p is not None and p.shape[0] != batch:
            raise RuntimeError(f"DAPT: block {self.site.layer} got {p.shape[0]} carried prompts for a batch of "
                               f"{batch}; blocks must run in order within one PeftModel forward")
        return p

    def pre(self, x: torch.Tensor, ctx) -> torch.Tensor:  # noqa: D102
        p = self._carried(ctx, x.shape[0])
        if p is None:
            return x
        n = self.num_prefix
        return torch.cat([x[:, :n], p.to(x.dtype), x[:, n:]], dim=1)

    def post(self, y: torch.Tensor, ctx) -> torch.Tensor:  # noqa: D102
        p = self._carried(ctx, y.shape[0])
        n, t = self.num_prefix, 0 if p is None else p.shape[1]
        parts = []
        if self.generates:
            new = ctx.get(_ctx_key(self.key, self.site.tower, "new", self.site.layer))
            if new is None:
                raise RuntimeError(f"DAPT: the Dynamic Adapter of block {self.site.layer} produced no prompt in this "
                                   "call (its MLP did not run through the adapter)")
            parts.append(new.to(y.dtype))  # the newest prompt goes first, right after the prefix (as official)
        if t:
            parts.append(y[:, n:n + t])
        if parts:
            ctx.set(_ctx_key(self.key, self.site.tower, "prompts", self.site.layer + 1), torch.cat(parts, dim=1))
        return torch.cat([y[:, :n], y[:, n + t:]], dim=1) if t else y

    def extra_repr(self) -> str:
        return f"site={self.site.qualified!r}, first={self.first}, generates={self.generates}"


class DAPTHead(Adapter):
    """The paper's classifier on ``concat(cls, mean of the normalised prompts, max over patches)``; replaces the
    head's output. The site input is the backbone's pooled ``concat(cls, max over patches)`` (2C)."""

    def __init__(self, site, key: str, model: nn.Module, norm_path: str, depth: int, head: nn.Module) -> None:
        super().__init__(site)
        self.key, self.norm_path, self.depth = key, norm_path, depth
        self.__dict__["_model"] = model  # not registered: the (possibly TFTS-wrapped) final norm is read live
        self.head = head

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # noqa: D102
        prompts = self.ctx.get(_ctx_key(self.key, self.site.tower, "prompts", self.depth))
        if prompts is None:
            raise RuntimeError("DAPT head: this call has no internal prompts. The head reads the prompts of the same "
                               "top-level call: run pm(points), not pm.forward_head() on features of another call")
        c = prompts.shape[-1]
        p = self.__dict__["_model"].get_submodule(self.norm_path)(prompts).mean(dim=1)
        return self.head(torch.cat([x[:, :c], p.to(x.dtype), x[:, c:]], dim=-1))


@register_method
class DAPT(Method):
    """Dynamic Adapter with Internal Prompts (and TFTS) on every adapted block."""

    name = "dapt"
    config_class = DAPTConfig
    site_kinds = ("block", "other", "linear", "packed_attn", "norm", "conv", "embed")
    mergeable = False

    def _use_head(self, spec, tower) -> bool:
        cfg = self.config
        point = spec.family == POINT_FAMILY and "head" in tower.global_sites
        if cfg.head is None:
            return point and cfg.internal_prompt
        if cfg.head and not point:
            raise ValueError(f"DAPTConfig.head=True needs a point-cloud backbone with a classifier (spec family "
                             f"{POINT_FAMILY!r} built with num_classes > 0, e.g. point_mae:base); this "
                             f"{spec.family!r} backbone keeps its own head: set head=None or False")
        return bool(cfg.head)

    def resolve(self, model, spec):  # noqa: D102
        cfg = self.config
        tnames = list(cfg.towers) if cfg.towers is not None else list(spec.default_towers)
        bad = [t for t in tnames if t not in spec.towers]
        if bad:
            raise ValueError(f"unknown tower(s) {bad} for backbone {spec.family!r}; towers: {list(spec.towers)}")
        self._heads: set[str] = set()
        self._first: dict[str, int] = {}
        self._layers: dict[str, set[int]] = {}
        sites = []
        for t in tnames:
            tower = spec.towers[t]
            label = t or "(main)"
            if "mlp" not in tower.site_names() or not tower.block_site:
                raise ValueError(f"DAPT needs transformer blocks with an 'mlp' site; tower {label!r} of this "
                                 f"{spec.family!r} backbone has sites {tower.site_names()}")
            if cfg.internal_prompt and (tower.causal or tower.layout != "NLC"):
                what = "a causal text tower (fixed-length mask)" if tower.causal else f"a {tower.layout} tower"
                raise ValueError(f"DAPT's internal prompts need image/point-token blocks in NLC layout; tower "
                                 f"{label!r} is {what}, where tokens cannot be inserted. Use internal_prompt=False "
                                 "(Dynamic Adapter and TFTS only) or adapt another tower (e.g. towers=['visual'])")
            mlps = spec.resolve(model, "mlp", [t], cfg.layers)
            for s in mlps:
                _, out_f, _ = mlp_features(s, model.get_submodule(s.path))
                if cfg.internal_prompt and out_f != tower.width:
                    raise ValueError(f"DAPT: the MLP at {s.path!r} outputs {out_f} channels, not the token width "
                                     f"{tower.width}; its prompt could not join the sequence")
            layers = sorted(s.layer for s in mlps)
            self._layers[t] = set(layers)
            sites += mlps
            if cfg.internal_prompt:
                self._first[t] = layers[0]
                sites += spec.resolve(model, "block", [t], list(range(layers[0], tower.depth)))
            if cfg.tfts:
                for name in TFTS_BLOCK_SITES:
                    if name in tower.site_names():
                        sites += spec.resolve(model, name, [t], layers)
                for name in TFTS_GLOBAL_SITES:
                    if name in tower.site_names():
                        sites += spec.resolve(model, name, [t])
            if self._use_head(spec, tower):
                self._heads.add(t)
                sites += spec.resolve(model, "head", [t])
        for s in sites:
            if s.out_slice is not None:  # never produced by the names above; guards a spec that slices 'qkv'
                raise ValueError(f"DAPT's TFTS acts on whole module outputs; site {s.qualified!r} is a slice")
            if s.name not in ("mlp", "block", "head"):
                channels_of(spec, s, model.get_submodule(s.path))  # raises for a site without a channel layout
        return sites

    def _generates(self, site, tower) -> bool:
        # The last block's prompt reaches only the DAPT head; without one it would be dead weight (and parameters
        # that never receive a gradient), so that block makes none.
        return self.config.internal_prompt and (site.layer < tower.depth - 1 or site.tower in self._heads)

    def make_adapter(self, model, spec, sites, module, shared) -> Adapter:  # noqa: D102
        cfg = self.config
        site = sites[0]
        tower = spec.towers[site.tower]
        if site.name == "mlp":
            in_f, out_f, like = mlp_features(site, module)
            return DynamicAdapter(site, self.key, in_f, out_f, cfg, like, prompt=self._generates(site, tower))
        if site.name == "block":
            return PromptCarrier(site, self.key, tower.num_prefix_tokens, first=site.layer == self._first[site.tower],
                                 generates=site.layer in self._layers[site.tower] and self._generates(site, tower))
        if site.name == "head" and site.tower in self._heads:
            from ..backbones.point_mae import _make_head

            w = next(model.blocks[0].parameters())
            head = _make_head(getattr(model, "head_style", "point_mae"), 3 * tower.width, model.num_classes,
                              cfg.head_hidden, cfg.head_dropout).to(device=w.device, dtype=w.dtype)
            return DAPTHead(site, self.key, model, tower.global_sites["final_norm"], tower.depth, head)
        c, dim = channels_of(spec, site, module)
        std = float(cfg.tfts_init_std)
        return AffineAdapter(site, module, c, dim, (1.0, std), (0.0, std))


def dapt_num_parameters(width: int, depth: int, rank: int = 64, mlp_hidden: Optional[int] = None,
                        embed_channels: Optional[int] = None, num_classes: Optional[int] = None,
                        head_hidden: int = 256, head_style: str = "point_mae", adapter_norm: bool = True,
                        internal_prompt: bool = True, tfts: bool = True, final_norm: bool = True) -> int:
    """Trainable parameters of DAPT on all ``depth`` blocks, by the formula in the module docstring.

    Args:
        width: Token width ``C``.
        depth: Blocks ``L`` (all adapted).
        rank: Bottleneck ``r``.
        mlp_hidden: MLP hidden width ``H`` (default ``4C``).
        embed_channels: Output channels ``E`` of the ``embed`` site (default ``C``); 0 for a tower without one.
        num_classes: Classes of the point-cloud head; ``None``: no DAPT head (then ``L - 1`` blocks make prompts).
        head_hidden: Hidden width ``h`` of the head.
        head_style: ``"point_mae"`` (two hidden layers with BatchNorm) or ``"point_bert"`` (one hidden layer).
        adapter_norm: Whether the adapter has its input LayerNorm.
        internal_prompt: Whether blocks make prompts (their TFTS counts with ``tfts``).
        tfts: Whether TFTS is on.
        final_norm: Whether the tower has a final norm (a TFTS site).
    """
    c, r = width, rank
    h_mlp = 4 * c if mlp_hidden is None else mlp_hidden
    e = c if embed_channels is None else embed_channels
    total = depth * (2 * c * r + r + 2 * c + 1 + (2 * c if adapter_norm else 0))
    if tfts:
        prompts = (depth if num_classes is not None else depth - 1) if internal_prompt else 0
        total += depth * (14 * c + 2 * h_mlp) + prompts * 2 * c + 2 * (e + (c if final_norm else 0))
    if num_classes is not None:
        h, k = head_hidden, num_classes
        total += 3 * c * h + h * h + h * k + 6 * h + k if head_style == "point_mae" else 3 * c * h + h + h * k + k
    return total
