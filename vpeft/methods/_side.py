"""Shared machinery of the side-network family (LST, UniPT): block taps, the fusion adapter, the side transformer block
and structured pruning of a backbone block into a narrower one.

How a side network attaches (DESIGN section 3, "side networks"):

1. A parameter-free :class:`TapAdapter` on the ``block`` site of each block the method reads records the block's
   input and/or output in the forward context as ``x.detach()`` and returns the block's tensors unchanged. Nothing
   inside the backbone requires grad, so autograd keeps no backbone activation; a tap shares the storage of the
   block's own tensor (no copy). Re-running a block under gradient checkpointing rewrites the same taps.
2. A :class:`FusionAdapter` on the tower's ``final_norm`` site runs the side network (the method's shared module,
   which holds every trainable tensor) on the recorded taps and returns features of exactly the final norm's output
   shape, so pooling, ``forward_head``, ``encode_image``/``encode_text`` and the classifier work unchanged.

The side network runs once, in the fusion adapter, outside any checkpointed block: a side computation inside a
reentrant-checkpointed block would run under ``no_grad`` and never receive gradients.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Adapter, ForwardContext, Method, PeftConfig

if TYPE_CHECKING:  # pragma: no cover
    from ..backbones import BackboneSpec, Site, TowerSpec


# --- config checks ------------------------------------------------------------------------------------------------

def check_positive_int(cfg: PeftConfig, name: str) -> None:
    """``ValueError`` unless ``cfg.<name>`` is an int >= 1 (bools refused)."""
    v = getattr(cfg, name)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{type(cfg).__name__}.{name} must be a positive int, got {v!r}")


def check_side_fields(cfg: PeftConfig) -> None:
    """Checks every side-network config shares: fixed sites (``targets`` None), at most one tower."""
    name = type(cfg).__name__
    if cfg.targets is not None:
        raise ValueError(f"{name}.targets must be None: a side network taps every selected block and fuses at the "
                         f"tower's final norm (fixed sites); choose blocks with `layers`, got targets={cfg.targets!r}")
    if cfg.towers is not None and len(cfg.towers) != 1:
        raise ValueError(f"{name}.towers must be None (the default tower) or name exactly one tower, got "
                         f"{cfg.towers!r}; apply one config per tower to tune both CLIP towers")
    if cfg.layers is not None and len(cfg.layers) == 0:
        raise ValueError(f"{name}.layers must be None (all blocks) or a non-empty list of block indices")


# --- adapters -------------------------------------------------------------------------------------------------------

def tap_key(method_key: str, layer: int, which: str) -> tuple:
    """Forward-context key of the tap of block ``layer``'s ``which`` (``"in"`` or ``"out"``) tensor."""
    return (method_key, "tap", layer, which)


def done_key(method_key: str) -> tuple:
    """Forward-context key set once the tower's last block has run in the current forward."""
    return (method_key, "last_block_done")


class TapAdapter(Adapter):
    """On a ``block`` site: records the detached block input and/or output; returns both unchanged.

    The tap on the tower's first block clears the "last block done" mark and the one on its last block sets it, so
    the fusion only runs on features of a complete pass (also when the backbone is called without the PeftModel
    entry points that reset the forward context).
    """

    def __init__(self, site: Site, key: str, record_input: bool, record_output: bool, first: bool,
                 last: bool) -> None:
        super().__init__(site)
        self.key, self.record_input, self.record_output = key, record_input, record_output
        self.first, self.last = first, last

    def pre(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:  # noqa: D102
        if self.first:
            ctx.set(done_key(self.key), False)
        if self.record_input:
            ctx.set(tap_key(self.key, self.site.layer, "in"), x.detach())
        return x

    def post(self, y: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:  # noqa: D102
        if self.record_output:
            ctx.set(tap_key(self.key, self.site.layer, "out"), y.detach())
        if self.last:
            ctx.set(done_key(self.key), True)
        return y

    def extra_repr(self) -> str:
        return f"layer={self.site.layer}, input={self.record_input}, output={self.record_output}"


class FusionAdapter(Adapter):
    """On the tower's ``final_norm`` site: ``y -> shared.fuse(taps, x, y)`` with ``y``'s shape.

    The final norm is also called on intermediate features (``forward_intermediates(norm=True)``, open_clip's
    ``normalize_intermediates``); before the tower's last block has run in this forward the output passes unchanged,
    so intermediates stay the backbone's.
    """

    def __init__(self, site: Site, key: str) -> None:
        super().__init__(site)
        self.key = key

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ctx = self.ctx
        if not ctx.get(done_key(self.key), False):
            return y
        out = self.shared.fuse(_TapReader(ctx, self.key), x, y)
        if out.shape != y.shape:
            raise RuntimeError(f"{self.key}: side network output {tuple(out.shape)} does not match the final norm's "
                               f"output {tuple(y.shape)}; list token-prompt methods (VPT) after side-tuning methods "
                               "so the taps see the backbone's own token layout")
        return out


class _TapReader:
    """Read access to one method's taps in the forward context (a clear error when one is missing)."""

    def __init__(self, ctx: ForwardContext, key: str) -> None:
        self.ctx, self.key = ctx, key

    def __call__(self, layer: int, which: str) -> torch.Tensor:
        t = self.ctx.get(tap_key(self.key, layer, which))
        if t is None:
            raise RuntimeError(f"{self.key}: no tap of block {layer}'s {which}put in this forward; every block of the "
                               "tower must run within one PeftModel call before the final norm")
        return t


# --- the method base ------------------------------------------------------------------------------------------------

class SideTuningMethod(Method):
    """Fixed sites: taps on the blocks the side network reads, the fusion adapter on the tower's final norm.

    Subclasses implement :meth:`taps` (which tensors of which blocks to record) and :meth:`build_shared`, and may
    extend :meth:`check_tower`.
    """

    site_kinds = ("block", "norm", "other")

    def tower_name(self, spec: BackboneSpec) -> str:
        """The one tower this side network adapts (the config's, or the backbone's default)."""
        names = list(self.config.towers) if self.config.towers is not None else list(spec.default_towers)
        name = type(self.config).__name__
        if len(names) != 1:
            raise ValueError(f"{name}: a side network adapts one tower; this backbone's default towers are {names}, "
                             "pick one with towers=[...]")
        if names[0] not in spec.towers:
            raise ValueError(f"{name}.towers: backbone {spec.family!r} has no tower {names[0]!r}; towers: "
                             f"{sorted(t for t in spec.towers if t) or ['(main)']}")
        return names[0]

    def layer_indices(self, model: nn.Module, spec: BackboneSpec) -> list[int]:
        """Sorted, validated block indices selected by ``config.layers`` (all blocks when None)."""
        tname = self.tower_name(spec)
        q = f"{tname}." if tname else ""
        return [s.layer for s in spec.resolve(model, f"{q}block", layers=self.config.layers)]

    def taps(self, depth: int, layers: list[int]) -> dict[int, tuple[bool, bool]]:
        """Block index -> (record input, record output)."""
        raise NotImplementedError

    def check_tower(self, model: nn.Module, spec: BackboneSpec, tower: TowerSpec) -> None:
        """Refuse towers the side network cannot read (``ValueError`` naming the tower and the reason)."""
        name = type(self.config).__name__
        where = f"tower {tower.name!r} of {spec.family!r}" if tower.name else f"backbone {spec.family!r}"
        if tower.layout != "NLC":
            raise ValueError(f"{name}: {where} runs its blocks in {tower.layout} layout; side networks need "
                             "batch-first token sequences (NLC)")
        path = tower.global_sites.get("final_norm")
        if path is None:
            raise ValueError(f"{name}: {where} has no final norm site (the side network fuses there); available "
                             f"sites: {spec.available()}")
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        pooled = (leaf == "fc_norm" or getattr(parent, "final_ln_after_pool", False)
                  or getattr(parent, "attn_pool", None) is not None)
        if pooled:
            raise ValueError(f"{name}: the final norm of {where} ({path!r}) runs after pooling (or an attention "
                             "pooler); side networks fuse token sequences before pooling. Use a token-pooled model "
                             "(class token, `norm` before the head)")

    def resolve(self, model: nn.Module, spec: BackboneSpec) -> list[Site]:  # noqa: D102
        tname = self.tower_name(spec)
        tower = spec.towers[tname]
        self.check_tower(model, spec, tower)
        layers = self.layer_indices(model, spec)
        q = f"{tname}." if tname else ""
        blocks = spec.resolve(model, f"{q}block")
        plan = self.taps(tower.depth, layers)
        plan.setdefault(0, (False, False))  # the first block clears the "done" mark ...
        plan.setdefault(tower.depth - 1, (False, False))  # ... and the last one sets it
        self._plan = plan
        sites = [s for s in blocks if s.layer in plan] + spec.resolve(model, f"{q}final_norm")
        for s in sites:
            self.check_site(model, spec, s)
        return sites

    def check_site(self, model, spec, site):  # noqa: D102
        if site.name == "block" and site.kind != "block":
            raise ValueError(f"{self.name}: site {site.qualified!r} at {site.path!r} is not a block")

    def make_adapter(self, model, spec, sites, module, shared):  # noqa: D102
        site = sites[0]
        if site.name == "block":
            depth = spec.towers[site.tower].depth
            rec_in, rec_out = self._plan[site.layer]
            return TapAdapter(site, self.key, rec_in, rec_out, first=site.layer == 0, last=site.layer == depth - 1)
        return FusionAdapter(site, self.key)


# --- reading a backbone block through the spec ----------------------------------------------------------------------

def _unwrap(m: nn.Module) -> nn.Module:
    from .layers import unwrap

    return unwrap(m)


class BlockParts:
    """The tensors and modules of backbone block ``layer`` of ``tower`` (timm fused qkv or open_clip packed).

    Attributes:
        qkv_w, qkv_b: The fused q|k|v projection ``(3 * width, width)`` and its bias (``None`` without).
        proj_w, proj_b: Attention output projection ``(width, width)``.
        fc1_w, fc1_b, fc2_w, fc2_b: The MLP ``(hidden, width)`` and ``(width, hidden)``.
        norm1, norm2: The pre-attention / pre-MLP norms.
        ls1, ls2: Layer-scale vectors (``None`` without layer scale).
        act: The MLP activation module.
    """

    def __init__(self, model: nn.Module, tower: TowerSpec, layer: int) -> None:
        from ._lowrank import site_weight

        blk_path = tower.block_path(layer)

        def sub(name: str) -> nn.Module:
            return _unwrap(model.get_submodule(f"{blk_path}.{tower.block_sites[name]}"))

        qkv = sub("qkv") if tower.attention == "fused_linear" else sub("attn")
        self.qkv_w, self.qkv_b = site_weight(qkv)
        proj, fc1, fc2 = sub("attn_out"), sub("mlp_in"), sub("mlp_out")
        for n, m in (("attn_out", proj), ("mlp_in", fc1), ("mlp_out", fc2)):
            if not isinstance(m, nn.Linear):
                raise ValueError(f"side network: the {n} of block {layer} at {blk_path!r} is a {type(m).__name__}, "
                                 "not a Linear")
        if fc2.in_features != fc1.out_features:
            raise ValueError(f"side network: block {layer}'s MLP is gated ({fc1.out_features} -> {fc2.in_features}); "
                             "only plain two-layer MLPs are supported")
        self.proj_w, self.proj_b = proj.weight, proj.bias
        self.fc1_w, self.fc1_b, self.fc2_w, self.fc2_b = fc1.weight, fc1.bias, fc2.weight, fc2.bias
        self.norm1, self.norm2 = sub("norm1"), sub("norm2")
        blk = _unwrap(model.get_submodule(blk_path))
        self.ls1 = _layer_scale(blk, ("ls1", "ls_1"))
        self.ls2 = _layer_scale(blk, ("ls2", "ls_2"))
        self.act = _activation(model, f"{blk_path}.{tower.block_sites['mlp_in']}")

    @property
    def mlp_hidden(self) -> int:
        """Hidden width of the MLP."""
        return self.fc1_w.shape[0]


def _layer_scale(block: nn.Module, names: tuple[str, ...]) -> Optional[torch.Tensor]:
    for n in names:
        gamma = getattr(getattr(block, n, None), "gamma", None)
        if isinstance(gamma, torch.Tensor):
            return gamma
    return None


def _activation(model: nn.Module, fc1_path: str) -> nn.Module:
    """The activation module next to the MLP's first Linear (timm ``Mlp.act``, open_clip ``mlp.gelu``)."""
    parent_path = fc1_path.rpartition(".")[0]
    parent = _unwrap(model.get_submodule(parent_path))
    skip = (nn.Linear, nn.Dropout, nn.Identity, nn.LayerNorm)
    for m in parent.children():
        m = _unwrap(m)
        if not isinstance(m, skip) and not list(m.parameters()):
            return copy.deepcopy(m)
    return nn.GELU()


# --- the side transformer block -------------------------------------------------------------------------------------

class SideBlock(nn.Module):
    """A pre-norm transformer block at reduced width: ``x + a(ln1(x))``, then ``x + mlp(ln2(x))``.

    Attention runs through ``F.scaled_dot_product_attention`` (fused kernels where available), causal on text
    towers. Layer scale (``gamma1``/``gamma2``) exists only when the backbone block has it.

    Args:
        dim: Residual width.
        num_heads: Attention heads.
        head_dim: Width of each head (``num_heads * head_dim`` need not equal ``dim``).
        mlp_hidden: Hidden width of the MLP.
        act: Activation module (copied from the backbone's MLP).
        eps: LayerNorm epsilon.
        causal: Causal self-attention (text towers).
        qkv_bias, proj_bias, mlp_bias: Whether the projections have biases (as the backbone's do).
        layer_scale: Whether the block has layer-scale vectors.
        dropout: Dropout on the attention and MLP branch outputs.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, mlp_hidden: int, act: nn.Module, eps: float,
                 causal: bool, qkv_bias: bool = True, proj_bias: bool = True, mlp_bias: bool = True,
                 layer_scale: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.causal = num_heads, head_dim, causal
        inner = num_heads * head_dim
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim, bias=proj_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, mlp_hidden, bias=mlp_bias)
        self.act = act
        self.fc2 = nn.Linear(mlp_hidden, dim, bias=mlp_bias)
        self.gamma1 = nn.Parameter(torch.ones(dim)) if layer_scale else None
        self.gamma2 = nn.Parameter(torch.ones(dim)) if layer_scale else None
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The attention branch on the normalised input."""
        n, length, _ = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(a.transpose(1, 2).reshape(n, length, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        a = self.drop(self.attention(self.norm1(x)))
        x = x + (a * self.gamma1 if self.gamma1 is not None else a)
        m = self.drop(self.fc2(self.act(self.fc1(self.norm2(x)))))
        return x + (m * self.gamma2 if self.gamma2 is not None else m)


def side_block_like(parts: BlockParts, dim: int, num_heads: int, head_dim: int, mlp_hidden: int, causal: bool,
                    dropout: float) -> SideBlock:
    """A randomly initialised :class:`SideBlock` with the backbone block's structure (biases, eps, activation,
    layer scale) at the given reduced sizes."""
    w = parts.qkv_w
    blk = SideBlock(dim, num_heads, head_dim, mlp_hidden, parts.act, getattr(parts.norm1, "eps", 1e-6), causal,
                    qkv_bias=parts.qkv_b is not None, proj_bias=parts.proj_b is not None,
                    mlp_bias=parts.fc1_b is not None, layer_scale=parts.ls1 is not None, dropout=dropout)
    return blk.to(device=w.device, dtype=w.dtype)


# --- structured pruning by weight magnitude --------------------------------------------------------------------------

def _l1(w: torch.Tensor, dim: int) -> torch.Tensor:
    return w.detach().abs().sum(dim=dim, dtype=torch.float64)


def top_indices(score: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` highest-scoring indices in ascending index order (ties: the lower index first)."""
    order = torch.sort(score, descending=True, stable=True).indices[:k]
    return torch.sort(order).values


def residual_channels(blocks: list[BlockParts], keep: int) -> torch.Tensor:
    """The ``keep`` residual-stream channels with the largest L1 weight mass over every block.

    A channel's score sums, over all blocks, the L1 norms of the weights that read it (q|k|v and MLP-in columns) and
    that write it (attention-out and MLP-out rows). One set for the whole tower: the side network's residual stream
    runs through all of its blocks.
    """
    score = None
    for p in blocks:
        s = _l1(p.qkv_w, 0) + _l1(p.proj_w, 1) + _l1(p.fc1_w, 0) + _l1(p.fc2_w, 1)
        score = s if score is None else score + s
    return top_indices(score, keep)


def pruned_block_state(parts: BlockParts, channels: torch.Tensor, num_heads: int, head_keep: int,
                       mlp_keep: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Weights of a side block cut out of a backbone block, and the kept indices.

    Residual channels ``channels`` (shared by all blocks). Attention keeps every head and, in each head, the
    ``head_keep`` dimensions with the largest summed L1 norm of their q, k and v rows and attention-out column
    (restricted to the kept channels), the same dimensions for q, k and v. The MLP keeps the ``mlp_keep`` hidden
    units with the largest L1 norm of their MLP-in row plus MLP-out column (restricted to the kept channels).

    Returns:
        (state dict for :class:`SideBlock`, ``{"head_dims": (num_heads * head_keep,) indices into one of q/k/v's
        rows, "mlp": (mlp_keep,) hidden indices}``).
    """
    s = channels
    width = parts.proj_w.shape[0]
    head_dim = width // num_heads
    wq, wk, wv = parts.qkv_w[:width], parts.qkv_w[width:2 * width], parts.qkv_w[2 * width:]
    score = _l1(wq[:, s], 1) + _l1(wk[:, s], 1) + _l1(wv[:, s], 1) + _l1(parts.proj_w[s], 0)
    dims = torch.cat([h * head_dim + top_indices(score[h * head_dim:(h + 1) * head_dim], head_keep)
                      for h in range(num_heads)])
    rows = torch.cat([dims, width + dims, 2 * width + dims])
    hidden = top_indices(_l1(parts.fc1_w[:, s], 1) + _l1(parts.fc2_w[s], 0), mlp_keep)
    sd = {"qkv.weight": parts.qkv_w[rows][:, s], "proj.weight": parts.proj_w[s][:, dims],
          "fc1.weight": parts.fc1_w[hidden][:, s], "fc2.weight": parts.fc2_w[s][:, hidden]}
    for name, t, idx in (("qkv.bias", parts.qkv_b, rows), ("proj.bias", parts.proj_b, s),
                         ("fc1.bias", parts.fc1_b, hidden), ("fc2.bias", parts.fc2_b, s)):
        if t is not None:
            sd[name] = t[idx]
    for prefix, norm in (("norm1", parts.norm1), ("norm2", parts.norm2)):
        sd.update(norm_state(norm, prefix, s))
    if parts.ls1 is not None:
        sd["gamma1"], sd["gamma2"] = parts.ls1[s], parts.ls2[s]
    return {k: v.detach().clone() for k, v in sd.items()}, {"head_dims": dims, "mlp": hidden}


def norm_state(norm: nn.Module, prefix: str, channels: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{prefix}.weight``/``{prefix}.bias`` of a norm cut to ``channels`` (what the norm has of them)."""
    out = {}
    for n in ("weight", "bias"):
        t = getattr(norm, n, None)
        if isinstance(t, torch.Tensor):
            out[f"{prefix}.{n}"] = t.detach()[channels].clone()
    return out


def load_partial(module: nn.Module, state: dict[str, Any]) -> None:
    """Copy ``state`` into ``module``'s tensors of the same names (shapes must match)."""
    own = module.state_dict()
    with torch.no_grad():
        for k, v in state.items():
            if own[k].shape != v.shape:
                raise ValueError(f"pruned tensor {k}: {tuple(v.shape)} vs side block {tuple(own[k].shape)}")
            own[k].copy_(v)


def divisors(n: int) -> list[int]:
    """Positive divisors of ``n`` (for error messages listing valid reduction factors)."""
    return [i for i in range(1, n + 1) if n % i == 0]
