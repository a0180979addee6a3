"""``SamSegmenter``: prompt-free semantic segmentation with SAM (SAMed; MapSAM-style automatic prompting).

SAMed (Kaidong Zhang, Dong Liu, "Customized Segment Anything Model for Medical Image Segmentation",
arXiv:2304.13785, 2023) turns SAM into a semantic segmenter without prompts: LoRA on the image encoder's ``q`` and
``v`` projections, the prompt encoder run with no prompt at all (an empty sparse prompt and its learned "no mask"
dense embedding), and a mask decoder whose output mask tokens are the classes: the official decoder has
``num_multimask_outputs=3`` (4 mask tokens); SAMed builds it with ``num_multimask_outputs = K - 1`` for ``K``
classes including the background, so its ``K`` mask tokens give ``K`` per-pixel class logits (softmax over them).
The decoder and the prompt encoder train in full with the LoRA factors.

Paper / official-code defaults (used by :class:`SamSegmenter` and ``configs/experiment/sam_samed_vit_b.yaml``):
    * LoRA rank 4 on ``q`` and ``v`` of every encoder block, no scaling (``alpha = r``).
    * Trainable extras: ``mask_decoder`` and ``prompt_encoder``.
    * Loss ``0.8 * Dice + 0.2 * CE`` on the low-resolution logits (``img_size / 4``) against the label map resized
      (nearest) to that size; the Dice term is TransUNet's soft Dice ``1 - (2 sum(p t) + s) / (sum(p^2) + sum(t^2)
      + s)`` with ``s = 1e-5``, averaged over all ``K`` classes (background included), sums over the whole batch.
    * AdamW (lr 5e-3, weight decay 0.1) with a 250-step linear warm-up then polynomial decay (power 0.9) over the run
      (:class:`vpeft.modules.schedulers.WarmupPolyLR`), batch 12, 512x512 inputs (Synapse).

Trainable parameters (SAM ViT-B, ``K`` classes including the background, width ``d = 768``, 12 blocks):
    * LoRA: ``2 targets * depth * r * (d + d) = 2 * 12 * 4 * 1536 = 147,456``.
    * Mask decoder with ``K`` tokens: ``3,497,056 + 140,321 * K`` (the official 4 tokens: 4,058,340); per token one
      256-d mask token, one hypernetwork MLP (256-256-256-32: 139,808) and one IoU-head output row (257).
    * Prompt encoder: 6,220 (prompt-free, only its ``no_mask_embed`` is used; SAMed trains it).
    * Synapse (``K = 9``): ``147,456 + 4,759,945 + 6,220 = 4,913,621`` of SAM ViT-B's ~93.7M.

Official weights with ``K`` class tokens. The decoder is rebuilt with ``K`` mask tokens; every tensor whose shape does
not depend on the token count is copied from the loaded decoder (the two-way transformer, ``iou_token``,
``output_upscaling``, the hidden layers of ``iou_prediction_head``). New (freshly initialised under ``init_seed``, as
SAMed's loader leaves them) are exactly: ``mask_decoder.mask_tokens.weight`` (``K x 256``),
``mask_decoder.output_hypernetworks_mlps.{0..K-1}.layers.{0,1,2}.{weight,bias}`` and
``mask_decoder.iou_prediction_head.layers.2.{weight,bias}`` (``K x 256``, ``K``). SAMed's own loader also re-initialises
the hidden IoU-head layers; they do not depend on ``K``, so they are kept here.

MapSAM-style automatic prompting (``auto_prompt=AutoPromptConfig()``; MapSAM, arXiv:2411.06971): a light head on the
image embedding predicts a coarse foreground map; its most and least confident pixels become positive and negative
point prompts for SAM's prompt encoder, the image embedding averaged over the coarse foreground is added to the decoder
tokens (the positional-semantic prompt), and the decoder's token-to-image attentions are masked to that foreground.
The class tokens stay SAMed's, the head trains with a binary cross-entropy against ``label > 0`` (weight
``auto_prompt.loss_weight``) and is saved with the adapter as a task module (``prompt_head``). Details and deviations:
:mod:`vpeft.modules._sam_prompting`; preset ``configs/experiment/sam_mapsam_vit_b.yaml`` (DoRA r=4 on q, v).

SAMed's decoder variant (LoRA also on ``q``/``v`` of the mask decoder's seven attention modules, the decoder's
transformer frozen, the rest of the decoder trained): :func:`samed_decoder_lora` with
``trainable_extra=SAMED_DECODER_LORA_EXTRA``; preset ``configs/experiment/sam_samed_decoder_lora_vit_b.yaml``.

Binary tasks (``num_classes=2``) use the same ``K``-token softmax by default (SAMed's formulation);
``binary_mode="sigmoid"`` instead keeps the official decoder unchanged (no new tensors) and reads its single-mask
token as a foreground logit (loss: ``Dice + BCE`` on the sigmoid).

Deviations from the reference implementation (hitachinsk/SAMed):
    * SAMed's 512x512 input is ``backbone_kwargs={"img_size": 512, "resample_pos_embed": True}`` (the presets): the
      same bilinear resizing of the official positional embedding and global relative-position tables as SAMed's
      loader. SAMed also feeds images normalised to [0, 1] without SAM's pixel statistics; vpeft keeps SAM's.
    * The decoder's IoU-head hidden layers are kept from the checkpoint (SAMed re-initialises them; they only feed the
      IoU prediction, which no loss reads here).
    * The schedule applies each step's rate one step earlier than SAMed's loop (which sets it after the step).
    * ``loss_resolution="label"`` (not the default) computes the loss on logits upsampled to the label size.
    * Per-class Dice and mean IoU come from torchmetrics (over the foreground classes, pooled over the epoch's
      pixels); HD95 from :mod:`vpeft.metrics` (medpy's definition, as SAMed's evaluation; torchmetrics has only the
      maximum Hausdorff distance, in 2-D). SAMed's per-volume Synapse numbers are the ``{stage}/vol_*`` metrics of
      batches that carry volume and slice ids (``.h5`` test volumes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

import vpeft

from ._sam_prompting import AutoPromptConfig, PromptGenerator, auto_prompt_decode
from .base import PeftTask

#: SAMed's loss weights (``loss = (1 - dice_weight) * CE + dice_weight * Dice`` with ``dice_weight = 0.8``).
SAMED_DICE_WEIGHT = 0.8
SAMED_CE_WEIGHT = 0.2


def samed_lora() -> vpeft.PeftConfig:
    """SAMed's encoder adapter: LoRA rank 4 on ``q`` and ``v``, update unscaled (``alpha = r``)."""
    return vpeft.LoraConfig(r=4, targets=["q", "v"])


def samed_decoder_lora() -> vpeft.PeftConfig:
    """SAMed's "LoRA on the mask decoder" variant (``sam_lora_image_encoder_mask_decoder.py``): rank 4 on ``q`` and
    ``v`` of every encoder block and of every attention of the decoder's two-way transformer (train with
    :data:`SAMED_DECODER_LORA_EXTRA`: the transformer's own weights stay frozen). Decoder LoRA: 23,552 parameters."""
    return vpeft.LoraConfig(r=4, targets=["q", "v", "mask_decoder.q", "mask_decoder.v"])


#: What trains in full beside :func:`samed_decoder_lora`: the prompt encoder and every mask-decoder part but its
#: transformer.
SAMED_DECODER_LORA_EXTRA = ("prompt_encoder", "mask_decoder.iou_token", "mask_decoder.mask_tokens",
                            "mask_decoder.output_upscaling", "mask_decoder.output_hypernetworks_mlps",
                            "mask_decoder.iou_prediction_head")


# -- losses ------------------------------------------------------------------------------------------------------------
def soft_dice_loss(probs: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5,
                   class_weights: Optional[Sequence[float]] = None) -> torch.Tensor:
    """TransUNet / SAMed soft Dice loss, averaged over classes.

    For class ``c``: ``1 - (2 * sum(p_c * t_c) + s) / (sum(p_c ** 2) + sum(t_c ** 2) + s)``, sums over the batch and
    all pixels.

    Args:
        probs: ``(B, C, H, W)`` class probabilities.
        target: ``(B, C, H, W)`` one-hot (or soft) targets of the same shape.
        smooth: ``s``.
        class_weights: Per-class weights (default 1 each); the result is the weighted sum divided by ``C``.
    """
    if probs.shape != target.shape:
        raise ValueError(f"probs {tuple(probs.shape)} and target {tuple(target.shape)} must have the same shape")
    dims = [0, *range(2, probs.dim())]
    target = target.to(probs.dtype)
    inter = (probs * target).sum(dims)
    denom = (probs * probs).sum(dims) + (target * target).sum(dims)
    per_class = 1.0 - (2.0 * inter + smooth) / (denom + smooth)
    if class_weights is not None:
        per_class = per_class * torch.as_tensor(class_weights, dtype=per_class.dtype, device=per_class.device)
    return per_class.sum() / probs.shape[1]


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = SAMED_DICE_WEIGHT,
                      ce_weight: float = SAMED_CE_WEIGHT, sigmoid: bool = False) -> torch.Tensor:
    """``dice_weight * Dice + ce_weight * CE`` of class logits against a label map.

    Args:
        logits: ``(B, K, H, W)`` class logits (softmax), or ``(B, 1, H, W)`` foreground logits with ``sigmoid``.
        target: ``(B, H, W)`` integer labels in ``[0, K)`` (``{0, 1}`` with ``sigmoid``).
        dice_weight: Weight of :func:`soft_dice_loss` (over all ``K`` classes; with ``sigmoid``: over the
            foreground channel).
        ce_weight: Weight of the cross-entropy (binary cross-entropy with ``sigmoid``).
        sigmoid: Binary task with one foreground logit.
    """
    if logits.dim() != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"logits must be (B, K, H, W) and target (B, H, W) of the same size, got "
                         f"{tuple(logits.shape)} and {tuple(target.shape)}")
    target = target.long()
    if sigmoid:
        fg = target.unsqueeze(1).to(logits.dtype)
        ce = F.binary_cross_entropy_with_logits(logits, fg)
        dice = soft_dice_loss(torch.sigmoid(logits), fg)
    else:
        ce = F.cross_entropy(logits, target)
        onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2)
        dice = soft_dice_loss(logits.softmax(dim=1), onehot)
    return dice_weight * dice + ce_weight * ce


# -- the decoder with K class tokens -----------------------------------------------------------------------------------
#: Decoder tensors whose shape depends on the number of mask tokens (re-initialised for ``K`` class tokens).
NEW_DECODER_PREFIXES = ("mask_tokens.", "output_hypernetworks_mlps.", "iou_prediction_head.layers.2.")


def class_token_decoder(decoder: nn.Module, num_tokens: int) -> tuple[nn.Module, list[str]]:
    """A copy of the official ``MaskDecoder`` with ``num_tokens`` mask tokens, sharing the loaded weights of every
    tensor whose shape does not depend on the token count.

    Returns:
        ``(decoder, new)``: the new decoder and the names (relative to the decoder) of its freshly initialised
        tensors.
    """
    from segment_anything.modeling import MaskDecoder

    iou_layers = decoder.iou_prediction_head.layers
    new = MaskDecoder(transformer_dim=decoder.transformer_dim, transformer=decoder.transformer,
                      num_multimask_outputs=num_tokens - 1,
                      activation=type(decoder.output_upscaling[2]),
                      iou_head_depth=len(iou_layers), iou_head_hidden_dim=iou_layers[0].out_features)
    old = decoder.state_dict()
    state = new.state_dict()
    fresh = []
    for k, t in state.items():
        if k.startswith(NEW_DECODER_PREFIXES) or k not in old or old[k].shape != t.shape:
            fresh.append(k)
        else:
            t.copy_(old[k])
    return new.to(next(decoder.parameters()).device), fresh


# -- the task ----------------------------------------------------------------------------------------------------------
class SamSegmenter(PeftTask):
    """Prompt-free semantic segmentation with SAM (SAMed): LoRA on the image encoder, class tokens in the decoder.

    Batches are ``(images, labels)``: ``images`` ``(B, 3, h, w)`` RGB on the 0..255 scale with ``h, w <= img_size``
    (SAM normalises and zero-pads them to ``img_size``; :class:`vpeft.datasets.segmentation.SegmentationDataModule`
    resizes the longer side to ``img_size``), ``labels`` ``(B, H, W)`` class ids at any resolution. The
    low-resolution logits cover the padded ``img_size`` square: they are upsampled to ``img_size``, cropped to the
    ``h x w`` image area and resized to the label size (SAM's ``postprocess_masks``).

    Logs ``{stage}/loss``, ``{stage}/dice`` (mean over foreground classes), ``{stage}/miou`` (foreground),
    ``{stage}/dice_<c>`` per class in validation and test, and ``{stage}/hd95`` (per image and class, averaged over the
    cases where both masks are non-empty; in pixels of the label maps) with ``hausdorff=True``.

    Volumes (the Synapse / SAMed protocol): validation and test batches ``(images, labels, volume_ids, slice_ids)``
    (what :class:`~vpeft.datasets.segmentation.SegmentationDataModule` yields for ``.h5`` volumes) are also
    reassembled into whole volumes and scored in 3-D at the epoch's end (:class:`vpeft.metrics.VolumeAccumulator`):
    ``{stage}/vol_dice``, ``{stage}/vol_hd95`` (means over volumes and foreground classes) and ``{stage}/vol_dice_<c>``,
    ``{stage}/vol_hd95_<c>``, with ``volume_convention`` deciding empty cases. Volume scoring runs in one process.

    Args:
        backbone: A SAM id (``"sam:vit_b"``).
        num_classes: ``K``, classes including the background (label 0); the CLI links it from the data module.
        methods: Method configs; ``None`` is SAMed's LoRA (rank 4 on ``q``, ``v``); ``[]`` trains only the extras.
        trainable_extra: Trained in full and saved with the adapter (SAMed: ``mask_decoder`` and ``prompt_encoder``).
        pretrained: The official SAM checkpoint path, or ``False`` for random weights.
        backbone_kwargs: ``create_backbone`` kwargs (``img_size``, encoder sizes).
        adapter: See :class:`~vpeft.modules.base.PeftTask`.
        optimizer: See :class:`~vpeft.modules.base.PeftTask`.
        lr_scheduler: See :class:`~vpeft.modules.base.PeftTask`.
        lr_scheduler_interval: See :class:`~vpeft.modules.base.PeftTask`.
        init_seed: See :class:`~vpeft.modules.base.PeftTask`.
        grad_checkpointing: See :class:`~vpeft.modules.base.PeftTask`.
        dice_weight: Weight of the Dice loss (SAMed: 0.8).
        ce_weight: Weight of the cross-entropy (SAMed: 0.2).
        binary_mode: For ``num_classes=2``: ``"softmax"`` (two class tokens, SAMed) or ``"sigmoid"`` (the official
            single-mask token as a foreground logit, decoder unchanged).
        loss_resolution: ``"low_res"`` (SAMed: logits at ``img_size / 4``, labels resized by nearest neighbour) or
            ``"label"`` (logits upsampled to the label size).
        hausdorff: Also log the 95th-percentile Hausdorff distance (``{stage}/hd95``) in validation and test.
        volume_convention: Scores of a class missing from a volume's prediction or label: ``"transunet"`` (SAMed's
            and TransUNet's published numbers: a predicted but absent class scores Dice 1 and HD95 0, a missed one 0
            and 0) or ``"nan"`` (undefined cases are left out of the means); see :func:`vpeft.metrics.case_scores`.
        auto_prompt: ``None`` (SAMed: no prompt at all) or an :class:`AutoPromptConfig` for MapSAM's automatic
            point prompts, positional-semantic prompt and masked attention.
    """

    def __init__(
            self,
            backbone: str,
            num_classes: int,
            methods: Optional[list[vpeft.PeftConfig]] = None,
            trainable_extra: Sequence[str] = ("mask_decoder", "prompt_encoder"),
            pretrained: Union[bool, str] = False,
            backbone_kwargs: Optional[dict[str, Any]] = None,
            adapter: Optional[str] = None,
            optimizer: OptimizerCallable = torch.optim.AdamW,
            lr_scheduler: Optional[LRSchedulerCallable] = None,
            lr_scheduler_interval: str = "epoch",
            init_seed: Optional[int] = None,
            grad_checkpointing: bool = False,
            dice_weight: float = SAMED_DICE_WEIGHT,
            ce_weight: float = SAMED_CE_WEIGHT,
            binary_mode: str = "softmax",
            loss_resolution: str = "low_res",
            hausdorff: bool = False,
            volume_convention: str = "transunet",
            auto_prompt: Optional[AutoPromptConfig] = None,
    ) -> None:
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2 (classes including the background), got "
                             f"{num_classes!r}")
        if not backbone.startswith("sam:"):
            raise ValueError(f"SamSegmenter needs a SAM backbone ('sam:vit_b', 'sam:vit_l', 'sam:vit_h'), got "
                             f"{backbone!r}")
        for name, w in (("dice_weight", dice_weight), ("ce_weight", ce_weight)):
            if not isinstance(w, (int, float)) or isinstance(w, bool) or w < 0:
                raise ValueError(f"{name} must be a number >= 0, got {w!r}")
        if dice_weight == 0 and ce_weight == 0:
            raise ValueError("dice_weight and ce_weight are both 0: the loss would be constant")
        if binary_mode not in ("softmax", "sigmoid"):
            raise ValueError(f"binary_mode must be 'softmax' or 'sigmoid', got {binary_mode!r}")
        if binary_mode == "sigmoid" and num_classes != 2:
            raise ValueError(f"binary_mode='sigmoid' needs num_classes=2, got {num_classes}")
        if loss_resolution not in ("low_res", "label"):
            raise ValueError(f"loss_resolution must be 'low_res' or 'label', got {loss_resolution!r}")
        from ..metrics.segmentation import CONVENTIONS

        if volume_convention not in CONVENTIONS:
            raise ValueError(f"volume_convention must be one of {CONVENTIONS}, got {volume_convention!r}")
        if isinstance(auto_prompt, dict):  # from a checkpoint's hyper-parameters
            auto_prompt = AutoPromptConfig(**auto_prompt)
        if auto_prompt is not None:
            if not isinstance(auto_prompt, AutoPromptConfig):
                raise TypeError(f"auto_prompt must be None or an AutoPromptConfig, got {type(auto_prompt).__name__}")
            auto_prompt.validate()
        if methods is None:
            methods = [samed_lora()]
        super().__init__(backbone, methods, trainable_extra, pretrained, backbone_kwargs, adapter, optimizer,
                         lr_scheduler, lr_scheduler_interval, init_seed, grad_checkpointing)
        self.num_classes = num_classes
        self.dice_weight, self.ce_weight = float(dice_weight), float(ce_weight)
        self.sigmoid = binary_mode == "sigmoid"
        self.loss_resolution = loss_resolution
        self.hausdorff = hausdorff
        self.volume_convention = volume_convention
        self.auto_prompt = auto_prompt
        if auto_prompt is not None:  # plain data in the hyper-parameters (checkpoints load with weights_only)
            self.hparams["auto_prompt"] = dict(vars(auto_prompt), hidden=list(auto_prompt.hidden))
        #: MapSAM's prompt generator (a task module, saved with the adapter), built in build_task_modules.
        self.prompt_head: Optional[PromptGenerator] = None
        #: Decoder tensors freshly initialised for the class tokens (see the module doc), set by build_backbone.
        self.new_decoder_tensors: list[str] = []
        self.metrics = nn.ModuleDict({f"{s}_": self._make_metrics() for s in ("train", "val", "test")})
        from ..metrics import VolumeAccumulator

        #: Whole-volume scoring of validation / test batches that carry volume and slice ids.
        self.volumes = {s: VolumeAccumulator(num_classes, convention=volume_convention) for s in ("val", "test")}

    def _make_metrics(self) -> nn.ModuleDict:
        from torchmetrics.segmentation import DiceScore, MeanIoU

        from ..metrics import HausdorffDistance95

        k = self.num_classes
        m = {"dice": DiceScore(k, include_background=False, average="none", aggregation_level="global",
                               input_format="index"),
             "miou": MeanIoU(k, include_background=False, per_class=False, input_format="index")}
        if self.hausdorff:
            m["hd95"] = HausdorffDistance95(k, include_background=False, average="none")
        return nn.ModuleDict(m)

    # -- template hooks --------------------------------------------------------------------------------------------
    def build_backbone(self) -> nn.Module:
        """SAM with (unless ``binary_mode="sigmoid"``) a decoder of ``num_classes`` class tokens."""
        from ..backbones.sam import SamModel

        model = vpeft.create_backbone(self.backbone_id, pretrained=self.pretrained, **self.backbone_kwargs)
        if not isinstance(model, SamModel):
            raise TypeError(f"backbone {self.backbone_id!r} is not a SAM model")
        if not self.sigmoid:
            model.mask_decoder, fresh = class_token_decoder(model.mask_decoder, self.num_classes)
            self.new_decoder_tensors = [f"mask_decoder.{k}" for k in fresh]
        return model

    def build_task_modules(self, model: vpeft.PeftModel) -> None:
        """MapSAM's prompt generator (with ``auto_prompt``), initialised under ``init_seed``."""
        if self.auto_prompt is not None:
            channels = model.base_model.mask_decoder.transformer_dim
            self.prompt_head = PromptGenerator(channels, self.auto_prompt.hidden)

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):  # noqa: D102
        out = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        # Metric states are not task modules to save (they are reset every epoch).
        for k in [k for k in out if k.startswith(f"{prefix}metrics.")]:
            del out[k]
        return out

    def task_modules(self) -> dict[str, nn.Module]:  # noqa: D102
        return {n: m for n, m in super().task_modules().items() if n != "metrics"}

    # -- forward -----------------------------------------------------------------------------------------------------
    @property
    def sam(self):
        """The (adapted) SAM model."""
        return self._require_model().base_model

    def low_res_logits(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, K, 4h', 4w')`` class logits (``(B, 1, ...)`` foreground logits with ``binary_mode="sigmoid"``) at the
        decoder's resolution, covering the padded ``img_size`` square."""
        return self._decode(images)[0]

    def _decode(self, images: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Low-resolution class logits and (with ``auto_prompt``) the prompt generator's coarse logits."""
        sam = self.sam
        emb = sam.image_embeddings(images)
        if self.auto_prompt is None:
            masks = self._prompt_free(sam, emb)
            return (masks[:, :1] if self.sigmoid else masks), None
        masks, coarse = auto_prompt_decode(sam, self.prompt_head, self.auto_prompt, images, emb)
        return (masks[:, :1] if self.sigmoid else masks), coarse

    @staticmethod
    def _prompt_free(sam, emb: torch.Tensor) -> torch.Tensor:
        sparse, dense = sam.prompt_encoder(points=None, boxes=None, masks=None)
        # Prompt-free: the empty sparse prompt and the "no mask" dense embedding broadcast over the batch. SAMed reads
        # every mask token (the official forward would drop token 0 with multimask_output, or keep only it).
        masks, _ = sam.mask_decoder.predict_masks(image_embeddings=emb, image_pe=sam.prompt_encoder.get_dense_pe(),
                                                  sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense)
        return masks

    def upsample(self, low_res: torch.Tensor, input_size: tuple[int, int],
                 label_size: tuple[int, int]) -> torch.Tensor:
        """Low-resolution logits -> logits at ``label_size`` (upsample to ``img_size``, crop the ``input_size`` image
        area, resize: SAM's ``postprocess_masks``)."""
        return self.sam.postprocess_masks(low_res, tuple(input_size), tuple(label_size))

    def forward(self, images: torch.Tensor, size: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Class logits at ``size`` (default: the images' size)."""
        low = self.low_res_logits(images)
        hw = tuple(images.shape[-2:])
        return self.upsample(low, hw, tuple(size) if size is not None else hw)

    def predict_labels(self, logits: torch.Tensor) -> torch.Tensor:
        """``(B, H, W)`` class ids from :meth:`forward`'s logits."""
        if self.sigmoid:
            return (logits[:, 0] > 0).long()
        return logits.argmax(dim=1)

    # -- steps -----------------------------------------------------------------------------------------------------
    def _low_res_target(self, labels: torch.Tensor, low: torch.Tensor, hw: tuple[int, int]) -> tuple:
        """Low-res logits cropped to the image area and the labels resized (nearest) to that crop."""
        img = self.sam.img_size
        lh, lw = low.shape[-2:]
        ch, cw = max(1, round(hw[0] * lh / img)), max(1, round(hw[1] * lw / img))
        low = low[..., :ch, :cw]
        target = F.interpolate(labels[:, None].float(), (ch, cw), mode="nearest-exact")[:, 0].long()
        return low, target

    def _step(self, batch, stage: str) -> torch.Tensor:
        images, labels, *ids = batch
        self._check_labels(labels)
        hw = tuple(images.shape[-2:])
        low, coarse = self._decode(images)
        logits = self.upsample(low, hw, tuple(labels.shape[-2:]))
        if self.loss_resolution == "low_res":
            loss = segmentation_loss(*self._low_res_target(labels, low, hw), self.dice_weight, self.ce_weight,
                                     self.sigmoid)
        else:
            loss = segmentation_loss(logits, labels, self.dice_weight, self.ce_weight, self.sigmoid)
        if coarse is not None and self.auto_prompt.loss_weight > 0:
            hint = self.prompt_loss(coarse, labels, hw)
            self.log(f"{stage}/prompt_loss", hint, on_step=False, on_epoch=True, sync_dist=True, batch_size=len(labels))
            loss = loss + self.auto_prompt.loss_weight * hint
        preds = self.predict_labels(logits.detach())
        b = len(labels)
        self.log(f"{stage}/loss", loss, on_step=stage == "train", on_epoch=True, prog_bar=True, sync_dist=True,
                 batch_size=b)
        metrics = self.metrics[f"{stage}_"]
        for m in metrics.values():
            m.update(preds, labels.long())
        if ids and stage in self.volumes:
            if self._trainer is not None and self.trainer.world_size > 1:
                raise RuntimeError("volume scoring (batches with volume and slice ids) needs a single process: a "
                                   "distributed sampler splits each volume's slices across ranks; run validate/test "
                                   "with devices=1")
            self.volumes[stage].update(preds, labels, ids[0], ids[1])
        return loss

    def prompt_loss(self, coarse: torch.Tensor, labels: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """MapSAM's hint loss: binary cross-entropy of the coarse logits, upsampled to the decoder's low resolution
        (``img_size / 4``), against the foreground ``labels > 0`` over the image area."""
        grid = 4 * coarse.shape[-1]
        up = F.interpolate(coarse, (grid, grid), mode="bilinear", align_corners=False)
        up, target = self._low_res_target(labels, up, hw)
        return F.binary_cross_entropy_with_logits(up[:, 0], (target > 0).to(up.dtype))

    def _check_labels(self, labels: torch.Tensor) -> None:
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}); got values in "
                             f"[{int(labels.min())}, {int(labels.max())}]")

    def _log_epoch(self, stage: str) -> None:
        metrics = self.metrics[f"{stage}_"]
        per_class = metrics["dice"].compute().reshape(-1)
        # Classes absent from both prediction and target give NaN in torchmetrics; they do not enter the mean.
        valid = per_class[~torch.isnan(per_class)]
        mean = valid.mean() if valid.numel() else torch.tensor(0.0, device=per_class.device)
        self.log(f"{stage}/dice", mean, prog_bar=True, sync_dist=True)
        if stage != "train":
            for c, v in enumerate(per_class.tolist(), start=1):
                self.log(f"{stage}/dice_{c}", v, sync_dist=True)
        self.log(f"{stage}/miou", metrics["miou"].compute(), sync_dist=True)
        if "hd95" in metrics:
            per = metrics["hd95"].compute().reshape(-1)
            ok = per[~torch.isnan(per)]
            self.log(f"{stage}/hd95", ok.mean() if ok.numel() else torch.tensor(float("nan")), sync_dist=True)
        for m in metrics.values():
            m.reset()
        acc = self.volumes.get(stage)
        if acc is not None and len(acc):
            for k, v in acc.compute().summary().items():
                self.log(f"{stage}/vol_{k}", v)
            acc.reset()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:  # noqa: D102
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx: int) -> None:  # noqa: D102
        self._step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:  # noqa: D102
        self._step(batch, "test")

    def on_train_epoch_end(self) -> None:  # noqa: D102
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:  # noqa: D102
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:  # noqa: D102
        self._log_epoch("test")

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        """Class-id maps at the images' size."""
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self.predict_labels(self(x))

    def calibration_loss(self, backbone: nn.Module, inputs: Any, targets: Any) -> torch.Tensor:
        """Segmentation loss of the plain, prompt-free SAM (for data-calibrated methods; calibration runs before the
        task modules, MapSAM's prompt generator included, exist)."""
        low = self._prompt_free(backbone, backbone.image_embeddings(inputs))
        low = low[:, :1] if self.sigmoid else low
        logits = backbone.postprocess_masks(low, tuple(inputs.shape[-2:]), tuple(targets.shape[-2:]))
        return segmentation_loss(logits, targets, self.dice_weight, self.ce_weight, self.sigmoid)
