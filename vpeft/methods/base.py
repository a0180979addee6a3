"""The method contract: ``PeftConfig`` (typed, JSON round-trip), ``Method`` (site resolution, shared parameters),
``Adapter`` (the per-site transform), ``ForwardContext`` (per-forward state) and the method registry.

A method is registered once with :func:`register_method`; ``get_peft_model`` then resolves its sites through the
backbone's spec, builds one :class:`Adapter` per site, and installs them into site wrappers
(:mod:`vpeft.methods.layers`). Third parties register more methods the same way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Optional

import torch
import torch.nn as nn

if TYPE_CHECKING:  # pragma: no cover
    from ..backbones import BackboneSpec, Site
    from .layers import AdapterLayer


@dataclass
class PeftConfig:
    """Fields shared by every method config.

    Attributes:
        targets: Site names the method attaches to (``"q"``, ``"mlp_in"``, ``"text.q"``...). ``None`` takes the
            method's paper default.
        layers: Block indices for per-block sites (negative counts from the end); ``None`` means all blocks.
        towers: Towers that unqualified site names resolve on (e.g. ``["visual", "text"]`` for CLIP);
            ``None`` means the backbone's default (the image tower for CLIP).
    """

    method: ClassVar[str] = ""

    targets: Optional[list[str]] = None
    layers: Optional[list[int]] = None
    towers: Optional[list[str]] = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict including the method name (``{"method": "lora", ...}``)."""
        d = dataclasses.asdict(self)
        return {"method": self.method, **{k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> PeftConfig:
        """Rebuild a config from :meth:`to_dict` output; unknown methods or fields raise ``ValueError``."""
        d = dict(d)
        name = d.pop("method", None)
        cls = get_method(name).config_class
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown field(s) {unknown} for method {name!r}; fields: {sorted(known)}")
        return cls(**d)

    def validate(self) -> None:
        """Check field values; raise ``ValueError``/``TypeError`` naming the field and what is accepted."""
        for fname in ("targets", "towers"):
            v = getattr(self, fname)
            if v is not None and (isinstance(v, str) or not all(isinstance(t, str) for t in v)):
                raise TypeError(f"{type(self).__name__}.{fname} must be a list of strings, got {v!r}")
        if self.layers is not None and (isinstance(self.layers, (str, int)) or
                                        not all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers)):
            raise TypeError(f"{type(self).__name__}.layers must be a list of ints, got {self.layers!r}")


class ForwardContext:
    """Per-forward state owned by a ``PeftModel`` and cleared at the start of each top-level call.

    Used for state that crosses sites within one forward: VPT-shallow prompts carried between blocks,
    conditioning computed once and read at many sites, auxiliary losses. Writes are keyed and overwrite, so
    gradient checkpointing (which re-runs blocks) writes the same values again instead of accumulating.
    """

    def __init__(self) -> None:
        self._data: dict[Any, Any] = {}
        #: Conditioning that outlives single forwards (set by ``PeftModel.conditioning``; never reset here).
        self.conditioning: dict[Any, Any] = {}
        self.aux_losses: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        """Forget the per-forward state (called by ``PeftModel`` before each top-level forward); conditioning set by
        ``PeftModel.conditioning`` stays until its ``with`` block ends."""
        self._data.clear()
        self.aux_losses.clear()

    def set(self, key: Any, value: Any) -> None:
        """Store ``value`` under ``key``, replacing any earlier value."""
        self._data[key] = value

    def get(self, key: Any, default: Any = None) -> Any:
        """Return the value stored under ``key`` (per-forward state first, then conditioning) or ``default``."""
        if key in self._data:
            return self._data[key]
        return self.conditioning.get(key, default)

    def __contains__(self, key: Any) -> bool:
        return key in self._data or key in self.conditioning


class Adapter(nn.Module):
    """The per-site part of a method. One instance per (method, site); it lives inside the site's wrapper
    under the method's key, so its parameters have canonical names ``<site path>.<method>.<param>``.

    Output sites (``linear``, ``norm``, ``packed_attn`` q/k/v projection, ``embed``, ``conv``) call
    ``forward(x, y)`` with the site input ``x`` and the current output ``y`` and use its return value.
    Block sites call ``pre(x, ctx)`` before the block and ``post(y, ctx)`` after it.
    """

    #: Whether :meth:`merge` can fold this adapter into the base weights exactly.
    mergeable: ClassVar[bool] = False
    #: Whether the adapter must be the first on its site (its function depends on the raw base weight, e.g. DoRA's
    #: weight norm); ``get_peft_model`` refuses configs that place another method before it.
    must_be_first: ClassVar[bool] = False

    def __init__(self, site: Site) -> None:
        super().__init__()
        self.site = site
        self.__dict__["_shared"] = None  # not registered: shared parameters live once under PeftModel.shared
        self.__dict__["_ctx"] = None  # the owning PeftModel's ForwardContext, set by get_peft_model

    @property
    def shared(self) -> Optional[nn.Module]:
        """The method's shared module (see :meth:`Method.build_shared`), if any."""
        return self.__dict__["_shared"]

    @property
    def ctx(self) -> ForwardContext:
        """The forward context of the ``PeftModel`` this adapter belongs to (for output-site adapters, which are
        called without it)."""
        ctx = self.__dict__["_ctx"]
        if ctx is None:
            raise RuntimeError("this adapter is not attached to a PeftModel (build it with vpeft.get_peft_model)")
        return ctx

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return y

    def fused_forward(self, x: torch.Tensor, base: nn.Module) -> Optional[torch.Tensor]:
        """``forward(x, base(x))`` computed by one fused kernel, or ``None`` to run the two separately.

        Output sites call it on their first active adapter (the only one that sees the base output unchanged) when
        the site is called with ``x`` alone. Adapters with a Triton kernel (``vpeft.kernels``) return its output
        when the kernel dispatch chooses Triton; the default, and the torch path, is ``None``.
        """
        return None

    def pre(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:  # noqa: D102
        return x

    def post(self, y: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:  # noqa: D102
        return y

    def merge(self, layer: AdapterLayer) -> None:
        """Fold this adapter into ``layer``'s base weights in place (only when :attr:`mergeable`)."""
        raise NotImplementedError

    def unmerge(self, layer: AdapterLayer) -> None:
        """Undo :meth:`merge`."""
        raise NotImplementedError


class Method:
    """One application of a config to a model: resolves sites, owns shared parameters, builds adapters.

    Subclasses set :attr:`name`, :attr:`config_class`, :attr:`site_kinds` and implement :meth:`make_adapter`.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[PeftConfig]] = PeftConfig
    #: Default sites when ``config.targets`` is None.
    default_targets: ClassVar[tuple[str, ...]] = ()
    #: Site kinds this method can attach to (see ``vpeft.backbones.SITE_KINDS``).
    site_kinds: ClassVar[tuple[str, ...]] = ("linear",)
    mergeable: ClassVar[bool] = False

    def __init__(self, config: PeftConfig, key: str) -> None:
        self.config = config
        self.key = key

    def targets(self, spec: BackboneSpec) -> list[str]:
        """Target site names: the config's, or the method default."""
        return list(self.config.targets) if self.config.targets is not None else list(self.default_targets)

    def resolve(self, model: nn.Module, spec: BackboneSpec) -> list[Site]:
        """Resolve and validate all sites (no mutation). Raises ``ValueError`` naming the bad site."""
        targets = self.targets(spec)
        if not targets:
            raise ValueError(f"{type(self.config).__name__}: no targets given and the method has no default")
        sites: list[Site] = []
        for name in targets:
            for site in spec.resolve(model, name, self.config.towers, self.config.layers):
                self.check_site(model, spec, site)
                sites.append(site)
        return sites

    def check_site(self, model: nn.Module, spec: BackboneSpec, site: Site) -> None:
        """Refuse sites this method cannot handle (``ValueError`` naming the path and the accepted sites)."""
        if site.kind not in self.site_kinds:
            raise ValueError(
                f"method {self.name!r} cannot attach to site {site.qualified!r} at {site.path!r} "
                f"(a {site.kind} module); it supports {list(self.site_kinds)} sites")

    def build_shared(self, model: nn.Module, spec: BackboneSpec, sites: list[Site]) -> Optional[nn.Module]:
        """Parameters shared across sites (stored once as ``_shared.<method>.*``); ``None`` if there are none."""
        return None

    def group_sites(self, sites: list[Site]) -> list[list[Site]]:
        """Group sites that share one module (q and v of one fused qkv) into one adapter; default: by path."""
        groups: dict[str, list[Site]] = {}
        for s in sites:
            groups.setdefault(s.path, []).append(s)
        return list(groups.values())

    def make_adapter(self, model: nn.Module, spec: BackboneSpec, sites: list[Site],
                     module: nn.Module, shared: Optional[nn.Module]) -> Adapter:
        """Build the adapter for the module at ``sites[0].path`` (all ``sites`` share that path)."""
        raise NotImplementedError


# --- registry ---------------------------------------------------------------------------------------------------------

_METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator registering a :class:`Method` under ``cls.name`` (open string keys)."""
    if not cls.name or cls.config_class is PeftConfig:
        raise TypeError(f"{cls.__name__} needs a non-empty `name` and its own `config_class`")
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise ValueError(f"a method named {cls.name!r} is already registered ({_METHODS[cls.name].__name__})")
    cls.config_class.method = cls.name
    _METHODS[cls.name] = cls
    return cls


def _ensure_builtin() -> None:
    from . import (  # noqa: F401
        adaptformer,
        bitfit,
        block_lora,
        cocoop,
        comp_lora,
        compacter,
        coop,
        dapt,
        dora,
        earth_adapter,
        idpt,
        ivlp,
        lora,
        lst,
        maple,
        mask,
        mosa,
        nola,
        point_peft,
        promptsrc,
        spt,
        ssf,
        unipt,
        vpt,
    )


def get_method(name: Optional[str]) -> type[Method]:
    """The registered :class:`Method` class for ``name``; ``ValueError`` listing the registered names."""
    _ensure_builtin()
    if name not in _METHODS:
        raise ValueError(f"unknown PEFT method {name!r}; registered methods: {sorted(_METHODS)}")
    return _METHODS[name]


def list_methods() -> list[str]:
    """Names of all registered methods."""
    _ensure_builtin()
    return sorted(_METHODS)


def method_for_config(config: Any) -> type[Method]:
    """The method class of a config instance; ``TypeError`` for anything that is not a registered config."""
    _ensure_builtin()
    if not isinstance(config, PeftConfig):
        raise TypeError(f"expected a vpeft PeftConfig (e.g. LoraConfig), got {type(config).__name__}; "
                        f"registered methods: {sorted(_METHODS)}")
    return get_method(type(config).method)


__all__ = ["Adapter", "ForwardContext", "Method", "PeftConfig", "get_method", "list_methods", "register_method",
           "field"]
