"""Point-PEFT: Parameter-Efficient Fine-Tuning for 3D Pre-trained Models (Tang, Zhang, Guo, Ma, Wang, Wang, Zhao, Li,
AAAI 2024, arXiv:2310.03059).

Two modules per block of a frozen point-cloud transformer:

* **Point-prior Prompt.** ``T`` learnable prompt tokens ``P`` per block, inserted after the cls token at the block
  input (their outputs are discarded). They are enhanced by a parameter-free attention over a memory bank ``M``
  (``N x C``) of features of the training set computed by the frozen pre-trained model:
  ``P' = P + softmax(topK(P^ M^T)) M_topK`` with ``^`` the L2 normalisation (cosine similarity), the softmax over the
  ``top_k`` most similar bank entries of each prompt. The bank is built once from training data with
  :func:`build_memory_bank` and stored in a persistent buffer, so it is saved with the adapter and reloads without
  data. **Before the bank is built the prompts are used plain** (no enhancement, one warning): the method trains and
  runs without a bank, and building it later switches the enhancement on.
* **Geometry-aware Adapter.** After the block, every token ``x`` goes through a bottleneck ``h = W_down x + b``
  (``C -> r``); each patch token adds the max- plus mean-pooled ``h`` of its ``k`` spatial neighbours (the nearest
  group centres in 3-D, itself included: the official ``maxmean`` local pooling), and the result returns through
  ``x + W_up QuickGELU(h + local)`` (``r -> C``; ``W_up``, ``b_up`` start at zero, so the adapter starts as the
  identity). Tokens before the patches (the cls token, other methods' prompts) take the plain bottleneck.

Defaults from the official code (Ivan-Tang-3D/Point-PEFT): 16 prompt tokens per block (truncated normal 0.02, prompt
dropout 0.1), bottleneck ``adapter_dim = 16``, ``k = 16`` spatial neighbours, memory-bank ``top_k = 14`` (``16 - 2``).

Trainable parameters (depth L, width C, T tokens, bottleneck r): ``L (T C + 2 C r + r + C)``.
Point-MAE base (L=12, C=384, T=16, r=16): ``12 (6,144 + 12,288 + 16 + 384) = 225,984``; with the Point-MAE head
trained alongside (``trainable_extra=["head"]``, 40 classes: 273,960) 499,944, against the paper's ~0.7M.
The difference: the official model also trains a second, zero-gated bottleneck adapter per block (12,689 each),
a shared local attention over the neighbourhoods (~28K), a BatchNorm after the pooling (768 per block) and an adapter
on the memory-bank prompt (~6.5K), which the paper's method description does not include.

Deviations from the reference implementation:
    * The official code runs on Point-M2AE's hierarchical encoder with radius-masked attention and re-groups the
      points with prompt coordinates; here the modules attach to the plain Point-MAE / Point-BERT transformer.
    * Memory bank: the official bank holds per-class-agnostic training features and is queried by the instance's own
      feature from a separate caching pass; here the prompts themselves query it (the paper's "prompt tokens enhanced
      by a parameter-free attention"), in every block, with no extra pass. Bank features are the max-pooled patch
      tokens of the final norm of the frozen backbone (adapters disabled).
    * The geometry-aware adapter is the local max+mean aggregation over spatial kNN plus one bottleneck (see above);
      the official shared local attention, propagation coefficients and the second gated adapter are left out.
    * The group centres reach the adapters through the forward context, recorded by a parameter-free probe on the
      backbone's centre-position MLP (``spec.towers[""].global_sites["pos_embed"]``).
    * Point-cloud backbones only (spec family ``point_transformer``); other backbones are refused before mutation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Adapter, Method, PeftConfig, register_method
from .idpt import GeometryProbe, context_value, geometry_site, int_field, point_tower

__all__ = ["PointPEFTConfig", "PointPEFT", "build_memory_bank", "point_peft_num_parameters"]

logger = logging.getLogger(__name__)


@dataclass
class PointPEFTConfig(PeftConfig):
    """Point-PEFT configuration.

    Attributes:
        num_tokens: Prompt tokens per block (official 16).
        prompt_dropout: Dropout on the prompts (official 0.1).
        adapter_dim: Bottleneck width of the geometry-aware adapter (official 16).
        k: Spatial neighbours (nearest group centres, the token itself included) pooled by the adapter (16).
        top_k: Memory-bank entries each prompt attends to (official 14).
        bank_size: Entries of the memory bank. 0: no bank yet (set by :func:`build_memory_bank`, and saved in the
            adapter's config so that loading restores a buffer of the right size).
        layers: Blocks with prompts and adapters (default all).
    """

    num_tokens: int = 16
    prompt_dropout: float = 0.1
    adapter_dim: int = 16
    k: int = 16
    top_k: int = 14
    bank_size: int = 0

    def validate(self) -> None:  # noqa: D102
        super().validate()
        int_field(self, "num_tokens", 1)
        int_field(self, "adapter_dim", 1)
        int_field(self, "k", 1)
        int_field(self, "top_k", 1)
        int_field(self, "bank_size", 0)
        if isinstance(self.prompt_dropout, bool) or not isinstance(self.prompt_dropout, (int, float)) or \
                not 0.0 <= self.prompt_dropout < 1.0:
            raise ValueError(f"PointPEFTConfig.prompt_dropout must be in [0, 1), got {self.prompt_dropout!r}")
        if self.targets is not None:
            raise ValueError(f"PointPEFTConfig.targets must be None (prompts and adapters sit on the blocks), got "
                             f"{self.targets!r}")


class MemoryBank(nn.Module):
    """The point-prior memory bank: ``memory`` ``(bank_size, C)`` and the ``built`` flag, both persistent buffers."""

    def __init__(self, bank_size: int, dim: int, device, dtype) -> None:
        super().__init__()
        self.register_buffer("built", torch.zeros((), dtype=torch.bool, device=device))
        # A None buffer is absent from the state dict until build_memory_bank registers the features.
        self.register_buffer("memory", torch.zeros(bank_size, dim, device=device, dtype=dtype) if bank_size > 0
                             else None)
        self.__dict__["_warned"] = False

    def enhance(self, prompt: torch.Tensor, top_k: int) -> torch.Tensor:
        """``P + softmax(topK(P^ M^T)) M_topK`` (parameter-free); ``P`` unchanged while the bank is not built."""
        if self.memory is None or not bool(self.built):
            if not self.__dict__["_warned"]:
                logger.warning("Point-PEFT: the memory bank is not built; the prompts run without the point-prior "
                               "enhancement. Call vpeft.methods.point_peft.build_memory_bank(pm, train_batches).")
                self.__dict__["_warned"] = True
            return prompt
        mem = self.memory.to(prompt.dtype)
        sim = F.normalize(prompt, dim=-1) @ F.normalize(mem, dim=-1).t()  # T x N cosine similarity
        val, idx = sim.topk(min(top_k, mem.shape[0]), dim=-1)
        return prompt + (val.softmax(dim=-1).unsqueeze(-1) * mem[idx]).sum(dim=1)


class PointPEFTAdapter(Adapter):
    """Point-prior prompts around one block and the geometry-aware adapter on its output."""

    def __init__(self, site, key: str, dim: int, cfg: PointPEFTConfig, num_prefix: int, device, dtype) -> None:
        super().__init__(site)
        kw = dict(device=device, dtype=dtype)
        self.key, self.num_prefix, self.num_tokens, self.k, self.top_k = key, num_prefix, cfg.num_tokens, cfg.k, \
            cfg.top_k
        self.prompt = nn.Parameter(nn.init.trunc_normal_(torch.empty(cfg.num_tokens, dim, **kw), std=0.02))
        self.prompt_dropout = nn.Dropout(cfg.prompt_dropout) if cfg.prompt_dropout > 0 else nn.Identity()
        self.down = nn.Linear(dim, cfg.adapter_dim, **kw)
        self.up = nn.Linear(cfg.adapter_dim, dim, **kw)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)  # the adapter starts as the identity
        nn.init.zeros_(self.up.bias)

    def pre(self, x: torch.Tensor, ctx) -> torch.Tensor:  # noqa: D102
        p = self.shared.enhance(self.prompt, self.top_k) if self.shared is not None else self.prompt
        p = self.prompt_dropout(p).to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        n = self.num_prefix
        return torch.cat([x[:, :n], p, x[:, n:]], dim=1)

    def post(self, y: torch.Tensor, ctx) -> torch.Tensor:  # noqa: D102
        n, t = self.num_prefix, self.num_tokens
        y = torch.cat([y[:, :n], y[:, n + t:]], dim=1)
        center = context_value(ctx, self.key, "center", "Point-PEFT")
        h = self.down(y)
        m = y.shape[1] - center.shape[1]  # the patches are the last G tokens, whatever other methods put before them
        hp = h[:, m:]
        k = min(self.k, hp.shape[1])
        idx = torch.cdist(center.float(), center.float()).topk(k, dim=-1, largest=False).indices  # B G k
        b, g, r = hp.shape
        nbr = hp.gather(1, idx.reshape(b, g * k, 1).expand(-1, -1, r)).reshape(b, g, k, r)
        local = nbr.amax(dim=2) + nbr.mean(dim=2)
        h = torch.cat([h[:, :m], hp + local], dim=1)
        z = h * torch.sigmoid(1.702 * h)  # QuickGELU, as the official adapter
        return y + self.up(z)


@register_method
class PointPEFT(Method):
    """Point-PEFT: point-prior prompts with a memory bank and geometry-aware adapters (point-cloud transformers)."""

    name = "point_peft"
    config_class = PointPEFTConfig
    site_kinds = ("block", "other")

    def resolve(self, model, spec):  # noqa: D102
        point_tower(spec, "Point-PEFT")
        return [geometry_site(spec)] + spec.resolve(model, "block", None, self.config.layers)

    def build_shared(self, model, spec, sites):  # noqa: D102
        w = next(model.blocks[0].parameters())
        return MemoryBank(self.config.bank_size, spec.towers[""].width, w.device, w.dtype)

    def make_adapter(self, model, spec, sites, module, shared):  # noqa: D102
        site = sites[0]
        if site.name == "pos_embed":
            return GeometryProbe(site, self.key)
        tower = spec.towers[""]
        w = next(module.parameters())
        return PointPEFTAdapter(site, self.key, tower.width, self.config, tower.num_prefix_tokens, w.device, w.dtype)


def _bank_features(pm, x: torch.Tensor) -> torch.Tensor:
    tokens = pm.forward_features(x)
    return tokens[:, pm.spec.towers[""].num_prefix_tokens:].amax(dim=1)


@torch.no_grad()
def build_memory_bank(pm, batches: Iterable, key: str = "point_peft") -> int:
    """Fill the Point-PEFT memory bank of ``pm`` with features of the training set (run once before training).

    Each cloud contributes one feature: the max over its patch tokens after the final norm, computed by the frozen
    backbone (all adapters disabled, eval mode). The bank replaces any earlier one; the config's ``bank_size`` is set
    to its size, so :meth:`PeftModel.save_adapter` stores the bank and ``from_pretrained`` restores it without data.

    Args:
        pm: A PeftModel with a Point-PEFT method.
        batches: Iterable of point tensors ``(B, N, 3)`` or ``(points, target)`` pairs (e.g. the training loader).
        key: The method key (``"point_peft"``; ``"point_peft_2"`` for a second one).

    Returns:
        The number of entries in the bank.

    Raises:
        ValueError: ``pm`` has no Point-PEFT method under ``key``, or ``batches`` is empty.
    """
    if key not in getattr(pm, "method_keys", []) or not isinstance(pm.shared[key], MemoryBank):
        raise ValueError(f"build_memory_bank: the model has no Point-PEFT method under key {key!r}; method keys: "
                         f"{getattr(pm, 'method_keys', None)}")
    feats = []
    was_training = pm.training
    pm.eval()
    try:
        with pm.disabled():
            for batch in batches:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                feats.append(_bank_features(pm, x).float())
    finally:
        pm.train(was_training)
    if not feats:
        raise ValueError("build_memory_bank: `batches` yielded no data")
    bank: MemoryBank = pm.shared[key]
    ref = next(pm.base_model.blocks[0].parameters())
    memory = torch.cat(feats).to(device=ref.device, dtype=ref.dtype)
    bank.register_buffer("memory", memory)
    bank.built.fill_(True)
    cfg = pm.configs[pm.method_keys.index(key)]
    cfg.bank_size = int(memory.shape[0])
    return cfg.bank_size


def point_peft_num_parameters(width: int, depth: int, num_tokens: int = 16, adapter_dim: int = 16) -> int:
    """Trainable parameters of Point-PEFT by the formula in the module docstring (without a head)."""
    c, r = width, adapter_dim
    return depth * (num_tokens * c + 2 * c * r + r + c)
