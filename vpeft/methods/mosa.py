"""MoSA: Mixture of Sparse Adapters (Zhang, Zou, An, Liu and Zhang, arXiv:2312.02923, 2023; its later version is
titled "Split & Merge: Unlocking the Potential of Visual Adapters via Sparse Training").

A standard adapter, AdaptFormer's parallel bottleneck beside each MLP (:class:`~vpeft.methods.adaptformer.
BottleneckAdapter`: same placement, shapes and initialisation), is trained sparsely and used densely:

* **Split.** The split weight tensors are partitioned into ``N`` sparse adapters by disjoint random masks
  ``M_1 .. M_N`` that together cover every entry (a random ranking of the entries cut into ``N`` equal bands, so each
  part holds ``numel / N`` entries). The masks are a pure function of ``(seed, site path, tensor name)``: they are
  rebuilt identically on every load and kept out of checkpoints (non-persistent buffers).
* **Sparse training.** In ``train()`` mode every forward stochastically activates one sparse adapter per site, drawn
  uniformly from torch's global RNG (so ``torch.manual_seed`` / Lightning's ``seed_everything`` reproduce it) and
  independently for the down- and up-projection when both are split. The branch then uses ``W * M_i``, so only that
  part receives gradients. The draw is kept in the forward context, so gradient checkpointing recomputes the block
  with the same sparse adapter. Under data parallelism seed every rank alike, so that all ranks train the same sparse
  adapters in a step.
* **Merge.** In ``eval()`` mode the parts act as one dense adapter: the average of the ``N`` sparse adapters,
  ``(1/N) * sum_i M_i * W = W / N`` - the union of the disjoint parts scaled by ``1/N``, which is the expected weight
  under the random activation (the released code's ``merge("add")``). It costs exactly one dense adapter: one down-
  and one up-projection per site, the FLOPs of AdaptFormer with the same bottleneck.
* **Hierarchical sparse strategy** (for limited training data). vpeft reads it as the released code runs every
  benchmark (``SHARE="down"``, ``BIAS=True``): the down-projection stays dense and shared by all sparse adapters, only
  the up-projection is split (``split="up"``); biases are not split. ``split="down"`` / ``"both"`` and
  ``split_bias=True`` give the other variants.

How this maps onto vpeft: :meth:`PeftModel.merge` folds adapters into *backbone* weights, which a nonlinear bottleneck
cannot do, so it refuses MoSA as it refuses AdaptFormer. MoSA's own merge is what ``eval()`` computes;
:meth:`MoSAAdapter.merged_adapter` returns it as a dense :class:`BottleneckAdapter`, and :func:`merge_to_adaptformer`
exports a whole model as an :class:`AdaptFormerConfig` plus adapter tensors that load into an AdaptFormer model of the
same backbone and reproduce the ``eval()`` outputs bit for bit.

Defaults (the released code's config and benchmark scripts): ``num_experts=4``, ``bottleneck=64`` (its FGVC scripts;
VTAB uses 16), ``scale=0.1``, ``dropout=0.1``, ``split="up"``, ``split_bias=False``, all blocks.

Trainable parameters: exactly those of one AdaptFormer adapter, ``d * d_hat + d_hat + d_hat * d + d`` per block.
ViT-B/16 (12 blocks, d = 768, d_hat = 64): ``12 * (2 * 768 * 64 + 64 + 768) = 1,189,632``.

Deviations from the reference implementation (Theia-4869/MoSA):
    * The reference stores ``N`` full-size copies of each split projection plus a merged copy and masks their
      gradients after backward; here one tensor holds the ``N`` disjoint parts and the forward masks it, so stored
      and trainable parameters are those of a single adapter. For a zero-initialised tensor (the up-projection, the
      default split) both compute the same function; for a split down-projection the reference's experts also carry
      the untouched initial weights outside their mask, while a sparse adapter here uses its own entries only.
    * Biases are one dense tensor shared by all sparse adapters (reference: a full bias per expert, averaged at merge).
    * The reference adapter normalises the residual stream with its own trainable LayerNorm and uses GELU; here the
      branch reads the block's ``norm2`` output as in AdaptFormer's equation and uses ReLU (``activation="gelu"``
      available).
    * The draw comes from torch's global RNG once per forward and site (reference: Python's ``random`` per block
      forward).
    * The released training loop optionally runs a second forward (another random sparse adapter) and adds a
      symmetric-KL consistency term between the two outputs; :func:`consistency_loss` computes it, but vpeft's task
      modules do not call it.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F

from .adaptformer import AdaptFormer, AdaptFormerConfig, BottleneckAdapter, mlp_features
from .base import register_method

#: ``split`` value -> projections whose tensors are split into sparse adapters.
SPLITS = {"up": ("up",), "down": ("down",), "both": ("down", "up")}


@dataclass
class MoSAConfig(AdaptFormerConfig):
    """MoSA configuration (the bottleneck fields are AdaptFormer's).

    Attributes:
        num_experts: Number ``N`` of sparse adapters each split tensor is divided into (1 gives a plain adapter).
        split: Which projections are split: ``"up"`` (the hierarchical strategy: dense shared down-projection),
            ``"down"`` or ``"both"``.
        split_bias: Also split the biases of the split projections (default: biases stay dense and shared).
        seed: Seed of the random masks (combined with each site's path, so sites get different masks).
        bottleneck: Middle dimension (64).
        scale: Factor on the branch output (0.1).
        dropout: Dropout on the bottleneck activations (0.1).
        activation: ``"relu"`` or ``"gelu"``.
        targets: Sites (default ``["mlp"]``).
    """

    num_experts: int = 4
    split: str = "up"
    split_bias: bool = False
    seed: int = 0

    def validate(self) -> None:  # noqa: D102
        super().validate()
        if not isinstance(self.num_experts, int) or isinstance(self.num_experts, bool) or self.num_experts < 1:
            raise ValueError(f"MoSAConfig.num_experts must be a positive int, got {self.num_experts!r}")
        if self.split not in SPLITS:
            raise ValueError(f"MoSAConfig.split must be one of {list(SPLITS)}, got {self.split!r}")
        if not isinstance(self.split_bias, bool):
            raise TypeError(f"MoSAConfig.split_bias must be a bool, got {self.split_bias!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2 ** 31:
            raise ValueError(f"MoSAConfig.seed must be an int in [0, 2**31), got {self.seed!r}")


def mask_seed(seed: int, path: str, tensor: str) -> int:
    """Generator seed of the masks of ``tensor`` (e.g. ``"up.weight"``) at site ``path``; stable across processes."""
    return zlib.crc32(f"{seed}:{path}:{tensor}".encode())


def expert_index(shape: tuple[int, ...], num_experts: int, seed: int) -> torch.Tensor:
    """Sparse-adapter id (0..N-1) of every entry of a tensor of ``shape``: a random ranking of the entries cut into
    ``N`` bands of equal size (sizes differ by at most one), so the ``N`` masks are disjoint and cover the tensor."""
    n = 1
    for s in shape:
        n *= s
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    index = torch.empty(n, dtype=torch.long)
    index[order] = torch.arange(n) * num_experts // n
    return index.view(shape)


class MoSAAdapter(BottleneckAdapter):
    """A bottleneck adapter split into ``num_experts`` sparse adapters: one per forward in training, merged in eval.

    The id maps live in non-persistent buffers ``<tensor>_expert`` (``up_weight_expert``...), one long tensor of the
    tensor's shape each.
    """

    def __init__(self, site, in_features: int, out_features: int, cfg: MoSAConfig, like: torch.Tensor) -> None:
        super().__init__(site, in_features, out_features, cfg.bottleneck, cfg.scale, cfg.dropout, cfg.activation, like)
        self.num_experts = cfg.num_experts
        self.split_projections = SPLITS[cfg.split]
        names = [f"{p}.{part}" for p in self.split_projections for part in (("weight", "bias") if cfg.split_bias
                                                                            else ("weight",))]
        self.split_tensors = tuple(names)
        for name in names:
            t = self.get_parameter(name)
            if t.numel() < self.num_experts:
                raise ValueError(
                    f"MoSAConfig.num_experts={self.num_experts} exceeds the {t.numel()} entries of {name} at "
                    f"{site.path!r}: every sparse adapter needs at least one entry; lower num_experts, raise "
                    "bottleneck or set split_bias=False")
            index = expert_index(tuple(t.shape), self.num_experts, mask_seed(cfg.seed, site.path, name))
            self.register_buffer(_buffer(name), index.to(t.device), persistent=False)
        #: The sparse adapters drawn by the last training forward, ``{"up": i}`` (for inspection).
        self.last_experts: Optional[dict[str, int]] = None

    def expert_masks(self, name: str) -> list[torch.Tensor]:
        """The ``N`` boolean masks of split tensor ``name`` (e.g. ``"up.weight"``)."""
        index = getattr(self, _buffer(name))
        return [index == i for i in range(self.num_experts)]

    def _draw(self) -> dict[str, int]:
        ctx = self.__dict__["_ctx"]
        key = ("mosa", id(self))
        # Drawn on every call, also when recomputing: the draw consumes the global RNG, and a recomputation that
        # skipped it would shift every later random op of the block (dropout, drop path) away from the forward's.
        draws = torch.randint(self.num_experts, (len(self.split_projections),)).tolist()
        if ctx is not None and key in ctx:  # a recomputation (gradient checkpointing) of this forward
            return ctx.get(key)
        choice = dict(zip(self.split_projections, draws))
        if ctx is not None:
            ctx.set(key, choice)
        self.last_experts = choice
        return choice

    def sparse_projections(self, experts: dict[str, int]) -> tuple[torch.Tensor, ...]:
        """``(down.weight, down.bias, up.weight, up.bias)`` of the sparse adapters ``experts`` (projection -> id):
        each split tensor times its mask, the others as they are."""
        out = []
        for name in ("down.weight", "down.bias", "up.weight", "up.bias"):
            t = self.get_parameter(name)
            if name in self.split_tensors:
                t = t * (getattr(self, _buffer(name)) == experts[name.split(".")[0]])
            out.append(t)
        return tuple(out)

    def merged_projections(self) -> tuple[torch.Tensor, ...]:
        """``(down.weight, down.bias, up.weight, up.bias)`` of the merged dense adapter: split tensors divided by N."""
        out = []
        for name in ("down.weight", "down.bias", "up.weight", "up.bias"):
            t = self.get_parameter(name)
            out.append(t / self.num_experts if name in self.split_tensors and self.num_experts > 1 else t)
        return tuple(out)

    def projections(self) -> tuple[torch.Tensor, ...]:  # noqa: D102
        if self.training and self.num_experts > 1:
            return self.sparse_projections(self._draw())
        return self.merged_projections()

    def branch(self, x: torch.Tensor, experts: Optional[Union[int, dict[str, int]]] = None) -> torch.Tensor:
        """The branch output. ``experts=None`` follows the mode (a random sparse adapter in training, the merged
        adapter in eval); an int (every split projection) or a ``{projection: id}`` dict forces sparse adapters."""
        if experts is None:
            return super().branch(x)
        choice = {p: experts for p in self.split_projections} if isinstance(experts, int) else dict(experts)
        if sorted(choice) != sorted(self.split_projections) or \
                not all(isinstance(i, int) and 0 <= i < self.num_experts for i in choice.values()):
            raise ValueError(f"experts must give an id in 0..{self.num_experts - 1} for each of "
                             f"{list(self.split_projections)}, got {experts!r}")
        return self.bottleneck_branch(x, *self.sparse_projections(choice))

    def merged_state(self) -> dict[str, torch.Tensor]:
        """The merged dense adapter's tensors under :class:`BottleneckAdapter` names (detached copies)."""
        with torch.no_grad():
            tensors = self.merged_projections()
        return {name: t.detach().clone() for name, t in zip(("down.weight", "down.bias", "up.weight", "up.bias"),
                                                              tensors)}

    def merged_adapter(self) -> BottleneckAdapter:
        """A dense :class:`BottleneckAdapter` holding the merged weights (same site, scale, dropout, activation)."""
        w = self.down.weight
        dense = BottleneckAdapter(self.site, w.shape[1], self.up.weight.shape[0], w.shape[0], self.scale,
                                  getattr(self.dropout, "p", 0.0), self.activation, w)
        dense.load_state_dict(self.merged_state())
        dense.__dict__["_ctx"] = self.__dict__["_ctx"]
        return dense.train(self.training)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, num_experts={self.num_experts}, split={list(self.split_tensors)}, "
                f"mode={'sparse' if self.training and self.num_experts > 1 else 'merged'}")


def _buffer(name: str) -> str:
    return name.replace(".", "_") + "_expert"


@register_method
class MoSA(AdaptFormer):
    """MoSA: an AdaptFormer adapter split into sparse adapters for training and merged for inference."""

    name = "mosa"
    config_class = MoSAConfig

    def make_adapter(self, model, spec, sites, module, shared) -> MoSAAdapter:  # noqa: D102
        in_f, out_f, like = mlp_features(sites[0], module)
        return MoSAAdapter(sites[0], in_f, out_f, self.config, like)


def merge_to_adaptformer(pm, key: Optional[str] = None,
                         new_key: str = "adaptformer") -> tuple[AdaptFormerConfig, dict[str, torch.Tensor]]:
    """Export MoSA's merged dense adapters as an AdaptFormer adapter.

    Rebuild the model with the returned config in place of the MoSA config (same position among the configs, same
    ``trainable_extra``) and load the returned tensors with :meth:`PeftModel.load_adapter_state_dict`; its outputs
    then equal this model's ``eval()`` outputs bit for bit, at AdaptFormer's cost.

    Args:
        pm: A :class:`~vpeft.PeftModel` with a MoSA method.
        key: The MoSA method key in ``pm.method_keys`` (needed only when there are several).
        new_key: The AdaptFormer method key in the rebuilt model (``"adaptformer"`` unless another AdaptFormer config
            comes first).

    Returns:
        ``(config, tensors)``: the AdaptFormer config and every adapter tensor of ``pm`` with the MoSA adapters
        replaced by their merged weights under ``new_key`` (other methods' and extra tensors unchanged).

    Raises:
        ValueError: ``pm`` has no (or, without ``key``, several) MoSA methods.
    """
    mosa = [(k, c) for k, c in zip(pm.method_keys, pm.configs) if isinstance(c, MoSAConfig)]
    if key is not None:
        mosa = [(k, c) for k, c in mosa if k == key]
    if len(mosa) != 1:
        raise ValueError(f"merge_to_adaptformer needs exactly one MoSA method (key={key!r}); MoSA keys in this model: "
                         f"{[k for k, c in zip(pm.method_keys, pm.configs) if isinstance(c, MoSAConfig)]}")
    key, c = mosa[0]
    config = AdaptFormerConfig(targets=None if c.targets is None else list(c.targets),
                               layers=None if c.layers is None else list(c.layers),
                               towers=None if c.towers is None else list(c.towers),
                               bottleneck=c.bottleneck, scale=c.scale, dropout=c.dropout, activation=c.activation)
    out = pm.adapter_state_dict()
    for path, layer in pm.adapter_layers().items():
        for k, a in layer.adapters():
            if k == key:
                for pname in list(out):
                    if pname.startswith(f"{path}.{key}."):
                        del out[pname]
                out.update({f"{path}.{new_key}.{n}": t for n, t in a.merged_state().items()})
    return config, out


def consistency_loss(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Symmetric KL between the outputs of two training forwards (different random sparse adapters), each side
    against the other's detached softmax, batch mean: ``0.5 * (KL(p_b || p_a) + KL(p_a || p_b))``. The released
    MoSA training loop adds it with weight 1 to the classification loss of the first forward."""
    a, b = logits_a.float(), logits_b.float()
    kl_ba = F.kl_div(F.log_softmax(a, dim=-1), F.softmax(b.detach(), dim=-1), reduction="batchmean")
    kl_ab = F.kl_div(F.log_softmax(b, dim=-1), F.softmax(a.detach(), dim=-1), reduction="batchmean")
    return 0.5 * (kl_ba + kl_ab)
