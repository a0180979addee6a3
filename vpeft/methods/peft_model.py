"""``get_peft_model`` (check, then mutate) and ``PeftModel`` (enable/disable, merge, unload, adapter I/O)."""

from __future__ import annotations

import contextlib
import functools
import re
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..backbones import BackboneSpec, get_spec
from . import _io
from .base import Adapter, ForwardContext, Method, PeftConfig, method_for_config
from .layers import AdapterLayer, PackedAttentionLayer, Runtime, get_parent, wrapper_class

_BASE_SEG = re.compile(r"(^|\.)base_layer(?=\.)")


def canonical_name(name: str) -> str:
    """Drop wrapper segments: ``blocks.0.attn.qkv.base_layer.weight`` -> ``blocks.0.attn.qkv.weight``."""
    return _BASE_SEG.sub("", name).lstrip(".")


def _entry(fn):
    """Reset the forward context at the start of each top-level call (nested calls share it)."""

    @functools.wraps(fn)
    def wrapper(self: PeftModel, *args, **kwargs):
        if self._depth == 0:
            self.runtime.ctx.reset()
        self._depth += 1
        try:
            return fn(self, *args, **kwargs)
        finally:
            self._depth -= 1

    return wrapper


class PeftModel(nn.Module):
    """A backbone with adapters attached. Build it with :func:`get_peft_model` or :meth:`from_pretrained`.

    Calls to ``forward``, ``forward_features``, ``forward_head``, ``forward_intermediates``, ``encode_image`` and
    ``encode_text`` run the wrapped backbone's methods of the same name; other attributes fall through to it.
    """

    def __init__(self, model: nn.Module, spec: BackboneSpec, runtime: Runtime) -> None:
        super().__init__()
        self.base_model = model
        self.shared = nn.ModuleDict()
        self.spec = spec
        self.runtime = runtime
        self.configs: list[PeftConfig] = []
        self.method_keys: list[str] = []
        self.trainable_extra: list[str] = []
        self.fingerprint = ""
        self._layers: dict[str, AdapterLayer] = {}
        self._requires_grad: dict[str, bool] = {}
        self._depth = 0
        self._unloaded = False

    def train(self, mode: bool = True) -> PeftModel:
        """Set train/eval mode; frozen BatchNorm layers of the backbone stay in eval mode.

        A BatchNorm whose parameters do not train would otherwise keep updating its running statistics in train mode,
        so the frozen backbone would change (and an adapter file would not reproduce the trained model). BatchNorm
        layers that train (inside a trainable extra such as a new head) follow ``mode``, and their statistics are
        saved with the extra.
        """
        super().train(mode)
        if mode:
            for m in self.base_model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(
                        p.requires_grad for p in m.parameters(recurse=False)):
                    m.eval()
        return self

    # -- delegation ------------------------------------------------------------------------------------------------
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "shared"):
                raise
            return getattr(self._modules["base_model"], name)

    @_entry
    def forward(self, *args, **kwargs):  # noqa: D102
        return self.base_model(*args, **kwargs)

    @_entry
    def forward_features(self, *args, **kwargs):  # noqa: D102
        return self.base_model.forward_features(*args, **kwargs)

    @_entry
    def forward_head(self, *args, **kwargs):  # noqa: D102
        return self.base_model.forward_head(*args, **kwargs)

    @_entry
    def forward_intermediates(self, *args, **kwargs):  # noqa: D102
        return self.base_model.forward_intermediates(*args, **kwargs)

    @_entry
    def encode_image(self, *args, **kwargs):  # noqa: D102
        return self.base_model.encode_image(*args, **kwargs)

    @_entry
    def encode_text(self, *args, **kwargs):  # noqa: D102
        return self.base_model.encode_text(*args, **kwargs)

    @contextlib.contextmanager
    def conditioning(self, **values) -> Iterator[PeftModel]:
        """Make ``values`` visible to adapters (``ctx.get(name)``) in every forward inside the ``with`` block.

        Used for inputs that are not tensors of the wrapped call, e.g. the class of each text row for
        class-specific prompts (``text_class_index``) or CoCoOp's image features (``image_features``). Values set
        by an enclosing block are restored on exit.
        """
        cond = self.runtime.ctx.conditioning
        saved = {k: cond[k] for k in values if k in cond}
        cond.update(values)
        try:
            yield self
        finally:
            for k in values:
                cond.pop(k, None)
            cond.update(saved)

    @property
    def ctx(self) -> ForwardContext:
        """The forward context of the current (or last) forward."""
        return self.runtime.ctx

    # -- inspection ------------------------------------------------------------------------------------------------
    def adapter_layers(self) -> dict[str, AdapterLayer]:
        """Site path -> wrapper, for every wrapped site."""
        return dict(self._layers)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameters (each shared tensor once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def print_trainable_parameters(self) -> str:
        """Print and return ``"trainable: 303,104 / 86,101,801 (0.35%)"``."""
        t, n = self.num_parameters(True), self.num_parameters()
        line = f"trainable: {t:,} / {n:,} ({100.0 * t / max(n, 1):.2f}%)"
        print(line)
        return line

    # -- switches --------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def disabled(self) -> Iterator[PeftModel]:
        """Run the plain backbone inside the block (bit-identical outputs). Refused while merged."""
        if self.merged:
            raise ValueError("adapters are merged into the base weights; call unmerge() before disabled()")
        prev = self.runtime.enabled
        self.runtime.enabled = False
        try:
            yield self
        finally:
            self.runtime.enabled = prev

    @property
    def merged(self) -> bool:
        """Whether any adapter is currently merged."""
        return any(layer.merged_keys for layer in self._layers.values())

    def merge(self) -> None:
        """Fold every adapter into the base weights, inside-out in application order.

        Raises:
            ValueError: some attached method is not mergeable (nothing is merged then).
        """
        self._check_live()
        bad = sorted({f"{k} at {p}" for p, layer in self._layers.items() for k, a in layer.adapters()
                      if not a.mergeable})
        if bad:
            raise ValueError(f"cannot merge: these adapters are not mergeable: {bad[:6]}"
                             f"{' ...' if len(bad) > 6 else ''}")
        with torch.no_grad():
            for layer in self._layers.values():
                for k, a in layer.adapters():
                    if k not in layer.merged_keys:
                        a.merge(layer)
                        layer.merged_keys.append(k)

    def unmerge(self) -> None:
        """Undo :meth:`merge` (outside-in). Exact up to float rounding of the inverse operations."""
        self._check_live()
        with torch.no_grad():
            for layer in self._layers.values():
                for k in reversed(list(layer.merged_keys)):
                    getattr(layer, k).unmerge(layer)
                    layer.merged_keys.remove(k)

    def unload(self) -> nn.Module:
        """Remove all wrappers (unmerging first) and return the backbone with its original keys and values."""
        self._check_live()
        if self.merged:
            self.unmerge()
        return self._strip()

    def merge_and_unload(self) -> nn.Module:
        """Merge, then remove all wrappers: a plain timm/open_clip module with the original state-dict keys."""
        self.merge()
        return self._strip()

    def _strip(self) -> nn.Module:
        # Deepest paths first, so a wrapper inside another wrapper's base is replaced before its host.
        for path in sorted(self._layers, key=lambda p: -p.count(".")):
            parent, name = get_parent(self.base_model, path)
            setattr(parent, name, self._layers[path].base_layer)
        for name, p in self.base_model.named_parameters():
            p.requires_grad_(self._requires_grad.get(name, p.requires_grad))
        self._layers.clear()
        self._unloaded = True
        model = self.base_model
        return model

    def _check_live(self) -> None:
        if self._unloaded:
            raise ValueError("this PeftModel was unloaded; build a new one with get_peft_model()")

    # -- adapter state ---------------------------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Adapter tensors (and declared extras) under canonical keys: ``<site path>.<method>.<param>``,
        ``_shared.<method>.<param>``, and the original key of each extra tensor (e.g. ``head.weight``)."""
        out: dict[str, torch.Tensor] = {}
        for path, layer in self._layers.items():
            for key, adapter in layer.adapters():
                for pname, t in adapter.state_dict(keep_vars=True).items():
                    out[f"{path}.{key}.{pname}"] = t.detach()
        for key, mod in self.shared.items():
            for pname, t in mod.state_dict(keep_vars=True).items():
                out[f"_shared.{key}.{pname}"] = t.detach()
        for name, t in self._extra_tensors().items():
            out[name] = t.detach()
        return out

    def _extra_tensors(self) -> dict[str, torch.Tensor]:
        """Parameters and persistent buffers (e.g. a new head's BatchNorm statistics) of the declared extras."""
        if not self.trainable_extra:
            return {}
        prefixes = _extra_prefixes(self.base_model, self.spec, self.trainable_extra)
        adapter_ids = {id(t) for layer in self._layers.values() for _, a in layer.adapters()
                       for t in (*a.parameters(), *a.buffers())}
        # state_dict holds exactly the parameters and the persistent buffers
        return {cname: t for name, t in self.base_model.state_dict(keep_vars=True).items()
                if id(t) not in adapter_ids and _under(cname := canonical_name(name), prefixes)}

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy ``state`` into the adapters. Keys and shapes must match exactly (``ValueError`` with the diff)."""
        own = self.adapter_state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"adapter keys do not match this model: missing {_few(missing)}, "
                             f"unexpected {_few(unexpected)}")
        bad = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
               for k in own if state[k].shape != own[k].shape]
        if bad:
            raise ValueError(f"adapter tensor shapes do not match: {_few(bad)}")
        with torch.no_grad():
            for k, t in own.items():
                t.copy_(state[k])

    def save_adapter(self, directory: str) -> None:
        """Write ``vpeft_config.json`` and ``adapter_model.safetensors`` (adapter tensors only) to ``directory``."""
        self._check_live()
        _io.save_adapter(self, directory)

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str) -> PeftModel:
        """Attach the adapter saved in ``directory`` to a freshly built ``model``.

        Raises:
            ValueError: missing/corrupt files, a backbone whose fingerprint differs from the one the adapter was
                saved from, or adapter keys/shapes that do not match. ``model`` is left untouched on error.
        """
        return _io.load_adapter(model, directory)


def _few(items: list, n: int = 8) -> str:
    return str(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def _under(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _extra_prefixes(model: nn.Module, spec: BackboneSpec, extras: Sequence[str]) -> list[str]:
    """Module paths of declared extras: spec site names (``head``, ``final_norm``) or plain module/param paths."""
    out = []
    names = dict(model.named_modules())
    params = {n for n, _ in model.named_parameters()}
    for e in extras:
        tower, base = spec.split_name(e)
        tnames = [tower] if tower is not None else list(spec.default_towers)
        paths = [spec.towers[t].global_sites[base] for t in tnames
                 if t in spec.towers and base in spec.towers[t].global_sites]
        if paths:
            out += paths
        elif e in names or e in params:
            out.append(e)
        else:
            raise ValueError(f"trainable_extra {e!r} is neither a site of this backbone ({spec.available()}) nor a "
                             "module or parameter path of the model")
    return out


def _method_key(cls: type[Method], used: set[str]) -> str:
    key, i = cls.name, 2
    while key in used:
        key, i = f"{cls.name}_{i}", i + 1
    return key


def get_peft_model(
        model: nn.Module,
        configs: Union[PeftConfig, Sequence[PeftConfig]],
        trainable_extra: Sequence[str] = (),
) -> PeftModel:
    """Attach one or more PEFT methods to a backbone.

    Everything is checked first (configs, sites, shapes, capabilities); only then is the model changed, so an error
    leaves it untouched. Configs apply in order; several methods on one site run in that order.

    Args:
        model: A backbone with a registered spec (timm ViT, open_clip CLIP or one of its towers).
        configs: A config or a list of configs (an empty list gives a linear probe with ``trainable_extra``).
        trainable_extra: Sites or module/parameter paths that train alongside the adapters and are saved with
            them, e.g. ``["head"]`` for a new classifier.

    Returns:
        The :class:`PeftModel`. Backbone parameters are frozen; adapter and extra parameters train.
    """
    if isinstance(model, PeftModel):
        raise TypeError("model is already a PeftModel; pass all configs in one get_peft_model call")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    configs = [configs] if isinstance(configs, PeftConfig) else list(configs)
    if isinstance(trainable_extra, str):
        trainable_extra = [trainable_extra]
    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        raise ValueError("model already holds vpeft adapter wrappers; unload() the previous PeftModel first")
    spec = get_spec(model)
    runtime = Runtime()

    # ---- check: resolve everything and build every adapter without touching the model ----
    plan: list[tuple[str, Method, Optional[nn.Module], list[tuple[list, Adapter]]]] = []
    used: set[str] = set()
    on_site: dict[str, list[str]] = {}
    for cfg in configs:
        cls = method_for_config(cfg)
        cfg.validate()
        key = _method_key(cls, used)
        used.add(key)
        method = cls(cfg, key)
        sites = method.resolve(model, spec)
        shared = method.build_shared(model, spec, sites)
        built = []
        for group in method.group_sites(sites):
            adapter = method.make_adapter(model, spec, group, model.get_submodule(group[0].path), shared)
            adapter.__dict__["_shared"] = shared
            adapter.__dict__["_ctx"] = runtime.ctx
            before = on_site.setdefault(group[0].path, [])
            if adapter.must_be_first and before:
                raise ValueError(f"method {key!r} must be the first method on site {group[0].path!r}, but {before} "
                                 f"come(s) before it; list {key!r} first in the configs")
            before.append(key)
            built.append((group, adapter))
        plan.append((key, method, shared, built))
    extra_prefixes = _extra_prefixes(model, spec, list(trainable_extra))
    fingerprint = _io.fingerprint(model)
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}

    # ---- mutate ----
    pm = PeftModel(model, spec, runtime)
    pm.configs, pm.trainable_extra, pm.fingerprint = configs, list(trainable_extra), fingerprint
    pm._requires_grad = requires_grad
    for p in model.parameters():
        p.requires_grad_(False)
    for key, _method, shared, built in plan:
        pm.method_keys.append(key)
        if shared is not None:
            pm.shared[key] = shared
        for group, adapter in built:
            site = group[0]
            if site.host is not None:
                _install(pm, site.host, "packed_attn", site)
            layer = _install(pm, site.path, site.kind, site)
            layer.add_adapter(key, adapter)
    for name, p in model.named_parameters():
        if _under(canonical_name(name), extra_prefixes):
            p.requires_grad_(True)
    for layer in pm._layers.values():
        for _, a in layer.adapters():
            for p in a.parameters():
                p.requires_grad_(True)
    for p in pm.shared.parameters():
        p.requires_grad_(True)
    pm.train(model.training)  # new adapters (and their dropout) follow the backbone's mode
    return pm


def _install(pm: PeftModel, path: str, kind: str, site) -> AdapterLayer:
    if path in pm._layers:
        return pm._layers[path]
    parent, name = get_parent(pm.base_model, path)
    module = getattr(parent, name)
    cls = wrapper_class(kind)
    if cls is PackedAttentionLayer and site.path != path:  # a host for out_proj only
        from ..backbones import Site

        site = Site("attn", site.tower, site.layer, path, "packed_attn")
    layer = cls(module, site, pm.runtime)
    setattr(parent, name, layer)
    pm._layers[path] = layer
    return layer
