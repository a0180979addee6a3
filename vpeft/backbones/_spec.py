"""Backbone specs: the map from semantic site names to the module paths of one backbone family.

A method never names ``blocks.3.attn.qkv`` or ``transformer.resblocks.3.attn``; it asks the spec for the
``q`` site of layer 3 and receives a :class:`Site` holding the path, the kind of module found there and, for
the q/k/v slices of a fused projection, the output slice. A new backbone family is one new spec builder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch.nn as nn

#: Semantic names of per-block sites.
#: ``mlp`` is the whole MLP sub-module (input: the ``norm2`` output; output: what the residual adds), the site of
#: parallel adapters such as AdaptFormer.
BLOCK_SITES = ("block", "norm1", "qkv", "q", "k", "v", "attn_out", "norm2", "mlp", "mlp_in", "mlp_out")
#: Semantic names of per-tower (not per-block) sites.
GLOBAL_SITES = ("embed", "pre_norm", "final_norm", "head")
ALL_SITES = GLOBAL_SITES[:2] + BLOCK_SITES + GLOBAL_SITES[2:]

#: How a tower computes q, k and v (see :attr:`TowerSpec.attention`).
ATTENTION_KINDS = ("fused_linear", "packed", "separate")

#: Kinds of module a site can hold. ``packed_attn`` is an attention module whose q/k/v projection is a packed
#: ``in_proj_weight`` Parameter (``nn.MultiheadAttention`` or open_clip's ``Attention``), not a Linear.
SITE_KINDS = ("linear", "norm", "packed_attn", "block", "embed", "conv", "other")


@dataclass(frozen=True)
class Site:
    """One resolved attachment point.

    Attributes:
        name: Semantic site name (``"q"``, ``"mlp_in"``, ...).
        tower: Tower name (``"visual"``, ``"text"``; ``""`` for single-tower backbones).
        layer: Block index for per-block sites, else ``None``.
        path: Dotted path of the module that a wrapper replaces.
        kind: Kind of that module, one of :data:`SITE_KINDS`.
        out_slice: For q/k/v of a fused projection: ``(start, stop)`` of the fused output; else ``None`` (also for
            q/k/v of ``"separate"`` attention, where each is a whole Linear).
        host: Path of a packed attention module that must run through vpeft's re-implementation for this
            site to take effect (``out_proj`` of ``nn.MultiheadAttention`` is read as a weight, not called).
    """

    name: str
    tower: str
    layer: Optional[int]
    path: str
    kind: str
    out_slice: Optional[tuple[int, int]] = None
    host: Optional[str] = None

    @property
    def qualified(self) -> str:
        """The site name qualified with its tower, e.g. ``"text.q"``."""
        return f"{self.tower}.{self.name}" if self.tower else self.name


@dataclass(frozen=True)
class TowerSpec:
    """Where one transformer tower keeps its parts.

    Attributes:
        name: Tower name (``""`` for single-tower models).
        depth: Number of blocks.
        width: Token width.
        num_heads: Attention heads per block.
        block: Path template of block ``i``, e.g. ``"blocks.{i}"``; ``""`` when :attr:`block_paths` lists the blocks.
        block_sites: Semantic name -> path relative to a block (``norm1``, ``attn``, ``attn_out``, ...).
            ``attn`` names the attention module; ``qkv`` the fused Linear when attention is ``"fused_linear"``;
            ``q``/``k``/``v`` the three Linears when attention is ``"separate"``.
        global_sites: Semantic name -> absolute path (``embed``, ``final_norm``, ``head``, ...).
        attention: How q, k and v are computed. ``"fused_linear"`` (timm: one ``qkv`` Linear; ``q``/``k``/``v`` are
            its output slices, ``qkv`` the whole Linear), ``"packed"`` (open_clip: ``in_proj_weight``; ``q``/``k``/``v``
            are its row slices) or ``"separate"`` (three Linears at ``block_sites["q"]``, ``["k"]``, ``["v"]``, e.g.
            SAM's mask decoder; each is a whole-Linear site with no output slice, and there is no ``qkv`` site).
        layout: Token layout of block inputs: ``"NLC"`` (batch, tokens, channels).
        num_prefix_tokens: Class/register tokens before the patch tokens.
        causal: Whether blocks run under a causal mask of fixed length (text towers).
        embed_channel_dim: Channel dimension of the embed site's output (-1 for tokens, 1 for a conv map).
        block_paths: Explicit absolute paths of blocks ``0..depth-1`` (in this order) instead of the :attr:`block`
            template, for towers whose "blocks" are not one indexed list (SAM's mask decoder: its seven attention
            modules). ``layers=[...]`` indexes this tuple.
        block_site: Whether each block is a ``block`` site (a transformer block mapping a token sequence to a token
            sequence, where token and side-network methods attach). False for towers whose blocks are bare attention
            modules taking separate query, key and value inputs.
    """

    name: str
    depth: int
    width: int
    num_heads: int
    block: str
    block_sites: dict[str, str]
    global_sites: dict[str, str] = field(default_factory=dict)
    attention: str = "fused_linear"
    layout: str = "NLC"
    num_prefix_tokens: int = 1
    causal: bool = False
    embed_channel_dim: int = -1
    block_paths: Optional[tuple[str, ...]] = None
    block_site: bool = True

    def __post_init__(self) -> None:
        # Spec builders are code, but a wrong spec would mis-place adapters silently: refuse it at construction.
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"TowerSpec {self.name!r}: attention must be one of {ATTENTION_KINDS}, "
                             f"got {self.attention!r}")
        if self.block_paths is not None:
            if not isinstance(self.block_paths, tuple) or not all(isinstance(p, str) for p in self.block_paths):
                raise TypeError(f"TowerSpec {self.name!r}: block_paths must be a tuple of str, got "
                                f"{self.block_paths!r}")
            if len(self.block_paths) != self.depth or self.block:
                raise ValueError(f"TowerSpec {self.name!r}: block_paths needs one path per block (depth "
                                 f"{self.depth}, got {len(self.block_paths)}) and block='' (got {self.block!r})")
        if self.attention == "separate" and "qkv" in self.block_sites:
            raise ValueError(f"TowerSpec {self.name!r}: attention='separate' has no fused 'qkv' site; name the "
                             "q, k and v Linears in block_sites")

    def block_path(self, i: int) -> str:
        """Absolute path of block ``i`` (``0 <= i < depth``): ``block_paths[i]``, else the :attr:`block` template.

        Raises:
            ValueError: ``i`` is not a block index of this tower.
        """
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.depth:
            raise ValueError(f"block index {i!r} out of range for tower {self.name or '(main)'!r} "
                             f"(valid: 0..{self.depth - 1})")
        if self.block_paths is not None:
            return self.block_paths[i]
        return self.block.format(i=i)

    def site_names(self) -> list[str]:
        """Semantic names available on this tower."""
        names = [n for n in GLOBAL_SITES if n in self.global_sites]
        if self.attention == "separate":
            qkv = tuple(n for n in ("q", "k", "v") if n in self.block_sites)
        else:  # slices of the fused or packed projection (always present)
            qkv = ("q", "k", "v", "qkv")
        names += (["block"] if self.block_site else []) + list(qkv)
        names += [n for n in self.block_sites if n not in ("block", "q", "k", "v", "qkv")]  # ``attn`` is no site
        return [n for n in ALL_SITES if n in names]


def _module_kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or type(module).__name__ in ("LayerNorm", "LayerNorm2d"):
        return "norm"
    if isinstance(module, nn.MultiheadAttention) or isinstance(getattr(module, "in_proj_weight", None), nn.Parameter):
        return "packed_attn"
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):  # Conv1d: the point-cloud patch embedding's last layer
        return "conv"
    if isinstance(module, nn.Embedding):
        return "embed"
    return "other"


@dataclass(frozen=True)
class BackboneSpec:
    """The site map of one backbone instance.

    Attributes:
        family: Backbone family (``"timm_vit"``, ``"open_clip"``, ...).
        towers: Tower name -> :class:`TowerSpec`, in order.
        default_towers: Towers an unqualified site name (``"q"``) resolves on. For CLIP this is the image
            tower only; write ``"text.q"`` (or pass ``towers=["visual", "text"]``) to reach the text tower.
    """

    family: str
    towers: dict[str, TowerSpec]
    default_towers: tuple[str, ...]

    def split_name(self, name: str) -> tuple[Optional[str], str]:
        """Split ``"text.q"`` into ``("text", "q")``; an unqualified name gives ``(None, name)``."""
        if "." in name:
            tower, base = name.split(".", 1)
            return tower, base
        return None, name

    def available(self) -> list[str]:
        """All qualified site names of this backbone."""
        out = []
        for tname, tower in self.towers.items():
            out += [f"{tname}.{n}" if tname else n for n in tower.site_names()]
        return out

    def resolve(
            self,
            model: nn.Module,
            name: str,
            towers: Optional[Sequence[str]] = None,
            layers: Optional[Sequence[int]] = None,
    ) -> list[Site]:
        """Resolve one semantic (optionally tower-qualified) site name to concrete sites.

        Args:
            model: The backbone the spec was built from.
            name: Site name, e.g. ``"q"``, ``"mlp_in"`` or ``"text.norm1"``.
            towers: Towers for unqualified names (default: :attr:`default_towers`).
            layers: Block indices for per-block sites (default: all). Negative indices count from the end.

        Raises:
            ValueError: unknown name, tower or layer index, with the accepted values.
        """
        tower_name, base = self.split_name(name)
        if tower_name is not None:
            if tower_name not in self.towers:
                raise ValueError(
                    f"site {name!r}: backbone {self.family!r} has no tower {tower_name!r}; "
                    f"towers: {sorted(t for t in self.towers if t)}")
            tower_names = [tower_name]
        else:
            tower_names = list(towers) if towers is not None else list(self.default_towers)
            bad = [t for t in tower_names if t not in self.towers]
            if bad:
                raise ValueError(f"unknown tower(s) {bad} for backbone {self.family!r}; towers: {list(self.towers)}")
        sites: list[Site] = []
        for tname in tower_names:
            tower = self.towers[tname]
            if base not in tower.site_names():
                raise ValueError(
                    f"site {name!r} does not exist on {self.family!r} tower {tname or '(main)'!r}; "
                    f"available sites: {self.available()}")
            if base in GLOBAL_SITES:
                path = tower.global_sites[base]
                sites.append(Site(base, tname, None, path, _module_kind(model.get_submodule(path))))
                continue
            for i in _layer_indices(layers, tower.depth, name):
                sites.append(self._block_site(model, tower, base, i))
        return sites

    def _block_site(self, model: nn.Module, tower: TowerSpec, base: str, i: int) -> Site:
        blk = tower.block_path(i)
        if base == "block":
            return Site(base, tower.name, i, blk, "block")
        if base in ("q", "k", "v", "qkv") and tower.attention != "separate":
            d = tower.width
            sl = None if base == "qkv" else ("qkv".index(base) * d, ("qkv".index(base) + 1) * d)
            if tower.attention == "fused_linear":
                return Site(base, tower.name, i, f"{blk}.{tower.block_sites['qkv']}", "linear", sl)
            return Site(base, tower.name, i, f"{blk}.{tower.block_sites['attn']}", "packed_attn", sl)
        path = f"{blk}.{tower.block_sites[base]}"
        host = None
        if base == "attn_out" and tower.attention == "packed":
            host = f"{blk}.{tower.block_sites['attn']}"
        return Site(base, tower.name, i, path, _module_kind(model.get_submodule(path)), None, host)


def _layer_indices(layers: Optional[Sequence[int]], depth: int, name: str) -> list[int]:
    if layers is None:
        return list(range(depth))
    out = []
    for i in layers:
        if not isinstance(i, int) or isinstance(i, bool):
            raise TypeError(f"layers must be integers, got {i!r} for site {name!r}")
        j = i + depth if i < 0 else i
        if not 0 <= j < depth:
            raise ValueError(f"layer index {i} out of range for site {name!r}: the tower has {depth} blocks "
                             f"(valid: 0..{depth - 1} or -{depth}..-1)")
        out.append(j)
    return sorted(set(out))


# --- registry of spec builders, matched by model class --------------------------------------------------------------

_SPEC_BUILDERS: list[tuple[Callable[[nn.Module], bool], Callable[[nn.Module], BackboneSpec]]] = []


def register_spec(match: Callable[[nn.Module], bool]):
    """Register a spec builder for models for which ``match(model)`` is true (decorator)."""

    def deco(fn: Callable[[nn.Module], BackboneSpec]):
        _SPEC_BUILDERS.append((match, fn))
        return fn

    return deco


def get_spec(model: nn.Module) -> BackboneSpec:
    """Build the :class:`BackboneSpec` of ``model``.

    Raises:
        TypeError: the model's class has no registered spec.
    """
    from . import open_clip as _oc  # noqa: F401  (import registers the builders)

    for match, build in _SPEC_BUILDERS:
        if match(model):
            return build(model)
    raise TypeError(
        f"no backbone spec for model class {type(model).__module__}.{type(model).__name__}; supported: timm "
        "VisionTransformer, open_clip CLIP / VisionTransformer / TextTransformer, SAM (vpeft SamModel, timm "
        "VisionTransformerSAM), Point-MAE / Point-BERT (vpeft PointTransformer) (register more with register_spec)")
