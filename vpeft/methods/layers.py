"""Site wrappers. One wrapper replaces the module at a site, keeps it as ``base_layer`` (the HF peft pattern),
and runs the adapters of every method attached there, in the order the configs were applied.

Disabled or fully merged wrappers call ``base_layer`` directly, so outputs are bit-identical to the backbone.
Attribute reads that the wrapper does not define fall through to ``base_layer`` (``weight``, ``in_proj_weight``,
``num_heads``...), so code that inspects the original module keeps working.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Adapter, ForwardContext

if TYPE_CHECKING:  # pragma: no cover
    from ..backbones import Site


class Runtime:
    """State shared by all wrappers of one ``PeftModel``: the enabled switch and the forward context."""

    def __init__(self) -> None:
        self.enabled = True
        self.ctx = ForwardContext()


class AdapterLayer(nn.Module):
    """Base wrapper. Subclasses define ``forward``; adapters are children named by method key."""

    def __init__(self, base_layer: nn.Module, site: Site, runtime: Runtime) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.site = site
        self.__dict__["_runtime"] = runtime
        self.adapter_keys: list[str] = []
        self.merged_keys: list[str] = []

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self._modules["base_layer"], name)

    def add_adapter(self, key: str, adapter: Adapter) -> None:
        """Attach ``adapter`` under ``key`` (after the ones already here)."""
        self.add_module(key, adapter)
        self.adapter_keys.append(key)

    def remove_adapter(self, key: str) -> None:
        """Detach the adapter under ``key``."""
        self.adapter_keys.remove(key)
        delattr(self, key)

    def adapters(self) -> list[tuple[str, Adapter]]:
        """All (key, adapter) pairs in application order."""
        return [(k, getattr(self, k)) for k in self.adapter_keys]

    def active(self) -> list[Adapter]:
        """Adapters that run in this forward: none when disabled, and none of the merged ones."""
        if not self._runtime.enabled:
            return []
        return [getattr(self, k) for k in self.adapter_keys if k not in self.merged_keys]

    def extra_repr(self) -> str:
        return f"site={self.site.qualified!r}, adapters={self.adapter_keys}, merged={self.merged_keys}"


class OutputLayer(AdapterLayer):
    """Wrapper for modules whose output the adapters transform: Linear, LayerNorm, patch conv, embedding."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        active = self.active()
        y = active[0].fused_forward(x, self.base_layer) if active and not args and not kwargs else None
        if y is None:
            y = self.base_layer(x, *args, **kwargs)
        else:  # the first adapter ran fused with the base module
            active = active[1:]
        for a in active:
            y = a(x, y)
        return y


class BlockLayer(AdapterLayer):
    """Wrapper for transformer blocks: ``pre`` hooks see the block input, ``post`` hooks its output."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        active = self.active()
        ctx = self._runtime.ctx
        for a in active:
            x = a.pre(x, ctx)
        y = self.base_layer(x, *args, **kwargs)
        for a in reversed(active):
            y = a.post(y, ctx)
        return y


class PackedAttentionLayer(AdapterLayer):
    """Wrapper for attention with a packed ``in_proj_weight`` (``nn.MultiheadAttention`` or open_clip's
    ``Attention``). Adapters transform the fused q|k|v projection output. When no adapter here or on the
    wrapped ``out_proj`` is active, the original module runs untouched (bit-identical); otherwise vpeft's
    re-implementation of the same self-attention runs so that the projections pass through the adapters.
    """

    def _out_proj_active(self) -> bool:
        out_proj = self.base_layer.out_proj
        return isinstance(out_proj, AdapterLayer) and bool(out_proj.active())

    def forward(self, *args, **kwargs):
        active = self.active()
        if not active and not self._out_proj_active():
            return self.base_layer(*args, **kwargs)
        attn = self.base_layer

        def in_proj(x: torch.Tensor) -> torch.Tensor:
            y = active[0].fused_forward(x, attn) if active else None
            rest = active[1:] if y is not None else active
            if y is None:
                y = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
            for a in rest:
                y = a(x, y)
            return y

        if isinstance(attn, nn.MultiheadAttention):
            return _mha_forward(attn, in_proj, *args, **kwargs)
        return _oc_attention_forward(attn, in_proj, *args, **kwargs)


def _mha_forward(attn: nn.MultiheadAttention, in_proj, query, key=None, value=None, key_padding_mask=None,
                 need_weights: bool = True, attn_mask: Optional[torch.Tensor] = None,
                 average_attn_weights: bool = True, is_causal: bool = False):
    """Self-attention of ``nn.MultiheadAttention`` with the in-projection routed through ``in_proj``."""
    if (key is not None and key is not query) or (value is not None and value is not query):
        raise ValueError("vpeft adapters on nn.MultiheadAttention support self-attention only (query is key is "
                         "value); this call passes different key/value tensors")
    if key_padding_mask is not None or attn.bias_k is not None or attn.add_zero_attn or not attn._qkv_same_embed_dim:
        raise ValueError("vpeft adapters on nn.MultiheadAttention do not support key_padding_mask, add_bias_kv, "
                         "add_zero_attn or separate q/k/v projection weights")
    x = query if attn.batch_first else query.transpose(0, 1)
    n, length, c = x.shape
    h = attn.num_heads
    q, k, v = in_proj(x).view(n, length, 3, h, c // h).permute(2, 0, 3, 1, 4).unbind(0)
    mask = _float_mask(attn_mask, q.dtype, n, h, length)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=attn.dropout if attn.training else 0.0,
                                         is_causal=is_causal and mask is None)
    out = attn.out_proj(out.transpose(1, 2).reshape(n, length, c))
    if not attn.batch_first:
        out = out.transpose(0, 1)
    return out, None


def _float_mask(attn_mask: Optional[torch.Tensor], dtype: torch.dtype, n: int, h: int, length: int):
    if attn_mask is None:
        return None
    if attn_mask.dim() == 3:  # (N * heads, L, L), the nn.MultiheadAttention convention
        attn_mask = attn_mask.view(n, h, length, length)
    if attn_mask.dtype == torch.bool:  # True = masked out, as in nn.MultiheadAttention
        return torch.zeros_like(attn_mask, dtype=dtype).masked_fill_(attn_mask, float("-inf"))
    return attn_mask.to(dtype)


def _oc_attention_forward(attn: nn.Module, in_proj, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None):
    """open_clip ``Attention`` (raw ``in_proj_weight``) with the in-projection routed through ``in_proj``."""
    n, length, c = x.shape
    h = attn.num_heads
    q, k, v = in_proj(x).view(n, length, 3, h, c // h).permute(2, 0, 3, 1, 4).unbind(0)
    mask = _float_mask(attn_mask, q.dtype, n, h, length)
    if getattr(attn, "logit_scale", None) is not None:  # scaled cosine attention
        logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)
        logits = logits * torch.clamp(attn.logit_scale, max=attn.logit_scale_max).exp()
        if mask is not None:
            logits = logits + mask
        out = attn.attn_drop(logits.softmax(dim=-1)) @ v
    else:
        q, k = attn.ln_q(q), attn.ln_k(k)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=attn.attn_drop.p if attn.training else 0.0)
    if getattr(attn, "head_scale", None) is not None:
        out = out * attn.head_scale
    out = attn.ln_inner(out.transpose(1, 2).reshape(n, length, c))
    return attn.out_drop(attn.out_proj(out))


def wrapper_class(kind: str) -> type[AdapterLayer]:
    """The wrapper class for a site kind."""
    if kind == "block":
        return BlockLayer
    if kind == "packed_attn":
        return PackedAttentionLayer
    return OutputLayer


def unwrap(module: nn.Module) -> nn.Module:
    """The original module under any wrappers."""
    while isinstance(module, AdapterLayer):
        module = module.base_layer
    return module


def get_parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    """The module that owns ``path``'s last component (looking through wrappers), and that component."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    return unwrap(parent), name
