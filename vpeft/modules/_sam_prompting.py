"""MapSAM-style automatic prompting for SAM: a light head, point prompts, a positional-semantic prompt, masked
attention.

MapSAM (Xue Xia, Daiwei Zhang, Wenxuan Song, Wei Huang, Lorenz Hurni, "MapSAM: Adapting Segment Anything Model for
Automated Feature Detection in Historical Maps", arXiv:2411.06971, 2024) makes SAM prompt-free without dropping its
prompt path:

1. A light prompt generator reads the image embedding and predicts a coarse foreground logit map
   (:class:`PromptGenerator`: three 1x1 convolutions 256 -> 64 -> 16 -> 1 with channel LayerNorm and GELU between,
   17,665 parameters for SAM's 256-channel embedding). It is supervised by binary cross-entropy against the
   foreground (``label > 0``) at the decoder's low resolution (MapSAM's "hint" loss, weight 1).
2. Positive and negative point prompts are read from the coarse map (:func:`select_points`): the ``k`` most
   confident foreground pixels (label 1) and the ``k`` least (label 0), ``k = 2``, on the coarse logits upsampled to
   the input resolution; they go through SAM's own prompt encoder (positional encoding + point-type embedding).
3. The positional-semantic prompt adds a target embedding to every decoder token (:func:`target_embedding`): the
   image embedding averaged over the coarse foreground (probability >= 0.2), so the point tokens carry what the
   target looks like as well as where it is.
4. Masked attention: the decoder's token-to-image cross-attentions see only the image positions of the coarse
   foreground (probability >= 0.2); an image whose coarse mask is empty attends everywhere (Mask2Former's rule).

:func:`decode` is a batched re-implementation of the official ``MaskDecoder.predict_masks`` and ``TwoWayTransformer``
forward that calls the official modules' own layers (so adapters on ``q_proj``/``v_proj`` and trained decoder weights
apply) and adds the target embedding and the attention mask; without them it equals the official decoder (tested to
float32 noise). The official decoder broadcasts one image over many prompt sets; here every image has its own.

Deviations from the reference implementation (Xue-Xia/MapSAM):
    * The target embedding is added to the decoder's queries before each two-way block and to the final
      token-to-image query (the PerSAM-style "target-semantic prompting" the paper describes). The released code
      adds it in place to a tensor that aliases the point embeddings, so there it also accumulates into the
      positional term of later layers; that side effect is not reproduced.
    * Masked attention is the standard additive ``-inf`` mask before the softmax (Mask2Former). The released code
      adds the mask to the post-softmax attention and applies a second softmax.
    * Point selection is restricted to the image area (the padding of a non-square input never becomes a prompt)
      and done on the coarse logits at ``img_size``; the released code selects on the full padded square.
    * The prompt generator reads the final image embedding, as the released code does (the paper's text speaks of
      multi-layer embeddings).
    * MapSAM's preset (``configs/experiment/sam_mapsam_vit_b.yaml``) uses vpeft's DoRA, which follows the DoRA paper
      and HF peft: one magnitude per output row of each q/v slice and Kaiming-uniform ``A``. The released MapSAM
      code normalises each slice per input column (``norm(dim=0)`` of the ``(out, in)`` weight) and draws ``A`` from
      ``N(0, 1/r)``.
    * The hint loss is ``binary_cross_entropy_with_logits`` (the released code applies ``BCELoss`` to a sigmoid,
      numerically the same function), computed over the image area of the low-resolution grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class AutoPromptConfig:
    """MapSAM automatic prompting (see :mod:`vpeft.modules._sam_prompting`); defaults from the released code.

    Attributes:
        points: ``k``: positive and ``k`` negative point prompts per image (MapSAM: 2 + 2).
        threshold: Coarse foreground probability above which a position counts as target for the target embedding
            and the attention mask (MapSAM: 0.2).
        loss_weight: Weight of the prompt generator's binary cross-entropy (MapSAM: 1).
        semantic: Add the target embedding to the decoder tokens (the positional-semantic prompt).
        masked_attention: Restrict the token-to-image cross-attentions to the coarse foreground.
        hidden: Channels of the prompt generator's two hidden 1x1 convolutions (MapSAM: 64, 16).
    """

    points: int = 2
    threshold: float = 0.2
    loss_weight: float = 1.0
    semantic: bool = True
    masked_attention: bool = True
    hidden: tuple[int, int] = (64, 16)

    def validate(self) -> None:
        """Raise ``ValueError``/``TypeError`` naming a bad field."""
        if not isinstance(self.points, int) or isinstance(self.points, bool) or self.points < 1:
            raise ValueError(f"auto_prompt.points must be an int >= 1 (points of each sign), got {self.points!r}")
        if not isinstance(self.threshold, (int, float)) or isinstance(self.threshold, bool) \
                or not 0.0 < self.threshold < 1.0:
            raise ValueError(f"auto_prompt.threshold must be a probability in (0, 1), got {self.threshold!r}")
        if not isinstance(self.loss_weight, (int, float)) or isinstance(self.loss_weight, bool) \
                or self.loss_weight < 0:
            raise ValueError(f"auto_prompt.loss_weight must be a number >= 0, got {self.loss_weight!r}")
        for name in ("semantic", "masked_attention"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"auto_prompt.{name} must be a bool, got {getattr(self, name)!r}")
        hidden = tuple(self.hidden) if isinstance(self.hidden, (list, tuple)) else None
        if hidden is None or len(hidden) != 2 or not all(isinstance(h, int) and not isinstance(h, bool) and h > 0
                                                         for h in hidden):
            raise ValueError(f"auto_prompt.hidden must be two positive ints, got {self.hidden!r}")
        self.hidden = hidden


class PromptGenerator(nn.Module):
    """The light head: ``(B, C, h, w)`` image embedding -> ``(B, 1, h, w)`` coarse foreground logits.

    Args:
        in_channels: Channels of the image embedding (SAM: 256).
        hidden: Channels of the two hidden 1x1 convolutions.
    """

    def __init__(self, in_channels: int = 256, hidden: tuple[int, int] = (64, 16)) -> None:
        super().__init__()
        from segment_anything.modeling.common import LayerNorm2d

        h1, h2 = hidden
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, h1, 1), LayerNorm2d(h1), nn.GELU(),
            nn.Conv2d(h1, h2, 1), LayerNorm2d(h2), nn.GELU(),
            nn.Conv2d(h2, 1, 1),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.layers(embedding)


def select_points(coarse: torch.Tensor, k: int, img_size: int,
                  input_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` highest (label 1) and ``k`` lowest (label 0) pixels of the coarse logits, as SAM point prompts.

    Args:
        coarse: ``(B, 1, h, w)`` coarse logits over the padded ``img_size`` square.
        k: Points of each sign.
        img_size: The encoder's input size (the coarse map is upsampled to it, bilinear).
        input_size: ``(H, W)`` of the image inside the padded square; only those pixels can be chosen.

    Returns:
        ``(coords (B, 2k, 2), labels (B, 2k))``: integer pixel ``(x, y)`` coordinates (the prompt encoder adds the
        half-pixel shift) as float, positives first.
    """
    hh, ww = int(input_size[0]), int(input_size[1])
    if k > hh * ww:
        raise ValueError(f"auto_prompt.points={k} exceeds the {hh}x{ww} image's pixels")
    with torch.no_grad():
        up = F.interpolate(coarse.float(), (img_size, img_size), mode="bilinear", align_corners=False)
        flat = up[:, 0, :hh, :ww].reshape(coarse.shape[0], -1)
        pos = flat.topk(k, dim=1).indices
        neg = flat.topk(k, dim=1, largest=False).indices
        idx = torch.cat([pos, neg], dim=1)
        coords = torch.stack([idx % ww, idx // ww], dim=-1).float()  # pixel indices: float32 even under AMP
        labels = torch.cat([torch.ones_like(pos), torch.zeros_like(neg)], dim=1)
    return coords, labels


def foreground_mask(coarse: torch.Tensor, threshold: float) -> torch.Tensor:
    """``(B, h * w)`` bool: coarse foreground probability ``>= threshold`` (no gradient)."""
    return (torch.sigmoid(coarse.detach().float()) >= threshold).flatten(1)


def target_embedding(embedding: torch.Tensor, fg: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
    """``(B, 1, C)`` image embedding averaged over the coarse foreground ``fg`` (``(B, h * w)`` bool).

    An image with an empty coarse foreground averages with the foreground probabilities as weights instead, so every
    image gets a target embedding. The weights carry no gradient (MapSAM detaches the coarse map here).
    """
    prob = torch.sigmoid(coarse.detach().float()).flatten(1)
    weights = torch.where(fg.any(dim=1, keepdim=True), fg.float(), prob)
    weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
    return torch.einsum("bn,bcn->bc", weights.to(embedding.dtype), embedding.flatten(2)).unsqueeze(1)


def attention_bias(fg: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(B, 1, 1, h * w)`` additive mask: ``-inf`` outside the coarse foreground, 0 inside; rows of images whose
    foreground is empty are all 0 (attend everywhere)."""
    keep = fg | ~fg.any(dim=1, keepdim=True)
    bias = torch.zeros(fg.shape, dtype=dtype, device=fg.device).masked_fill(~keep, float("-inf"))
    return bias[:, None, None, :]


def auto_prompt_decode(sam: nn.Module, head: nn.Module, cfg: AutoPromptConfig, images: torch.Tensor,
                       embeddings: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MapSAM's forward on a vpeft ``SamModel``: coarse mask -> point prompts, target embedding, attention mask ->
    decoder.

    Args:
        sam: The (adapted) ``SamModel``.
        head: The :class:`PromptGenerator`.
        cfg: The :class:`AutoPromptConfig`.
        images: ``(B, 3, H, W)`` RGB on the 0..255 scale, ``H, W <= img_size``.
        embeddings: The images' embeddings when already computed.

    Returns:
        ``(masks (B, T, 4h, 4w), coarse (B, 1, h, w))``: every mask token's low-resolution logits and the coarse
        logits.
    """
    emb = sam.image_embeddings(images) if embeddings is None else embeddings
    coarse = head(emb)
    points = select_points(coarse, cfg.points, sam.img_size, tuple(images.shape[-2:]))
    sparse, dense = sam.prompt_encoder(points=points, boxes=None, masks=None)
    fg = foreground_mask(coarse, cfg.threshold)
    target = target_embedding(emb, fg, coarse) if cfg.semantic else None
    bias = attention_bias(fg, emb.dtype) if cfg.masked_attention else None
    masks, _ = decode(sam.mask_decoder, emb, sam.prompt_encoder.get_dense_pe(), sparse, dense, target, bias)
    return masks, coarse


# -- the decoder, batched over images, with target embedding and attention mask ----------------------------------------
def _attend(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The official ``segment_anything`` ``Attention`` forward (its own projections) with an optional additive mask."""
    b, h = q.shape[0], attn.num_heads

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(b, x.shape[1], h, x.shape[2] // h).transpose(1, 2)

    qh, kh, vh = heads(attn.q_proj(q)), heads(attn.k_proj(k)), heads(attn.v_proj(v))
    scores = (qh @ kh.transpose(-2, -1)) / math.sqrt(qh.shape[-1])
    if bias is not None:
        scores = scores + bias
    out = scores.softmax(dim=-1) @ vh
    return attn.out_proj(out.transpose(1, 2).reshape(b, out.shape[2], -1))


def _two_way(transformer: nn.Module, image: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor,
             target: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The official ``TwoWayTransformer`` forward with the target embedding added to the queries before every block
    and to the final query, and ``bias`` on the token-to-image cross-attentions."""
    keys = image.flatten(2).permute(0, 2, 1)
    key_pe = image_pe.flatten(2).permute(0, 2, 1)
    queries, query_pe = tokens, tokens
    for layer in transformer.layers:
        if target is not None:
            queries = queries + target
        if layer.skip_first_layer_pe:
            queries = _attend(layer.self_attn, queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + _attend(layer.self_attn, q, q, queries)
        queries = layer.norm1(queries)
        queries = layer.norm2(queries + _attend(layer.cross_attn_token_to_image, queries + query_pe, keys + key_pe,
                                                keys, bias))
        queries = layer.norm3(queries + layer.mlp(queries))
        keys = layer.norm4(keys + _attend(layer.cross_attn_image_to_token, keys + key_pe, queries + query_pe,
                                          queries))
    q = queries + query_pe
    if target is not None:
        q = q + target
    queries = transformer.norm_final_attn(queries + _attend(transformer.final_attn_token_to_image, q, keys + key_pe,
                                                            keys, bias))
    return queries, keys


def decode(decoder: nn.Module, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor,
           dense: torch.Tensor, target: Optional[torch.Tensor] = None,
           bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask logits ``(B, T, 4h, 4w)`` of every mask token and IoU predictions ``(B, T)``, one prompt set per image.

    Args:
        decoder: The official ``MaskDecoder`` (any number of mask tokens).
        image_embeddings: ``(B, C, h, w)``.
        image_pe: ``(1, C, h, w)`` dense positional encoding (``prompt_encoder.get_dense_pe()``).
        sparse: ``(B, N, C)`` prompt tokens of each image (or ``(1, N, C)`` shared).
        dense: ``(B, C, h, w)`` or ``(1, C, h, w)`` dense prompt embedding.
        target: ``(B, 1, C)`` target embedding added to the tokens, or ``None``.
        bias: ``(B, 1, 1, h * w)`` additive mask of the token-to-image attentions, or ``None``.
    """
    b = image_embeddings.shape[0]
    out_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    out_tokens = out_tokens.unsqueeze(0).expand(b, -1, -1)
    tokens = torch.cat([out_tokens, sparse.expand(b, -1, -1)], dim=1)
    src = image_embeddings + dense
    pos = image_pe.expand(b, -1, -1, -1)
    _, c, h, w = src.shape
    hs, src = _two_way(decoder.transformer, src, pos, tokens, target, bias)
    n = decoder.num_mask_tokens
    iou_out, mask_out = hs[:, 0], hs[:, 1:1 + n]
    upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
    hyper = torch.stack([decoder.output_hypernetworks_mlps[i](mask_out[:, i]) for i in range(n)], dim=1)
    _, cu, hu, wu = upscaled.shape
    masks = (hyper @ upscaled.reshape(b, cu, hu * wu)).reshape(b, n, hu, wu)
    return masks, decoder.iou_prediction_head(iou_out)
