"""Point-cloud transformers of Point-MAE and Point-BERT (the fine-tuning ``PointTransformer``): creation, official
checkpoint loading and the backbone spec.

Papers: Pang, Wang, Tay, Liu, Tian, Yuan, "Masked Autoencoders for Point Cloud Self-supervised Learning", ECCV 2022
(arXiv:2203.06604, code Pang-Yatian/Point-MAE); Yu, Tang, Rao, Huang, Zhou, Lu, "Point-BERT: Pre-training 3D Point
Cloud Transformers with Masked Point Modeling", CVPR 2022 (arXiv:2111.14819, code lulutang0608/Point-BERT).

Architecture (both papers' fine-tuning model):
    1. Grouping: ``num_group`` centres by farthest-point sampling, each with its ``group_size`` nearest points,
       centred on the centre (:mod:`vpeft.backbones._point_ops`).
    2. Mini-PointNet ``encoder``: per point Conv1d 3->128, BN, ReLU, Conv1d 128->256; max-pool over the patch; the
       pooled feature concatenated to every point (512); Conv1d 512->512, BN, ReLU, Conv1d 512->``encoder_dims``;
       max-pool. Point-BERT's ``encoder_dims`` is 256 with a ``reduce_dim`` Linear to the width; Point-MAE's equals
       the width (no ``reduce_dim``).
    3. A cls token with a learned cls position; centres embedded by ``pos_embed`` (Linear 3->128, GELU, Linear
       128->width). The position is added to the tokens before EVERY block (``x = block(x + pos)``).
    4. 12 pre-norm blocks of width 384, 6 heads, MLP ratio 4, no qkv bias (timm's ``Block``, whose parameter names
       equal the official ones), stochastic depth rising linearly to ``drop_path_rate``; final LayerNorm.
    5. Head on ``concat(cls token, max over the patch tokens)``: Point-MAE Linear 768->256, BN, ReLU, Dropout(0.5),
       Linear 256->256, BN, ReLU, Dropout(0.5), Linear 256->classes; Point-BERT Linear 768->256, ReLU, Dropout(0.5),
       Linear 256->classes.

Defaults are the official ModelNet40 fine-tuning configs (1024 points, ``num_group=64``, ``group_size=32``,
``drop_path_rate=0.1``, 40 classes); the ScanObjectNN configs use 2048 points and ``num_group=128``.

The model follows timm's contract (``forward_features``, ``forward_head``, ``forward_intermediates``,
``num_prefix_tokens``, ``reset_classifier``, ``blocks``, ``norm``), so every vpeft method that works on a timm ViT
attaches through the same spec: token layout NLC with one prefix token.

Official checkpoints: ``{"base_model": state_dict, ...}`` from either repository, pre-trained (Point-MAE:
``MAE_encoder.*`` plus the decoder; Point-BERT: the MoCo query encoder ``transformer_q.*`` plus the key encoder,
dVAE and queue) or fine-tuned (with ``cls_head_finetune.*``), optionally with DDP's ``module.`` prefix. The key
filter keeps the encoder, drops the pre-training-only tensors and renames ``blocks.blocks.*`` -> ``blocks.*`` and
``cls_head_finetune.*`` -> ``head.*``; every encoder tensor must then be present with its shape (else ValueError).

Deviations from the reference implementation:
    * FPS and kNN are pure torch (no ``pointnet2_ops`` / ``knn_cuda``); see :mod:`vpeft.backbones._point_ops` for
      the one corner case (points within ~0.03 of the origin) where centres can differ.
    * The classifier is ``head`` (timm's name), the blocks ``blocks.{i}`` (not ``blocks.blocks.{i}``); official
      files are renamed on load and :func:`to_official_state_dict` renames back.
    * Attention runs through timm's ``Block`` (fused scaled-dot-product attention): equal to the official einsum
      attention up to float rounding (~1e-6).
    * A randomly initialised model applies the official from-scratch init (truncated normal 0.02) to the encoder,
      positions and blocks; the head keeps PyTorch's default init, as in the official fine-tuning from a
      pre-trained checkpoint (the path behind the papers' numbers).
"""

from __future__ import annotations

import logging
import os
import pickle
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from ._point_ops import group_points
from ._spec import BackboneSpec, TowerSpec, _module_kind, register_spec

__all__ = ["MiniPointNet", "PointGrouper", "PointTransformer", "convert_official_state_dict",
           "create_point_transformer", "load_official_checkpoint", "to_official_state_dict"]

logger = logging.getLogger(__name__)

#: Architecture of each model name: width, depth, heads.
ARCHS: dict[str, dict[str, Any]] = {"base": dict(embed_dim=384, depth=12, num_heads=6)}
#: Per family: mini-PointNet output width (None: the transformer width) and head layout.
FAMILIES: dict[str, dict[str, Any]] = {
    "point_mae": dict(encoder_dims=None, head_style="point_mae"),
    "point_bert": dict(encoder_dims=256, head_style="point_bert"),
}
HEAD_STYLES = ("point_mae", "point_bert")


class MiniPointNet(nn.Module):
    """The patch embedding: a shared two-stage PointNet over the points of each patch (official ``Encoder``).

    Parameter names equal the official ones (``first_conv.{0,1,3}``, ``second_conv.{0,1,3}``).
    """

    def __init__(self, out_channels: int) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.first_conv = nn.Sequential(nn.Conv1d(3, 128, 1), nn.BatchNorm1d(128), nn.ReLU(inplace=True),
                                        nn.Conv1d(128, 256, 1))
        self.second_conv = nn.Sequential(nn.Conv1d(512, 512, 1), nn.BatchNorm1d(512), nn.ReLU(inplace=True),
                                         nn.Conv1d(512, out_channels, 1))

    def forward(self, groups: torch.Tensor) -> torch.Tensor:
        """``(B, G, S, 3)`` centred patches -> ``(B, G, out_channels)`` patch tokens."""
        b, g, s, _ = groups.shape
        f = self.first_conv(groups.reshape(b * g, s, 3).transpose(1, 2))  # BG 256 S
        f = torch.cat([f.amax(dim=2, keepdim=True).expand(-1, -1, s), f], dim=1)  # BG 512 S
        f = self.second_conv(f)
        return f.amax(dim=2).reshape(b, g, self.out_channels)


class PointGrouper(nn.Module):
    """FPS + kNN patches (official ``Group``); no parameters.

    Args:
        num_group: Patches per cloud.
        group_size: Points per patch.
        random_start: Start FPS at a random index drawn from torch's default generator (seed it with
            ``torch.manual_seed``) instead of index 0 (the official behaviour).
    """

    def __init__(self, num_group: int, group_size: int, random_start: bool = False) -> None:
        super().__init__()
        self.num_group, self.group_size, self.random_start = num_group, group_size, random_start

    def forward(self, pts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, N, 3)`` -> ``(neighborhood (B, G, S, 3), center (B, G, 3))``."""
        return group_points(pts, self.num_group, self.group_size, self.random_start)

    def extra_repr(self) -> str:
        return f"num_group={self.num_group}, group_size={self.group_size}, random_start={self.random_start}"


def _make_head(style: str, in_dim: int, num_classes: int, hidden: int, dropout: float) -> nn.Module:
    if num_classes == 0:
        return nn.Identity()
    if style == "point_mae":
        return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                             nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden),
                             nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, num_classes))
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                         nn.Linear(hidden, num_classes))


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"PointTransformer: {name} must be an int >= {low}, got {value!r}")


class PointTransformer(nn.Module):
    """The Point-MAE / Point-BERT fine-tuning transformer with timm's model contract.

    Args:
        num_classes: Classes of the head (0: no head, ``forward`` returns the 2*width pooled features).
        num_group: Patches (FPS centres) per cloud.
        group_size: Points per patch.
        embed_dim: Transformer width (official ``trans_dim``).
        depth: Blocks.
        num_heads: Attention heads.
        encoder_dims: Mini-PointNet output width; ``None`` or ``embed_dim``: no ``reduce_dim`` (Point-MAE), else a
            ``reduce_dim`` Linear to ``embed_dim`` (Point-BERT: 256).
        mlp_ratio: MLP hidden width over ``embed_dim``.
        drop_path_rate: Stochastic depth of the last block (linear from 0).
        head_style: ``"point_mae"`` (two hidden layers with BatchNorm) or ``"point_bert"`` (one hidden layer).
        head_hidden: Hidden width of the head.
        head_dropout: Dropout in the head.
        fps_random_start: See :class:`PointGrouper`.

    Attributes:
        num_prefix_tokens: 1 (the cls token).
        num_features: Token width (``embed_dim``), the channel count of ``forward_features``.
        head_hidden_size: Width of ``forward_head(..., pre_logits=True)``: ``2 * embed_dim``.
    """

    def __init__(self, num_classes: int = 40, num_group: int = 64, group_size: int = 32, embed_dim: int = 384,
                 depth: int = 12, num_heads: int = 6, encoder_dims: Optional[int] = None, mlp_ratio: float = 4.0,
                 drop_path_rate: float = 0.1, head_style: str = "point_mae", head_hidden: int = 256,
                 head_dropout: float = 0.5, fps_random_start: bool = False) -> None:
        super().__init__()
        from timm.layers import trunc_normal_
        from timm.models.vision_transformer import Block

        for name, value, low in (("num_classes", num_classes, 0), ("num_group", num_group, 1),
                                 ("group_size", group_size, 1), ("embed_dim", embed_dim, 1), ("depth", depth, 1),
                                 ("num_heads", num_heads, 1), ("head_hidden", head_hidden, 1)):
            _check_int(name, value, low)
        if embed_dim % num_heads:
            raise ValueError(f"PointTransformer: embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if head_style not in HEAD_STYLES:
            raise ValueError(f"PointTransformer: head_style must be one of {HEAD_STYLES}, got {head_style!r}")
        encoder_dims = embed_dim if encoder_dims is None else encoder_dims
        _check_int("encoder_dims", encoder_dims, 1)
        for name, value in (("drop_path_rate", drop_path_rate), ("head_dropout", head_dropout)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"PointTransformer: {name} must be in [0, 1), got {value!r}")

        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.head_hidden_size = 2 * embed_dim
        self.num_prefix_tokens = 1
        self.head_style, self.head_hidden, self.head_dropout = head_style, head_hidden, head_dropout
        self.grad_checkpointing = False

        self.group_divider = PointGrouper(num_group, group_size, fps_random_start)
        self.encoder = MiniPointNet(encoder_dims)
        self.reduce_dim = nn.Linear(encoder_dims, embed_dim) if encoder_dims != embed_dim else nn.Identity()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, embed_dim))
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]
        # nn.LayerNorm (eps 1e-5) as the official blocks; timm's default LayerNorm uses eps 1e-6.
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=False, drop_path=dpr[i],
                  norm_layer=nn.LayerNorm) for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)

        for m in (self.encoder, self.reduce_dim, self.pos_embed, self.blocks, self.norm):
            m.apply(_init_weights)
        trunc_normal_(self.cls_token, std=0.02)
        trunc_normal_(self.cls_pos, std=0.02)
        self.head = _make_head(head_style, 2 * embed_dim, num_classes, head_hidden, head_dropout)

    # --- timm contract ------------------------------------------------------------------------------------------

    @property
    def num_group(self) -> int:
        return self.group_divider.num_group

    @property
    def group_size(self) -> int:
        return self.group_divider.group_size

    def prepare_tokens(self, pts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Group and embed a cloud: ``(tokens, pos)``, both ``(B, 1 + num_group, embed_dim)``, cls first.

        ``pos`` is added to the tokens before every block.
        """
        if not isinstance(pts, torch.Tensor) or pts.dim() != 3 or pts.shape[-1] != 3:
            raise ValueError(f"PointTransformer expects points of shape (B, N, 3), got "
                             f"{tuple(pts.shape) if isinstance(pts, torch.Tensor) else type(pts).__name__}")
        neighborhood, center = self.group_divider(pts)
        tokens = self.reduce_dim(self.encoder(neighborhood))
        b = tokens.shape[0]
        x = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        pos = torch.cat([self.cls_pos.expand(b, -1, -1), self.pos_embed(center)], dim=1)
        return x, pos

    def _run_block(self, blk: nn.Module, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(blk, x + pos, use_reentrant=False)
        return blk(x + pos)

    def forward_features(self, pts: torch.Tensor) -> torch.Tensor:
        """``(B, N, 3)`` points -> normalised tokens ``(B, 1 + num_group, embed_dim)`` (cls first)."""
        x, pos = self.prepare_tokens(pts)
        for blk in self.blocks:
            x = self._run_block(blk, x, pos)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool ``concat(cls token, max over patch tokens)`` and classify (``pre_logits``: the pooled features)."""
        n = self.num_prefix_tokens
        f = torch.cat([x[:, 0], x[:, n:].amax(dim=1)], dim=-1)
        return f if pre_logits else self.head(f)

    def forward(self, pts: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.forward_head(self.forward_features(pts))

    def forward_intermediates(
            self,
            pts: torch.Tensor,
            indices: Optional[Union[int, list[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NLC",
            intermediates_only: bool = False,
            output_dict: bool = False,
    ):
        """Block outputs as timm's ``VisionTransformer.forward_intermediates`` returns them (each block's output,
        before the next block adds the positions).

        Args:
            pts: Points ``(B, N, 3)``.
            indices: Last ``n`` blocks if an int, all if None, these block indices if a sequence.
            return_prefix_tokens: Return ``(patch tokens, cls token)`` pairs.
            norm: Apply the final norm to each intermediate.
            stop_early: Stop after the last requested block (only with ``intermediates_only``).
            output_fmt: ``"NLC"`` only (points have no grid).
            intermediates_only: Return only the intermediates.
            output_dict: Return ``{"point_features", "point_intermediates"[, "point_intermediates_prefix"]}``.

        Returns:
            ``(final normalised tokens, intermediates)``, the intermediates alone, or the dict.
        """
        from timm.models._features import feature_take_indices

        if output_fmt != "NLC":
            raise ValueError(f"PointTransformer.forward_intermediates: output_fmt must be 'NLC' (point tokens have no "
                             f"image grid), got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        x, pos = self.prepare_tokens(pts)
        blocks = list(self.blocks)
        if stop_early and intermediates_only:
            blocks = blocks[:max_index + 1]
        out = []
        for i, blk in enumerate(blocks):
            x = self._run_block(blk, x, pos)
            if i in take:
                out.append(self.norm(x) if norm else x)
        n = self.num_prefix_tokens
        prefix = [y[:, :n] for y in out]
        out = [y[:, n:] for y in out]
        if output_dict:
            result = {"point_intermediates": out}
            if return_prefix_tokens:
                result["point_intermediates_prefix"] = prefix
            if not intermediates_only:
                result["point_features"] = self.norm(x)
            return result
        if return_prefix_tokens:
            out = list(zip(out, prefix))
        return out if intermediates_only else (self.norm(x), out)

    def prune_intermediate_layers(self, indices: Union[int, list[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop blocks after the last requested intermediate (and the norm / head), as timm does."""
        from timm.models._features import feature_take_indices

        take, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new head for ``num_classes`` (0: none); pooling is fixed (cls token + max), so ``global_pool`` must be
        None."""
        _check_int("num_classes", num_classes, 0)
        if global_pool is not None:
            raise ValueError(f"PointTransformer pools concat(cls token, max over patch tokens); global_pool must be "
                             f"None, got {global_pool!r}")
        ref = self.cls_token
        self.num_classes = num_classes
        self.head = _make_head(self.head_style, self.head_hidden_size, num_classes, self.head_hidden,
                               self.head_dropout).to(device=ref.device, dtype=ref.dtype)
        self.head.train(self.training)

    def get_classifier(self) -> nn.Module:  # noqa: D102
        return self.head

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass (timm's switch)."""
        self.grad_checkpointing = bool(enable)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters the official optimiser keeps out of weight decay (the tokens)."""
        return {"cls_token", "cls_pos"}


def _init_weights(m: nn.Module) -> None:
    """The official from-scratch init: truncated normal (std 0.02) Linear / Conv1d weights, zero biases."""
    from timm.layers import trunc_normal_

    if isinstance(m, (nn.Linear, nn.Conv1d)):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# --- official checkpoints ---------------------------------------------------------------------------------------

#: Pre-training-only tensors per family (after the ``MAE_encoder.`` / ``transformer_q.`` prefix is handled).
_PRETRAIN_ONLY = {
    "point_mae": (("mask_token",), ("decoder_pos_embed.", "MAE_decoder.", "increase_dim.")),
    "point_bert": (("queue", "queue_ptr"), ("transformer_k.", "dvae.", "transformer_q.cls_head.",
                                            "transformer_q.lm_head.", "transformer_q.mask_token")),
}
_RENAMES = (("blocks.blocks.", "blocks."), ("cls_head_finetune.", "head."))


def convert_official_state_dict(state_dict: dict[str, torch.Tensor], family: str
                                ) -> tuple[dict[str, torch.Tensor], list[str], bool]:
    """Map an official Point-MAE / Point-BERT state dict to :class:`PointTransformer` keys.

    Args:
        state_dict: The official ``ckpt["base_model"]`` (pre-trained or fine-tuned; ``module.`` prefixes allowed).
        family: ``"point_mae"`` or ``"point_bert"``.

    Returns:
        ``(converted, dropped, pretraining)``: the renamed tensors, the pre-training-only keys left out (MAE
        decoder and mask token; Point-BERT's key encoder, dVAE, queue, lm/cls heads and mask token), and whether
        the file is a pre-training checkpoint.
    """
    if family not in _PRETRAIN_ONLY:
        raise ValueError(f"unknown point-cloud family {family!r}; families: {sorted(_PRETRAIN_ONLY)}")
    exact, prefixes = _PRETRAIN_ONLY[family]
    encoder_prefix = "MAE_encoder." if family == "point_mae" else "transformer_q."
    out, dropped, pretraining = {}, [], False
    for key, value in state_dict.items():
        k = key
        while k.startswith("module."):
            k = k[len("module."):]
        if k.startswith("base_model."):
            k = k[len("base_model."):]
        if k in exact or k.startswith(prefixes):
            dropped.append(key)
            pretraining = True
            continue
        if k.startswith(encoder_prefix):
            k = k[len(encoder_prefix):]
            pretraining = True
        for old, new in _RENAMES:
            if k.startswith(old):
                k = new + k[len(old):]
        out[k] = value
    return out, dropped, pretraining


def to_official_state_dict(model_or_state: Union[nn.Module, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The fine-tuned official key format (``blocks.blocks.*``, ``cls_head_finetune.*``) of a model's weights,
    loadable by the official ``PointTransformer`` (wrap it as ``{"base_model": ...}`` for the official scripts)."""
    sd = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    out = {}
    for k, v in sd.items():
        for new, old in _RENAMES:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = v
    return out


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"checkpoint {path!r} holds Python objects that torch.load(weights_only=True) refuses; "
                         "vpeft loads plain tensors only. Re-save ckpt['base_model'] alone, in an environment you "
                         f"trust: torch.save({{'base_model': ckpt['base_model']}}, 'clean.pth') ({e})") from None
    for wrapper in ("base_model", "model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {path!r} holds a {type(obj).__name__}, not a state dict")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"checkpoint {path!r}: the state dict has non-tensor entries {bad[:8]}; expected "
                         "ckpt['base_model'] of the official Point-MAE / Point-BERT code")
    return obj


def _file_num_classes(converted: dict[str, torch.Tensor]) -> Optional[int]:
    """Classes of a converted file's head (its last Linear), or None without a head."""
    heads = sorted((int(k.split(".")[1]), k) for k in converted if k.startswith("head.") and k.endswith(".weight")
                   and converted[k].dim() == 2)
    return int(converted[heads[-1][1]].shape[0]) if heads else None


def load_official_checkpoint(model: PointTransformer, path: Union[str, os.PathLike], family: str,
                             converted: Optional[tuple] = None) -> dict[str, Any]:
    """Load an official pre-trained or fine-tuned checkpoint into ``model``; check everything first.

    Encoder tensors (mini-PointNet, ``reduce_dim``, positions, blocks, final norm) must all be present with the
    model's shapes. The head loads when the file's head has the model's keys and shapes, else it keeps its init
    (a note). The cls token and position may be absent only from a Point-MAE pre-training file (its encoder has
    none; the official fine-tuning initialises them), also a note.

    Returns:
        ``{"loaded": [...], "dropped": [...], "notes": [...]}``, also stored as ``model.vpeft_load_report``.

    Raises:
        ValueError: missing or unexpected encoder keys, or shape mismatches (named).
    """
    path = os.fspath(path)
    sd, dropped, pretraining = converted if converted is not None else \
        convert_official_state_dict(_read_state_dict(path), family)
    want = model.state_dict()
    notes = []
    head_want = {k: v for k, v in want.items() if k.startswith("head.")}
    head_have = {k: v for k, v in sd.items() if k.startswith("head.")}
    load = {k: v for k, v in sd.items() if not k.startswith("head.")}
    if head_have and head_have.keys() == head_want.keys() and all(
            head_have[k].shape == v.shape for k, v in head_want.items()):
        load.update(head_have)
    elif head_have:
        notes.append(f"the file's classifier head ({len(head_have)} tensors, {_file_num_classes(sd)} classes) does "
                     f"not fit the model's ({model.num_classes} classes, {model.head_style} layout): head left "
                     "at its init")
    elif head_want:
        notes.append("the file has no classifier head: head left at its init")
    body_want = {k for k in want if not k.startswith("head.")}
    missing = sorted(body_want - load.keys())
    optional = {"cls_token", "cls_pos"} if (pretraining and family == "point_mae") else set()
    if optional & set(missing):
        notes.append(f"{sorted(optional & set(missing))} not in the pre-training file (its encoder has no cls "
                     "token): initialised as the official fine-tuning does (truncated normal, std 0.02)")
        missing = [k for k in missing if k not in optional]
    unexpected = sorted(load.keys() - want.keys())
    shapes = [f"{k}: {tuple(load[k].shape)} in the file, {tuple(want[k].shape)} in the model"
              for k in sorted(load.keys() & want.keys()) if load[k].shape != want[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"checkpoint {path!r} does not fit {family} {type(model).__name__} (width {model.embed_dim}, depth "
            f"{len(model.blocks)}, encoder_dims {model.encoder.out_channels}): {len(missing)} missing encoder keys "
            f"{missing[:8]}, {len(unexpected)} unexpected keys {unexpected[:8]}, {len(shapes)} shape mismatches "
            f"{shapes[:4]}")
    result = model.load_state_dict(load, strict=False)
    left = [k for k in result.missing_keys if not k.startswith("head.") and k not in optional]
    if left or result.unexpected_keys:  # pragma: no cover - guarded by the checks above
        raise ValueError(f"checkpoint {path!r}: missing {left}, unexpected {result.unexpected_keys}")
    for n in notes:
        logger.info("%s: %s", path, n)
    report = {"loaded": sorted(load), "dropped": dropped, "notes": notes}
    model.vpeft_load_report = report
    return report


def create_point_transformer(family: str, name: str, pretrained: Union[bool, str, os.PathLike] = False,
                             **kwargs) -> PointTransformer:
    """Build ``point_mae:<name>`` / ``point_bert:<name>``; ``pretrained`` is False or an official checkpoint path.

    Without ``num_classes`` the head follows a fine-tuned file's class count (40 otherwise, the ModelNet40 config).

    Raises:
        ValueError: unknown name, ``pretrained=True`` (no hub weights: pass the official file's path), or a
            checkpoint that does not fit.
        TypeError: ``pretrained`` is neither a bool nor a path.
    """
    if name not in ARCHS:
        raise ValueError(f"unknown {family} model {name!r}; names: {sorted(ARCHS)} (e.g. '{family}:base')")
    cfg = {**ARCHS[name], **FAMILIES[family], **kwargs}
    if isinstance(pretrained, bool):
        if pretrained:
            raise ValueError(f"{family}: there is no hub download for the official checkpoints; pass the path of "
                             f"the released .pth file, e.g. create_backbone('{family}:{name}', "
                             "pretrained='/path/to/pretrain.pth')")
        return PointTransformer(**cfg)
    if not isinstance(pretrained, (str, os.PathLike)):
        raise TypeError(f"pretrained must be True, False or a checkpoint path, got {type(pretrained).__name__}")
    from . import _local_checkpoint

    path = _local_checkpoint(pretrained)
    converted = convert_official_state_dict(_read_state_dict(path), family)
    if "num_classes" not in kwargs:
        n = _file_num_classes(converted[0])
        if n is not None:
            cfg["num_classes"] = n
    model = PointTransformer(**cfg)
    load_official_checkpoint(model, path, family, converted)
    return model


def _register_families() -> None:
    from . import register_backbone

    @register_backbone("point_mae")
    def _point_mae(name: str, pretrained, **kwargs) -> nn.Module:
        return create_point_transformer("point_mae", name, pretrained, **kwargs)

    @register_backbone("point_bert")
    def _point_bert(name: str, pretrained, **kwargs) -> nn.Module:
        return create_point_transformer("point_bert", name, pretrained, **kwargs)


# --- spec ---------------------------------------------------------------------------------------------------------


def _is_point_transformer(model: nn.Module) -> bool:
    return isinstance(model, PointTransformer)


@register_spec(_is_point_transformer)
def point_transformer_spec(model: nn.Module) -> BackboneSpec:
    """Spec of :class:`PointTransformer`: timm blocks (fused ``qkv``), one cls prefix token, NLC tokens.

    ``embed`` is the mini-PointNet's last 1x1 conv (output ``(B*G, C, S)``, channels on dim 1, max-pooled after),
    exposed once the spec registry classifies ``nn.Conv1d`` as a ``conv`` site. ``global_sites["pos_embed"]`` names
    the centre-position MLP (input: group centres ``(B, G, 3)``; output: their positions ``(B, G, width)``).
    """
    blk = model.blocks[0]
    global_sites = {"final_norm": "norm"}
    embed = "encoder.second_conv.3"
    if _module_kind(model.get_submodule(embed)) == "conv":
        global_sites = {"embed": embed, **global_sites}
    if not isinstance(model.head, nn.Identity):
        global_sites["head"] = "head"
    # Not a semantic site (absent from GLOBAL_SITES, so never resolved by name): the centre -> position MLP whose
    # input is the group centres, where point-cloud methods (IDPT, Point-PEFT) read the geometry of a forward.
    global_sites["pos_embed"] = "pos_embed"
    tower = TowerSpec(
        name="",
        depth=len(model.blocks),
        width=model.embed_dim,
        num_heads=blk.attn.num_heads,
        block="blocks.{i}",
        block_sites={"norm1": "norm1", "attn": "attn", "qkv": "attn.qkv", "attn_out": "attn.proj",
                     "norm2": "norm2", "mlp": "mlp", "mlp_in": "mlp.fc1", "mlp_out": "mlp.fc2"},
        global_sites=global_sites,
        attention="fused_linear",
        layout="NLC",
        num_prefix_tokens=model.num_prefix_tokens,
        embed_channel_dim=1,
    )
    return BackboneSpec("point_transformer", {"": tower}, ("",))


_register_families()
