"""IDPT: Instance-aware Dynamic Prompt Tuning (Zha, Wang, Dai, Chen, Wang, Xia, ICCV 2023, arXiv:2304.07221).

A prompt module perceives each point cloud and generates one instance-specific prompt token, inserted before the last
transformer block (the paper's best placement; ``prompt_layer: 11`` of 12 in the official configs). The module is a
DGCNN over the patch tokens output by the block before: ``n`` EdgeConv layers, each building a kNN graph in feature
space (k nearest tokens, the token itself included) and computing ``max_j LeakyReLU(BN(W [x_j - x_i, x_i]))``; the
outputs of all EdgeConv layers are concatenated, fused by a 1x1 conv (``nC -> C``, BN, LeakyReLU) and max-pooled over
the tokens into the prompt. The prompt gets its own learned position (``prompt_pos``), added like the backbone adds
positions before every block. The classifier (trained, as the paper's head) reads
``concat(cls token, prompt token, max over patch tokens)`` after the final norm (official ``cls_type: all``).

Paper / official defaults (``cfgs/finetune_*_idpt.yaml`` and ``models/dgcnn.py``): prompt before the last block,
``prompt_module: dgcnn`` (3 EdgeConv layers, ``k = 20``, LeakyReLU slope 0.2, no conv biases, BatchNorm), one prompt
token, head ``Linear(3C, 256), BN, ReLU, Dropout(0.5), Linear(256, 256), BN, ReLU, Dropout(0.5), Linear(256, K)``.

Trainable parameters (width C, ``n`` EdgeConv layers, head hidden h, K classes):
    generator ``n (2C^2 + 2C) + (n C^2 + 2C)`` (conv weights and BN affine), ``prompt_pos`` ``C``;
    head (Point-MAE layout) ``3C h + h + 2h + h^2 + h + 2h + h K + K``.
Point-MAE base (C=384, n=3, h=256, K=40): generator 1,330,176 + prompt_pos 384 + head 372,264 = 1,702,824 (the paper
reports 1.7M). Without the head: 1,330,560. The official run also trains the cls token and its position (768 more:
they are absent from a Point-MAE pre-training file, so its ``only_new`` optimiser trains them); here they stay frozen.

Deviations from the reference implementation (zyh16143998882/ICCV23-IDPT):
    * The prompt is built inside block wrappers and removed from every block output (carried to the next block and
      to the head through the forward context), so the backbone's token layout never changes; the classifier is an
      adapter on the ``head`` site that replaces the backbone head's output (its own 3C-input head, same layout as the
      backbone's head). The head therefore needs the prompt of the same top-level call: ``pm(x)`` works, while
      ``pm.forward_head(feats)`` on features from a separate call raises, and ``pre_logits=True`` returns the
      backbone's 2C pooled features (no prompt).
    * The generator reads the patch tokens (the last G tokens of the block input, as the official code) as
      ``block input - position`` (the wrapper sees ``x + pos``; the positions of the forward are recorded by a
      parameter-free probe on the backbone's centre-position MLP, ``global_sites["pos_embed"]``), equal to the
      official tokens up to float rounding.
    * Under gradient checkpointing the generator's BatchNorm running statistics are updated twice per step (the
      prompted block is recomputed in the backward pass); gradients are unaffected.
    * ``k`` is capped at the number of patches (the official kNN would fail for fewer than 20 patches).
    * New modules keep PyTorch's default init (the official model does the same when fine-tuning from a checkpoint,
      except ``prompt_pos``: truncated normal 0.02, as here).
    * Point-cloud backbones only (spec family ``point_transformer``); other backbones are refused before mutation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from .base import Adapter, Method, PeftConfig, register_method

POINT_FAMILY = "point_transformer"


# --- shared helpers for point-cloud methods (also used by Point-PEFT) ------------------------------------------------


def point_tower(spec, method: str):
    """The single tower of a point-cloud backbone; ``ValueError`` for any other backbone (before mutation)."""
    tower = spec.towers.get("") if spec.family == POINT_FAMILY else None
    if tower is None or tower.layout != "NLC" or "pos_embed" not in tower.global_sites:
        raise ValueError(
            f"{method} needs a point-cloud transformer (spec family {POINT_FAMILY!r}, e.g. "
            f"vpeft.create_backbone('point_mae:base')); got a {spec.family!r} backbone, which is not a point-cloud "
            "backbone with group centres")
    return tower


def geometry_site(spec):
    """The ``pos_embed`` site (centres in, positions out) where the forward's geometry is recorded."""
    from ..backbones import Site

    return Site("pos_embed", "", None, spec.towers[""].global_sites["pos_embed"], "other")


def int_field(cfg: PeftConfig, name: str, low: int) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{type(cfg).__name__}.{name} must be an int >= {low}, got {v!r}")


class GeometryProbe(Adapter):
    """On the centre-position MLP: stores the centres ``(B, G, 3)`` and positions ``(B, G, C)`` of this forward in the
    context under ``(key, "center")`` / ``(key, "pos")``; the output is unchanged."""

    def __init__(self, site, key: str) -> None:
        super().__init__(site)
        self.key = key

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # noqa: D102
        self.ctx.set((self.key, "center"), x)
        self.ctx.set((self.key, "pos"), y)
        return y


def context_value(ctx, key: str, what: str, method: str) -> torch.Tensor:
    v = ctx.get((key, what))
    if v is None:
        raise RuntimeError(f"{method}: the group {what}s of this forward are missing; blocks must run inside one "
                           "PeftModel forward that starts from the points (pm(points) or pm.forward_features(points))")
    return v


# --- IDPT ------------------------------------------------------------------------------------------------------------


@dataclass
class IDPTConfig(PeftConfig):
    """IDPT configuration.

    Attributes:
        prompt_layer: Block before which the dynamic prompt is inserted (negative counts from the end; official 11
            of 12, i.e. -1). The prompt then stays in the sequence through the remaining blocks.
        k: Neighbours of each token in the EdgeConv graph (official 20; capped at the number of patches).
        num_edge_convs: EdgeConv layers (official ``dgcnn``: 3; ``dgcnn_light``: 1, ``dgcnn_light2``: 2).
        negative_slope: LeakyReLU slope of the generator (official 0.2).
        head: Replace the classifier by the paper's head on ``concat(cls, prompt, max-pooled patches)``; False keeps
            the backbone's head (the prompt only acts through attention).
        head_hidden: Hidden width of the head (official 256).
        head_dropout: Dropout of the head (official 0.5).
    """

    prompt_layer: int = -1
    k: int = 20
    num_edge_convs: int = 3
    negative_slope: float = 0.2
    head: bool = True
    head_hidden: int = 256
    head_dropout: float = 0.5

    def validate(self) -> None:  # noqa: D102
        super().validate()
        if isinstance(self.prompt_layer, bool) or not isinstance(self.prompt_layer, int):
            raise ValueError(f"IDPTConfig.prompt_layer must be an int block index, got {self.prompt_layer!r}")
        int_field(self, "k", 1)
        int_field(self, "num_edge_convs", 1)
        int_field(self, "head_hidden", 1)
        if isinstance(self.negative_slope, bool) or not isinstance(self.negative_slope, (int, float)) or \
                self.negative_slope < 0:
            raise ValueError(f"IDPTConfig.negative_slope must be a float >= 0, got {self.negative_slope!r}")
        if not isinstance(self.head, bool):
            raise ValueError(f"IDPTConfig.head must be a bool, got {self.head!r}")
        if isinstance(self.head_dropout, bool) or not isinstance(self.head_dropout, (int, float)) or \
                not 0.0 <= self.head_dropout < 1.0:
            raise ValueError(f"IDPTConfig.head_dropout must be in [0, 1), got {self.head_dropout!r}")
        if self.targets is not None:
            raise ValueError(f"IDPTConfig.targets must be None (the prompt module sits before `prompt_layer`), got "
                             f"{self.targets!r}")
        if self.layers is not None:
            raise ValueError(f"IDPTConfig.layers must be None; choose the block with prompt_layer, got "
                             f"{self.layers!r}")


def edge_features(x: torch.Tensor, k: int) -> torch.Tensor:
    """DGCNN graph features: ``(B, C, N)`` -> ``(B, 2C, N, k)`` holding ``[x_j - x_i, x_i]`` for the ``k`` nearest
    ``x_j`` of each ``x_i`` in feature space (squared Euclidean distance, ``x_i`` itself included)."""
    xt = x.transpose(1, 2)  # B N C
    sq = xt.square().sum(-1, keepdim=True)
    d = sq + sq.transpose(1, 2) - 2 * xt @ xt.transpose(1, 2)  # the official expansion; B x N x N
    idx = d.topk(k, dim=-1, largest=False).indices  # B N k
    b, n, c = xt.shape
    nbr = xt.gather(1, idx.reshape(b, n * k, 1).expand(-1, -1, c)).reshape(b, n, k, c)
    ctr = xt.unsqueeze(2).expand(-1, -1, k, -1)
    return torch.cat([nbr - ctr, ctr], dim=-1).permute(0, 3, 1, 2)


class DynamicPromptGenerator(nn.Module):
    """The DGCNN prompt module: EdgeConv layers, 1x1 fusion conv, max-pool -> one ``(B, 1, C)`` prompt."""

    def __init__(self, dim: int, k: int, num_edge_convs: int, negative_slope: float, device=None, dtype=None) -> None:
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.k = k
        self.edge_convs = nn.ModuleList([
            nn.Sequential(nn.Conv2d(2 * dim, dim, 1, bias=False, **kw), nn.BatchNorm2d(dim, **kw),
                          nn.LeakyReLU(negative_slope)) for _ in range(num_edge_convs)])
        self.fuse = nn.Sequential(nn.Conv1d(num_edge_convs * dim, dim, 1, bias=False, **kw),
                                  nn.BatchNorm1d(dim, **kw), nn.LeakyReLU(negative_slope))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, N, C)`` patch tokens -> ``(B, 1, C)`` prompt."""
        x = tokens.transpose(1, 2)
        k = min(self.k, x.shape[2])
        outs = []
        for conv in self.edge_convs:
            x = conv(edge_features(x, k)).amax(dim=-1)
            outs.append(x)
        return self.fuse(torch.cat(outs, dim=1)).amax(dim=-1).unsqueeze(1)


class IDPTShared(nn.Module):
    """The prompt generator and the prompt's position (one per model)."""

    def __init__(self, dim: int, cfg: IDPTConfig, device, dtype) -> None:
        super().__init__()
        self.generator = DynamicPromptGenerator(dim, cfg.k, cfg.num_edge_convs, cfg.negative_slope, device, dtype)
        self.prompt_pos = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, 1, dim, device=device, dtype=dtype),
                                                             std=0.02))


class IDPTBlockAdapter(Adapter):
    """Inserts the prompt after the prefix tokens of a block input (generating it at the first prompted block) and
    carries the prompt's output to the next block / the head."""

    def __init__(self, site, key: str, num_prefix: int, generate: bool) -> None:
        super().__init__(site)
        self.key, self.num_prefix, self.generate = key, num_prefix, generate

    def pre(self, x: torch.Tensor, ctx) -> torch.Tensor:  # noqa: D102
        n = self.num_prefix
        if self.generate:
            pos = context_value(ctx, self.key, "pos", "IDPT")
            # The patches are the last G tokens (as in the official code), whatever other methods put after the prefix.
            prompt = self.shared.generator(x[:, x.shape[1] - pos.shape[1]:] - pos.to(x.dtype))
        else:
            prompt = ctx.get((self.key, "prompt", self.site.layer))
            if prompt is None:
                raise RuntimeError(f"IDPT: no prompt reached block {self.site.layer}; blocks must run in order within "
                                   "one PeftModel forward")
        prompt = prompt + self.shared.prompt_pos.to(x.dtype)
        return torch.cat([x[:, :n], prompt, x[:, n:]], dim=1)

    def post(self, y: torch.Tensor, ctx) -> torch.Tensor:  # noqa: D102
        n = self.num_prefix
        ctx.set((self.key, "prompt", self.site.layer + 1), y[:, n:n + 1])
        return torch.cat([y[:, :n], y[:, n + 1:]], dim=1)


class IDPTHead(Adapter):
    """The paper's classifier on ``concat(cls, normed prompt, max over patches)``; replaces the head's output."""

    def __init__(self, site, key: str, model: nn.Module, norm_path: str, depth: int, head: nn.Module) -> None:
        super().__init__(site)
        self.key, self.norm_path, self.depth = key, norm_path, depth
        self.__dict__["_model"] = model  # not registered: the backbone's (possibly wrapped) final norm is read live
        self.head = head

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # noqa: D102
        prompt = self.ctx.get((self.key, "prompt", self.depth))
        if prompt is None:
            raise RuntimeError("IDPT head: this call has no dynamic prompt. The head reads the prompt of the same "
                               "top-level call: run pm(points), not pm.forward_head() on features of another call")
        c = prompt.shape[-1]
        p = self.__dict__["_model"].get_submodule(self.norm_path)(prompt[:, 0])
        return self.head(torch.cat([x[:, :c], p.to(x.dtype), x[:, c:]], dim=-1))


@register_method
class IDPT(Method):
    """Instance-aware Dynamic Prompt Tuning (point-cloud transformers)."""

    name = "idpt"
    config_class = IDPTConfig
    site_kinds = ("block", "other")

    def resolve(self, model, spec):  # noqa: D102
        cfg = self.config
        tower = point_tower(spec, "IDPT")
        depth = tower.depth
        layer = cfg.prompt_layer + depth if cfg.prompt_layer < 0 else cfg.prompt_layer
        if not 0 <= layer < depth:
            raise ValueError(f"IDPTConfig.prompt_layer {cfg.prompt_layer} is out of range for a {depth}-block model "
                             f"(valid: 0..{depth - 1} or -{depth}..-1)")
        if cfg.head and "head" not in tower.global_sites:
            raise ValueError("IDPTConfig.head=True needs a backbone with a classifier head (num_classes > 0); build "
                             "the backbone with num_classes or set head=False")
        self._layer = layer
        sites = [geometry_site(spec)]
        sites += spec.resolve(model, "block", None, list(range(layer, depth)))
        if cfg.head:
            sites += spec.resolve(model, "head")
        return sites

    def build_shared(self, model, spec, sites):  # noqa: D102
        w = next(model.blocks[0].parameters())
        return IDPTShared(spec.towers[""].width, self.config, w.device, w.dtype)

    def make_adapter(self, model, spec, sites, module, shared):  # noqa: D102
        site = sites[0]
        tower = spec.towers[""]
        if site.name == "pos_embed":
            return GeometryProbe(site, self.key)
        if site.name == "block":
            return IDPTBlockAdapter(site, self.key, tower.num_prefix_tokens, generate=site.layer == self._layer)
        from ..backbones.point_mae import _make_head

        cfg = self.config
        w = next(model.blocks[0].parameters())
        head = _make_head(getattr(model, "head_style", "point_mae"), 3 * tower.width, model.num_classes,
                          cfg.head_hidden, cfg.head_dropout).to(device=w.device, dtype=w.dtype)
        return IDPTHead(site, self.key, model, tower.global_sites["final_norm"], tower.depth, head)


def idpt_num_parameters(width: int, num_edge_convs: int = 3, num_classes: Optional[int] = 40, head_hidden: int = 256,
                        head_style: str = "point_mae") -> int:
    """Trainable parameters of IDPT by the formula in the module docstring (``num_classes=None``: no head)."""
    c, n, h = width, num_edge_convs, head_hidden
    total = n * (2 * c * c + 2 * c) + (n * c * c + 2 * c) + c
    if num_classes is not None:
        k = num_classes
        if head_style == "point_mae":
            total += 3 * c * h + h + 2 * h + h * h + h + 2 * h + h * k + k
        else:
            total += 3 * c * h + h + h * k + k
    return total
