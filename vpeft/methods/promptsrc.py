"""PromptSRC: Prompting with Self-Regulating Constraints (Khattak et al., ICCV 2023, arXiv:2307.06948).

The prompts are IVLP's (independent deep text and vision prompts); what PromptSRC adds is how they are trained:

* Mutual agreement with the frozen model: ``L_SCL = lambda_text * L1(text features, frozen text features)
  + lambda_image * L1(image features, frozen image features) + KL(frozen logits || prompted logits)``, added to the
  cross-entropy (:func:`promptsrc_loss`). Features are L2-normalised; the L1 terms are means over elements; the KL
  term is summed and divided by the number of logits.
* Textual diversity: the frozen text features of each class are the mean over a template ensemble (the first 60 of
  CLIP's 80 ImageNet templates) of the frozen encoder's features, then L2-normalised
  (``vpeft.modules.clip_tasks.ClipPromptTask.frozen_text_features``).
* Gaussian-weighted prompt aggregation (GPA): the final prompts are the average of the prompts after each epoch
  ``e = 1..E``, weighted by ``N(e; mean, std^2)`` normalised over the epochs (:class:`GaussianPromptAggregator`).

Paper defaults (base-to-new): 4 text + 4 vision tokens, depth 9 on both towers, ``ctx_init="a photo of a"``,
``lambda_text=25``, ``lambda_image=10``, KL weight 1, GPA mean 15 and std 1 over 20 epochs; recipe SGD lr 0.0025,
batch 4, cosine with 1 constant warm-up epoch. Few-shot: 50 epochs, GPA mean 45 / std 5 (Cars, Flowers, Aircraft,
DTD, EuroSAT) or mean 30 / std 30 (the other datasets) (see ``configs/method/clip``).

Trainable parameters: ``9 * 4 * 512 + 9 * 4 * 768 = 46,080`` for CLIP ViT-B/16 (the paper's 46K).

Deviations from the reference implementation (muzairkhattak/PromptSRC):
    * The frozen image features come from the same image tower with adapters disabled (``PeftModel.disabled()``),
      not from a second copy of the CLIP image encoder (same values, half the memory).
    * Vision prompts sit right after the class token (see IVLP).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.nn.functional as F

from .base import register_method
from .ivlp import IVLP, IVLPConfig


@dataclass
class PromptSRCConfig(IVLPConfig):
    """PromptSRC configuration (IVLP's prompt fields plus the self-regulating losses and GPA).

    Attributes:
        text_loss_weight: ``lambda_text`` of the L1 text-feature agreement.
        image_loss_weight: ``lambda_image`` of the L1 image-feature agreement.
        logit_loss_weight: Weight of the KL logit agreement.
        gpa_mean: Mean epoch (1-based) of the Gaussian prompt aggregation.
        gpa_std: Standard deviation (epochs) of the Gaussian prompt aggregation.
    """

    n_ctx: Optional[int] = 4
    n_ctx_vision: int = 4
    text_loss_weight: float = 25.0
    image_loss_weight: float = 10.0
    logit_loss_weight: float = 1.0
    gpa_mean: float = 15.0
    gpa_std: float = 1.0

    def validate(self) -> None:  # noqa: D102
        super().validate()
        for f in ("text_loss_weight", "image_loss_weight", "logit_loss_weight", "gpa_mean"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                raise ValueError(f"PromptSRCConfig.{f} must be a non-negative number, got {v!r}")
        if not isinstance(self.gpa_std, (int, float)) or self.gpa_std <= 0:
            raise ValueError(f"PromptSRCConfig.gpa_std must be a positive number, got {self.gpa_std!r}")


@register_method
class PromptSRC(IVLP):
    """PromptSRC: IVLP prompts trained with self-regulating constraints (see the module docstring)."""

    name = "promptsrc"
    config_class = PromptSRCConfig


def promptsrc_loss(
        logits: torch.Tensor,
        labels: torch.Tensor,
        text_features: torch.Tensor,
        image_features: torch.Tensor,
        frozen_text: torch.Tensor,
        frozen_image: torch.Tensor,
        frozen_logits: torch.Tensor,
        config: PromptSRCConfig,
) -> dict[str, torch.Tensor]:
    """Cross-entropy plus PromptSRC's self-regulating terms.

    Args:
        logits: Prompted logits ``(B, C)``.
        labels: ``(B,)`` class indices.
        text_features: L2-normalised prompted class features ``(C, D)``.
        image_features: L2-normalised prompted image features ``(B, D)``.
        frozen_text: L2-normalised frozen (template-ensembled) class features ``(C, D)``.
        frozen_image: L2-normalised frozen image features ``(B, D)``.
        frozen_logits: Logits of the frozen model ``(B, C)`` (same logit scale).
        config: Loss weights.

    Returns:
        ``{"loss", "ce", "scl_text", "scl_image", "scl_logits"}`` (``loss`` is the sum, weights applied).
    """
    if text_features.shape != frozen_text.shape or image_features.shape != frozen_image.shape:
        raise ValueError(f"prompted and frozen features differ in shape: text {tuple(text_features.shape)} vs "
                         f"{tuple(frozen_text.shape)}, image {tuple(image_features.shape)} vs "
                         f"{tuple(frozen_image.shape)}")
    ce = F.cross_entropy(logits, labels)
    scl_text = F.l1_loss(text_features, frozen_text) * config.text_loss_weight
    scl_image = F.l1_loss(image_features, frozen_image) * config.image_loss_weight
    kl = F.kl_div(F.log_softmax(logits, dim=1), F.log_softmax(frozen_logits, dim=1), reduction="sum",
                  log_target=True) / logits.numel()
    scl_logits = kl * config.logit_loss_weight
    return {"loss": ce + scl_text + scl_image + scl_logits, "ce": ce, "scl_text": scl_text, "scl_image": scl_image,
            "scl_logits": scl_logits}


def gaussian_weights(epochs: int, mean: float, std: float) -> list[float]:
    """GPA weights of epochs ``1..epochs``: ``N(e; mean, std^2)`` normalised to sum 1."""
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    w = [math.exp(-0.5 * ((e - mean) / std) ** 2) for e in range(1, epochs + 1)]
    total = sum(w)
    if total == 0.0:
        raise ValueError(f"GPA mean {mean} with std {std} puts no weight on epochs 1..{epochs}; choose gpa_mean "
                         "within the training epochs")
    return [v / total for v in w]


class GaussianPromptAggregator:
    """Running Gaussian-weighted average of prompt tensors over epochs (PromptSRC's GPA).

    Call :meth:`update` with the adapter state after each epoch ``1..epochs``; :attr:`state` is the weighted sum so
    far (after the last epoch: the aggregated prompts, since the weights sum to 1).
    """

    def __init__(self, epochs: int, mean: float, std: float) -> None:
        self.weights = gaussian_weights(epochs, mean, std)
        self.state: Optional[dict[str, torch.Tensor]] = None
        self.epochs_seen = 0

    def update(self, state: Mapping[str, torch.Tensor], epoch: int) -> None:
        """Add the weighted ``state`` of (1-based) ``epoch``."""
        if not 1 <= epoch <= len(self.weights):
            raise ValueError(f"epoch must be in 1..{len(self.weights)}, got {epoch}")
        w = self.weights[epoch - 1]
        if self.state is None:
            self.state = {k: v.detach().float() * w for k, v in state.items()}
        else:
            for k, v in state.items():
                self.state[k] += v.detach().float() * w
        self.epochs_seen += 1

    @property
    def complete(self) -> bool:
        """Whether every epoch was added."""
        return self.epochs_seen == len(self.weights)
