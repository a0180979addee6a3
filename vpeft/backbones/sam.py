"""Segment Anything (SAM; Kirillov et al., ICCV 2023, arXiv:2304.02643): creation, official checkpoints and spec.

``create_backbone("sam:vit_b" | "sam:vit_l" | "sam:vit_h", pretrained=...)`` builds a :class:`SamModel`:

* ``image_encoder``: timm's ``VisionTransformerSAM`` (``samvit_{base,large,huge}_patch16``) with the official
  encoder's settings (LayerNorm eps 1e-6, windowed blocks with global blocks at the official indices, decomposed
  relative positions, the conv neck) and no classifier, so ``image_encoder(x)`` is the neck's
  ``(B, 256, img_size / 16, img_size / 16)`` image embedding, like the official ``ImageEncoderViT``.
* ``prompt_encoder`` and ``mask_decoder``: the official ``segment_anything`` modules, built with the
  hyper-parameters of ``segment_anything/build_sam.py`` (prompt dim 256, mask-input channels 16, a depth-2
  two-way transformer of width 256 with 8 heads and MLP 2048, 3 multimask outputs, IoU head of depth 3 and width 256).
* SAM's pre-processing: pixel mean/std normalisation and zero padding to ``img_size`` (:meth:`SamModel.preprocess`),
  resizing the longest side to ``img_size`` (:meth:`SamModel.resize_longest_side`) with the matching coordinate
  transforms, and mask post-processing (:meth:`SamModel.postprocess_masks`).

``pretrained`` takes the official ``sam_vit_{b,l,h}_*.pth`` file (one state dict with ``image_encoder.*``,
``prompt_encoder.*`` and ``mask_decoder.*`` keys), read with ``torch.load(weights_only=True)``. The encoder keys go
through timm's own SAM key filter (``vision_transformer_sam.checkpoint_filter_fn``), the rest load into the official
modules; the whole key set is checked before anything is loaded. ``pretrained=True`` is refused: timm's hub holds
only the image encoder (``samvit_base_patch16.sa1b``), and the decoder exists only in the official file.

Adapter targets (spec towers): ``image_encoder`` (the default tower: unqualified names such as ``"q"`` mean it) and
``mask_decoder``. The image encoder's blocks run on windowed ``(B, H, W, C)`` token grids (layout ``NHWC``, no prefix
tokens): per-site methods (LoRA and other weight deltas on the fused ``qkv`` Linear, ``attn_out``,
``mlp_in``/``mlp_out``; SSF and BitFit on norms and Linears) apply; token methods that insert tokens into a sequence
(VPT) refuse the tower. The ``mask_decoder`` tower holds the attention modules of the official decoder's two-way
transformer, in forward order: per ``transformer.layers.{j}`` its ``self_attn``, ``cross_attn_token_to_image`` and
``cross_attn_image_to_token``, then ``final_attn_token_to_image`` (seven for SAM's depth-2 decoder; ``layers=[6]`` or
``[-1]`` is the final one). Its only sites are ``mask_decoder.q``/``.k``/``.v``/``.attn_out``: the separate
``q_proj``/``k_proj``/``v_proj``/``out_proj`` Linears (256 -> 256 in self-attention, 256 -> 128 in the cross
attentions), so weight-delta methods (LoRA, DoRA, ...) attach there, while ``block``, ``qkv``, norm and MLP sites do
not exist on it (VPT, side networks and MLP adapters refuse it). SAMed's decoder variant (hitachinsk/SAMed,
``sam_lora_image_encoder_mask_decoder.py``: LoRA on q and v of the encoder and of every decoder attention, the rest
of the decoder and the prompt encoder trained in full, the decoder transformer's own weights frozen) is::

    get_peft_model(model, LoraConfig(r=4, targets=["q", "v", "mask_decoder.q", "mask_decoder.v"]),
                   trainable_extra=["prompt_encoder", "mask_decoder.iou_token", "mask_decoder.mask_tokens",
                                    "mask_decoder.output_upscaling", "mask_decoder.output_hypernetworks_mlps",
                                    "mask_decoder.iou_prediction_head"])

Fine-tune the whole decoder instead with ``trainable_extra=["mask_decoder"]``.

Deviations from the official implementation (facebookresearch/segment-anything):
    * The image encoder is timm's re-implementation (fused scaled-dot-product attention with the relative-position
      bias as an additive mask); on the same weights it matches the official encoder to ~1e-6 relative.
    * ``forward`` is batched on tensors (one prompt set per image) and returns the low-resolution mask logits and
      IoU predictions; the official ``Sam.forward`` takes a list of per-image dicts, runs under ``no_grad`` and
      returns thresholded full-size masks. The official decoder broadcasts one image over its prompts, so with
      prompts the decoder runs once per image; prompt-free it runs once for the whole batch.
    * :meth:`SamModel.resize_longest_side` resizes by the image's height and width (the official
      ``ResizeLongestSide.apply_image_torch`` reads the batch and channel sizes instead).
    * ``img_size`` may differ from 1024 (the positional embedding, the prompt encoder's embedding size and the mask
      sizes follow it); official weights load at another size with ``resample_pos_embed=True`` (SAMed's bilinear
      resizing of the absolute positional embedding and of the global blocks' relative-position tables).
"""

from __future__ import annotations

import os
from functools import partial
from typing import NamedTuple, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import register_backbone
from ._spec import BackboneSpec, TowerSpec, register_spec

#: vpeft name -> (timm architecture, official release file name).
SAM_MODELS = {
    "vit_b": ("samvit_base_patch16", "sam_vit_b_01ec64.pth"),
    "vit_l": ("samvit_large_patch16", "sam_vit_l_0b3195.pth"),
    "vit_h": ("samvit_huge_patch16", "sam_vit_h_4b8939.pth"),
}
_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
#: Pixel statistics of the official model (RGB, 0..255 scale).
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
#: Hyper-parameters of segment_anything/build_sam.py shared by all sizes.
PROMPT_EMBED_DIM = 256
MASK_IN_CHANS = 16
#: Encoder arguments vpeft fixes (the classifier-free neck output is what the decoder reads).
_RESERVED = ("num_classes", "global_pool", "neck_chans", "norm_layer", "pretrained_cfg_overlay")


class SamOutput(NamedTuple):
    """Output of :meth:`SamModel.forward`.

    Attributes:
        low_res_masks: Mask logits ``(B, C, 4 * h, 4 * w)`` for an image embedding of ``h x w`` (256 x 256 at
            ``img_size=1024``); ``C`` is 3 with ``multimask_output`` else 1.
        iou_predictions: Predicted mask quality ``(B, C)``.
    """

    low_res_masks: torch.Tensor
    iou_predictions: torch.Tensor


class SamModel(nn.Module):
    """SAM with timm's image encoder and the official prompt encoder and mask decoder.

    Args:
        image_encoder: A timm ``VisionTransformerSAM`` whose ``forward`` returns the ``(B, 256, h, w)`` neck output.
        prompt_encoder: ``segment_anything.modeling.PromptEncoder`` sized for that embedding.
        mask_decoder: ``segment_anything.modeling.MaskDecoder``.
    """

    mask_threshold: float = 0.0

    def __init__(self, image_encoder: nn.Module, prompt_encoder: nn.Module, mask_decoder: nn.Module) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.img_size = int(image_encoder.patch_embed.img_size[0])
        # Not persistent: the official checkpoint has no such keys (the official Sam registers them the same way).
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(-1, 1, 1), persistent=False)

    # -- pre- and post-processing ----------------------------------------------------------------------------------
    @staticmethod
    def preprocess_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
        """``(h, w)`` with the longer side scaled to ``long_side`` (rounded as the official ``ResizeLongestSide``)."""
        scale = long_side * 1.0 / max(height, width)
        return int(height * scale + 0.5), int(width * scale + 0.5)

    def resize_longest_side(self, images: torch.Tensor) -> torch.Tensor:
        """Resize ``(B, 3, H, W)`` float images so the longer side is ``img_size`` (bilinear, antialiased)."""
        _check_images(images)
        size = self.preprocess_shape(images.shape[-2], images.shape[-1], self.img_size)
        return F.interpolate(images, size, mode="bilinear", align_corners=False, antialias=True)

    def transform_coords(self, coords: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        """Map ``(..., 2)`` pixel ``(x, y)`` coordinates of an ``original_size`` ``(H, W)`` image into the resized
        frame of :meth:`resize_longest_side`."""
        old_h, old_w = original_size
        new_h, new_w = self.preprocess_shape(old_h, old_w, self.img_size)
        scale = torch.tensor([new_w / old_w, new_h / old_h], device=coords.device, dtype=torch.float)
        return coords.to(torch.float) * scale

    def transform_boxes(self, boxes: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        """Map ``(B, 4)`` ``(x0, y0, x1, y1)`` boxes like :meth:`transform_coords`."""
        return self.transform_coords(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Normalise ``(B, 3, H, W)`` RGB images on the 0..255 scale (``H, W <= img_size``) with SAM's pixel
        statistics and zero-pad them at the bottom and right to ``img_size x img_size``."""
        _check_images(images)
        h, w = images.shape[-2:]
        if h > self.img_size or w > self.img_size:
            raise ValueError(f"images of {h}x{w} pixels exceed the encoder's {self.img_size}x{self.img_size} input; "
                             "resize them first with resize_longest_side()")
        x = (images - self.pixel_mean) / self.pixel_std
        return F.pad(x, (0, self.img_size - w, 0, self.img_size - h))

    def postprocess_masks(self, masks: torch.Tensor, input_size: tuple[int, int],
                          original_size: tuple[int, int]) -> torch.Tensor:
        """Upscale ``(B, C, h, w)`` mask logits to the padded input, crop the padding (``input_size``: the resized
        image's ``(H, W)``) and resize to ``original_size`` (as the official ``Sam.postprocess_masks``)."""
        masks = F.interpolate(masks, (self.img_size, self.img_size), mode="bilinear", align_corners=False)
        masks = masks[..., : input_size[0], : input_size[1]]
        return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)

    # -- model -----------------------------------------------------------------------------------------------------
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 256, h, w)`` image embeddings of ``(B, 3, H, W)`` RGB images on the 0..255 scale (pre-processed
        here with :meth:`preprocess`)."""
        return self.image_encoder(self.preprocess(images))

    def decode(
            self,
            image_embeddings: torch.Tensor,
            points: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
            boxes: Optional[torch.Tensor] = None,
            masks: Optional[torch.Tensor] = None,
            multimask_output: bool = False,
    ) -> SamOutput:
        """Masks for precomputed image embeddings; prompts as in :meth:`forward`."""
        b = image_embeddings.shape[0]
        self._check_prompts(b, points, boxes, masks)
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=masks)
        pe = self.prompt_encoder.get_dense_pe()
        if sparse.shape[0] == 1 and dense.shape[0] == 1:
            # Prompt-free: the one (empty) prompt set broadcasts over the batch inside the official decoder.
            return SamOutput(*self.mask_decoder(image_embeddings=image_embeddings, image_pe=pe,
                                                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                                multimask_output=multimask_output))
        # The official decoder repeats each image embedding once per prompt set (one image, many prompts); with one
        # prompt set per image it runs once per image.
        outs = [self.mask_decoder(image_embeddings=image_embeddings[i:i + 1], image_pe=pe,
                                  sparse_prompt_embeddings=sparse[i:i + 1], dense_prompt_embeddings=dense[i:i + 1],
                                  multimask_output=multimask_output) for i in range(b)]
        return SamOutput(torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]))

    def forward(
            self,
            images: torch.Tensor,
            points: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
            boxes: Optional[torch.Tensor] = None,
            masks: Optional[torch.Tensor] = None,
            multimask_output: bool = False,
    ) -> SamOutput:
        """Mask logits and IoU predictions for a batch of images with one prompt set per image (or none).

        Args:
            images: ``(B, 3, H, W)`` RGB on the 0..255 scale, already resized so that ``H, W <= img_size``
                (see :meth:`resize_longest_side`); normalised and padded here.
            points: ``(coords, labels)``: ``(B, N, 2)`` pixel ``(x, y)`` in the resized frame and ``(B, N)`` labels
                (1 foreground, 0 background, -1 padding).
            boxes: ``(B, 4)`` ``(x0, y0, x1, y1)`` in the resized frame.
            masks: ``(B, 1, 4 * h, 4 * w)`` mask logits (e.g. a previous ``low_res_masks``).
            multimask_output: Three masks per prompt set instead of one.

        Returns:
            :class:`SamOutput` ``(low_res_masks (B, C, 4h, 4w), iou_predictions (B, C))``; upscale with
            :meth:`postprocess_masks`, threshold at :attr:`mask_threshold`.
        """
        return self.decode(self.image_embeddings(images), points, boxes, masks, multimask_output)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Gradient checkpointing of the image encoder's blocks (timm's)."""
        self.image_encoder.set_grad_checkpointing(enable)

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict under the official checkpoint's keys (loads into ``segment_anything``'s ``Sam``)."""
        return {_to_official(k): v for k, v in self.state_dict().items()}

    def _check_prompts(self, b: int, points, boxes, masks) -> None:
        if points is not None:
            if not (isinstance(points, (tuple, list)) and len(points) == 2):
                raise TypeError("points must be a (coords, labels) pair of tensors: (B, N, 2) and (B, N)")
            coords, labels = points
            if coords.dim() != 3 or coords.shape[-1] != 2 or labels.shape != coords.shape[:2]:
                raise ValueError(f"points: coords must be (B, N, 2) and labels (B, N), got {tuple(coords.shape)} and "
                                 f"{tuple(labels.shape)}")
        if boxes is not None and (boxes.dim() != 2 or boxes.shape[-1] != 4):
            raise ValueError(f"boxes must be (B, 4) (x0, y0, x1, y1), got {tuple(boxes.shape)}")
        if masks is not None:
            want = tuple(4 * s for s in self.prompt_encoder.image_embedding_size)
            if masks.dim() != 4 or masks.shape[1] != 1 or tuple(masks.shape[-2:]) != want:
                raise ValueError(f"masks must be (B, 1, {want[0]}, {want[1]}), got {tuple(masks.shape)}")
        sizes = {"points": None if points is None else points[0].shape[0],
                 "boxes": None if boxes is None else boxes.shape[0],
                 "masks": None if masks is None else masks.shape[0]}
        bad = {k: n for k, n in sizes.items() if n is not None and n != b}
        if bad:
            raise ValueError(f"one prompt set per image: {b} images, but prompt batch sizes {bad}")


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, 3, H, W) RGB tensor, got {shape}")


def _to_official(key: str) -> str:
    """vpeft/timm key -> official SAM key (timm renames the encoder MLP's ``lin1``/``lin2`` to ``fc1``/``fc2``)."""
    if key.startswith("image_encoder."):
        return key.replace(".mlp.fc", ".mlp.lin")
    return key


# --- creation --------------------------------------------------------------------------------------------------------


def build_sam(name: str, img_size: int = 1024, **encoder_kwargs) -> SamModel:
    """A randomly initialised :class:`SamModel` (``name``: ``vit_b``, ``vit_l`` or ``vit_h``).

    Args:
        name: Encoder size.
        img_size: Encoder input size (official: 1024). The image embedding is ``img_size / patch_size`` wide, the
            low-resolution masks four times that.
        **encoder_kwargs: Further timm ``VisionTransformerSAM`` arguments (``drop_path_rate``; ``embed_dim``,
            ``depth``, ``num_heads``, ``window_size``, ``global_attn_indexes`` for custom sizes).

    Raises:
        ValueError: unknown name, or an encoder argument vpeft fixes (``num_classes``, ``global_pool``,
            ``neck_chans``, ``norm_layer``).
    """
    import timm
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

    if name not in SAM_MODELS:
        raise ValueError(f"unknown SAM model {name!r}; models: {sorted(SAM_MODELS)} (ids 'sam:vit_b', ...)")
    reserved = sorted(k for k in encoder_kwargs if k in _RESERVED)
    if reserved:
        raise ValueError(f"SAM's image encoder arguments {reserved} are fixed by vpeft (the mask decoder reads the "
                         f"{PROMPT_EMBED_DIM}-channel neck output of a classifier-free encoder)")
    if not isinstance(img_size, int) or isinstance(img_size, bool) or img_size < 1:
        raise ValueError(f"img_size must be a positive int, got {img_size!r}")
    arch = SAM_MODELS[name][0]
    # norm_layer: the official encoder's LayerNorm eps is 1e-6 (timm's samvit default is torch's 1e-5).
    encoder = timm.create_model(arch, pretrained=False, num_classes=0, global_pool="", img_size=img_size,
                                norm_layer=partial(nn.LayerNorm, eps=1e-6), neck_chans=PROMPT_EMBED_DIM,
                                **encoder_kwargs)
    grid = tuple(int(g) for g in encoder.patch_embed.grid_size)
    prompt_encoder = PromptEncoder(embed_dim=PROMPT_EMBED_DIM, image_embedding_size=grid,
                                   input_image_size=(img_size, img_size), mask_in_chans=MASK_IN_CHANS)
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_EMBED_DIM, mlp_dim=2048, num_heads=8),
        transformer_dim=PROMPT_EMBED_DIM,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return SamModel(encoder, prompt_encoder, mask_decoder).eval()


def create_sam(name: str, pretrained: Union[bool, str, os.PathLike] = False, img_size: int = 1024,
               resample_pos_embed: bool = False, **encoder_kwargs) -> SamModel:
    """Create SAM ``name`` (``vit_b``, ``vit_l``, ``vit_h``), optionally from the official checkpoint file.

    Args:
        name: Encoder size.
        pretrained: False (random init) or the path of an official ``sam_vit_*.pth`` file (a ``.safetensors``
            file with the same keys also works). True is refused: the prompt encoder and mask decoder are not on
            timm's hub.
        img_size: Encoder input size; a checkpoint's positional embeddings fix it (1024 for the official files)
            unless ``resample_pos_embed``.
        resample_pos_embed: Load a checkpoint made for another input size (SAMed and MapSAM train the official
            weights at 512): its absolute positional embedding and the relative-position tables of the global-attention
            blocks are resized bilinearly (``align_corners=False``) to this ``img_size``, as SAMed's loader does.
        **encoder_kwargs: See :func:`build_sam`.

    Raises:
        ValueError: unknown name, ``pretrained=True``, a path that is not a readable checkpoint, or a checkpoint
            with missing or unexpected keys or other shapes (named, in the file's key format).
        TypeError: ``pretrained`` is neither a bool nor a path.
    """
    if name not in SAM_MODELS:
        raise ValueError(f"unknown SAM model {name!r}; models: {sorted(SAM_MODELS)} (ids 'sam:vit_b', ...)")
    path = None
    if isinstance(pretrained, (str, os.PathLike)):
        from . import _local_checkpoint

        path = _local_checkpoint(pretrained)
    elif not isinstance(pretrained, bool):
        raise TypeError(f"pretrained must be False or a checkpoint path, got {type(pretrained).__name__}")
    elif pretrained:
        arch, fname = SAM_MODELS[name]
        raise ValueError(
            f"pretrained=True is not available for SAM: timm's hub ({arch}.sa1b) holds only the image encoder, and "
            f"SAM's prompt encoder and mask decoder exist only in the official checkpoint. Download {_URL}{fname} "
            f"and pass pretrained='/path/to/{fname}' (for the image encoder alone use "
            f"create_backbone('timm:{arch}.sa1b', pretrained=True))")
    model = build_sam(name, img_size=img_size, **encoder_kwargs)
    if path is not None:
        load_official_checkpoint(model, path, resample_pos_embed=resample_pos_embed)
    elif resample_pos_embed:
        raise ValueError("resample_pos_embed=True needs a checkpoint path in pretrained (it resizes the file's "
                         "positional embeddings)")
    return model


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    # Training scripts often wrap the state dict ({"model": ...}) or save it from DDP ("module." prefixes).
    if isinstance(sd, dict) and len(sd) == 1 and next(iter(sd)) in ("model", "state_dict"):
        sd = next(iter(sd.values()))
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"checkpoint {path!r} is not a state dict of tensors (the official SAM release is one)")
    return {k.removeprefix("module."): v for k, v in sd.items()}


#: Encoder tensors whose first dimensions follow the input size (resized by ``resample_pos_embed``).
_SIZE_DEPENDENT = (".pos_embed", ".attn.rel_pos_h", ".attn.rel_pos_w")


def _resample(key: str, t: torch.Tensor, shape: tuple) -> torch.Tensor:
    """SAMed's resizing of a positional tensor to the model's ``shape``: bilinear, ``align_corners=False``, on the
    ``(1, H, W, C)`` grid of ``pos_embed`` or the ``(2S - 1, head_dim)`` table of ``rel_pos_*``."""
    x = t.float()
    if key.endswith(".pos_embed"):
        x = F.interpolate(x.permute(0, 3, 1, 2), shape[1:3], mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    else:
        x = F.interpolate(x[None, None], shape, mode="bilinear", align_corners=False)[0, 0]
    return x.to(t.dtype).contiguous()


def load_official_checkpoint(model: SamModel, path: str, resample_pos_embed: bool = False) -> None:
    """Load an official SAM state dict into ``model``; every key must match (checked before anything loads).

    Args:
        model: A :class:`SamModel` of the checkpoint's encoder size.
        path: The checkpoint file.
        resample_pos_embed: Resize the positional embedding and the relative-position tables when ``model`` has
            another ``img_size`` than the checkpoint (see :func:`create_sam`); any other shape difference is still an
            error.

    Raises:
        ValueError: missing or unexpected keys, or shape mismatches, named in the official key format.
    """
    from timm.models.vision_transformer_sam import checkpoint_filter_fn

    sd = _read_state_dict(path)
    enc = {k: v for k, v in sd.items() if k.startswith("image_encoder.")}
    converted = {f"image_encoder.{k}": v for k, v in checkpoint_filter_fn(enc, model.image_encoder).items()}
    converted.update({k: v for k, v in sd.items() if not k.startswith("image_encoder.")})
    want = model.state_dict()
    if resample_pos_embed:
        for k, v in want.items():
            t = converted.get(k)
            if (t is not None and t.shape != v.shape and k.startswith("image_encoder.")
                    and k.endswith(_SIZE_DEPENDENT) and t.dim() == v.dim() and t.shape[-1] == v.shape[-1]):
                converted[k] = _resample(k, t, tuple(v.shape))
    missing = sorted(_to_official(k) for k in want.keys() - converted.keys())
    unexpected = sorted(_to_official(k) for k in converted.keys() - want.keys())
    shapes = [f"{_to_official(k)}: {tuple(converted[k].shape)} in the file, {tuple(v.shape)} in the model"
              for k, v in want.items() if k in converted and converted[k].shape != v.shape]
    if missing or unexpected or shapes:
        hint = ("official files fit img_size=1024 (other sizes: resample_pos_embed=True) and the encoder size of "
                "their name")
        if not enc:
            hint = ("no image_encoder.* key: an image-encoder-only (timm) file loads with "
                    "create_backbone('timm:samvit_base_patch16', pretrained=path) and its size's architecture")
        raise ValueError(
            f"checkpoint {path!r} does not fit SAM with img_size={model.img_size}: {len(missing)} missing keys "
            f"{missing[:8]}, {len(unexpected)} unexpected keys {unexpected[:8]}, {len(shapes)} shape mismatches "
            f"{shapes[:4]} ({hint})")
    model.load_state_dict(converted, strict=True)


@register_backbone("sam")
def _sam_family(name: str, pretrained, **kwargs) -> nn.Module:
    return create_sam(name, pretrained, **kwargs)


# --- spec ------------------------------------------------------------------------------------------------------------


def _encoder_tower(name: str, prefix: str, encoder: nn.Module, head: Optional[str] = None) -> TowerSpec:
    blk = encoder.blocks[0]
    if not isinstance(getattr(getattr(blk, "attn", None), "qkv", None), nn.Linear):
        raise TypeError(f"SAM encoder block type {type(blk).__name__} has no fused attn.qkv Linear")
    global_sites = {"embed": f"{prefix}patch_embed.proj"}
    if not isinstance(encoder.norm_pre, nn.Identity):
        global_sites["pre_norm"] = f"{prefix}norm_pre"
    if head is not None:
        global_sites["head"] = head
    # The neck (conv + channel-first LayerNorm2d) is not a final_norm site: norm-site adapters act on the last
    # dimension, which for the neck's NCHW output is the width.
    return TowerSpec(
        name=name,
        depth=len(encoder.blocks),
        width=encoder.embed_dim,
        num_heads=blk.attn.num_heads,
        block=f"{prefix}blocks.{{i}}",
        block_sites={"norm1": "norm1", "attn": "attn", "qkv": "attn.qkv", "attn_out": "attn.proj",
                     "norm2": "norm2", "mlp": "mlp", "mlp_in": "mlp.fc1", "mlp_out": "mlp.fc2"},
        global_sites=global_sites,
        attention="fused_linear",
        layout="NHWC",  # blocks take (B, H, W, C) grids; windowed blocks partition them internally
        num_prefix_tokens=0,
        embed_channel_dim=1,
    )


#: Attention modules of one official ``TwoWayAttentionBlock``, in the order its forward calls them.
DECODER_BLOCK_ATTENTIONS = ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token")
#: The official decoder ``Attention``'s Linears by semantic site name (``out_proj`` maps back to the token width).
DECODER_ATTENTION_SITES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "attn_out": "out_proj"}


def decoder_attention_paths(decoder: nn.Module, prefix: str = "mask_decoder.") -> Optional[list[str]]:
    """Paths of the attention modules of an official two-way mask decoder, in forward order; ``None`` when the
    decoder is not built that way (then the spec has no ``mask_decoder`` tower).

    The order, which is the ``mask_decoder`` tower's block index: for each ``transformer.layers.{j}`` in turn its
    ``self_attn``, ``cross_attn_token_to_image`` and ``cross_attn_image_to_token``, then
    ``transformer.final_attn_token_to_image``. SAM's depth-2 decoder has seven: 0-2 in layer 0, 3-5 in layer 1,
    6 (or -1) the final token-to-image attention.
    """
    transformer = getattr(decoder, "transformer", None)
    layers = getattr(transformer, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        return None
    rel = [f"layers.{j}.{a}" for j in range(len(layers)) for a in DECODER_BLOCK_ATTENTIONS]
    rel.append("final_attn_token_to_image")
    for r in rel:
        try:
            attn = transformer.get_submodule(r)
        except AttributeError:
            return None
        if not all(isinstance(getattr(attn, n, None), nn.Linear) for n in DECODER_ATTENTION_SITES.values()):
            return None
    return [f"{prefix}transformer.{r}" for r in rel]


def _decoder_tower(model: nn.Module, name: str = "mask_decoder") -> Optional[TowerSpec]:
    """The attention-only tower over the mask decoder's two-way transformer (read from the model, so a decoder
    replaced after creation, e.g. by ``SamSegmenter``'s class-token decoder, is the one described)."""
    paths = decoder_attention_paths(getattr(model, name, None), f"{name}.")
    if paths is None:
        return None
    first = model.get_submodule(paths[0])
    return TowerSpec(
        name=name,
        depth=len(paths),
        width=first.q_proj.in_features,  # the token width every projection reads (256); cross attentions project
        num_heads=first.num_heads,  # ... to a narrower internal width (128), which only the site shapes show
        block="",
        block_sites=dict(DECODER_ATTENTION_SITES),
        attention="separate",
        layout="NLC",
        num_prefix_tokens=0,
        block_paths=tuple(paths),
        block_site=False,  # an attention module takes (q, k, v), not one token sequence: no block-level methods
    )


def _is_sam(model: nn.Module) -> bool:
    return isinstance(model, SamModel)


@register_spec(_is_sam)
def sam_spec(model: nn.Module) -> BackboneSpec:
    """Spec of a :class:`SamModel`: the image encoder (``image_encoder.blocks.{i}``; the default tower) and, for an
    official two-way decoder, the ``mask_decoder`` tower of its attention modules (see
    :func:`decoder_attention_paths`), reached by qualified names only (``"mask_decoder.q"``)."""
    towers = {"image_encoder": _encoder_tower("image_encoder", "image_encoder.", model.image_encoder)}
    decoder = _decoder_tower(model)
    if decoder is not None:
        towers["mask_decoder"] = decoder
    return BackboneSpec("sam", towers, ("image_encoder",))


def _is_timm_samvit(model: nn.Module) -> bool:
    try:
        from timm.models.vision_transformer_sam import VisionTransformerSAM
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, VisionTransformerSAM)


@register_spec(_is_timm_samvit)
def timm_samvit_spec(model: nn.Module) -> BackboneSpec:
    """Spec of a bare timm ``VisionTransformerSAM`` (e.g. ``timm:samvit_base_patch16``), with its classifier."""
    head = "head.fc" if isinstance(getattr(model.head, "fc", None), nn.Linear) else None
    return BackboneSpec("timm_samvit", {"": _encoder_tower("", "", model, head)}, ("",))
