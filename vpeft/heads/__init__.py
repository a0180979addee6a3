"""Training-free CLIP heads on pooled, L2-normalised image features: Tip-Adapter, Tip-Adapter-F and GDA, each an
``nn.Module`` mapping ``(N, D)`` image features to ``(N, C)`` logits, ensembled with open_clip's zero-shot classifier,
plus the validation-split hyper-parameter search they share."""

from ._search import search_hparams
from .gda import GDA
from .tip_adapter import TipAdapter, TipAdapterF

__all__ = ["GDA", "TipAdapter", "TipAdapterF", "search_hparams"]
