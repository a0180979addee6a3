"""timm Vision Transformers (``vit_*``, ``deit_*``, CLIP-style ``vit_*_clip_*``): creation and spec."""

from __future__ import annotations

import difflib
import os
from typing import Optional, Union

import torch.nn as nn

from ._spec import BackboneSpec, TowerSpec, register_spec


def create_timm(name: str, pretrained: Union[bool, str, os.PathLike] = False, **kwargs) -> nn.Module:
    """Create a timm model; ``pretrained`` is False, True (timm's hub download) or a local checkpoint path.

    A path goes through timm's own loader (``pretrained_cfg_overlay=dict(file=...)``), so the model's
    ``checkpoint_filter_fn`` remaps official key formats (timm, DeiT's ``{"model": ...}``, OpenAI CLIP, ...) and
    timm loads ``.pth``/``.bin`` with ``weights_only=True`` and ``.safetensors`` natively; an ``.npz`` file goes
    through the model's JAX/big_vision loader (official AugReg ViT checkpoints).

    The classifier follows the file: without ``num_classes`` the model gets the file's classifier size and its
    weights; with another ``num_classes`` the file's classifier is dropped (random head), as timm does for hub
    weights. Every other tensor must be in the file: the converted key set is checked (from shapes only, on the meta
    device) before the model is built, because timm loads non-strictly whenever it drops a classifier.

    Raises:
        ValueError: unknown model name or pretrained tag, a checkpoint path that is not a readable file, or a
            checkpoint whose keys or shapes do not fit the model.
        TypeError: ``pretrained`` is neither a bool nor a path.
    """
    import timm

    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5)
        raise ValueError(f"timm has no model named {arch!r}; close matches: {close} (timm.list_models() lists all "
                         f"{len(timm.list_models())})")
    tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
    if tag and tag not in tags:
        raise ValueError(f"timm model {arch!r} has no pretrained tag {tag!r}; tags: {tags}")
    if isinstance(pretrained, (str, os.PathLike)):
        from . import _local_checkpoint

        path = _local_checkpoint(pretrained)
        overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {}, file=path, custom_load=path.endswith(".npz"))
        n = _checkpoint_num_classes(path, name, timm.models.get_pretrained_cfg(name), kwargs)
        if n is not None:
            # timm drops the classifier whenever num_classes differs from the pretrained config's count (1000 for
            # most tags), which would silently discard the head of a fine-tuned local file.
            overlay["num_classes"] = n
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    if not isinstance(pretrained, bool):
        raise TypeError(f"pretrained must be True, False or a checkpoint path, got {type(pretrained).__name__}")
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def _checkpoint_num_classes(path: str, name: str, cfg, kwargs: dict) -> Optional[int]:
    """Rows of the classifier a checkpoint holds once converted to timm's format (``0``: it has none), or ``None``
    when that cannot be told (timm's configured count then applies).

    Only shapes are read. A state-dict file goes onto the meta device and through the model's own
    ``checkpoint_filter_fn`` against a meta-device model built with the same arguments (so foreign formats are
    converted: OpenAI CLIP's ``visual.proj`` becomes ``head``), and its keys and shapes are checked against that model.

    Raises:
        ValueError: the converted checkpoint misses tensors of the model, has extra ones, or has other shapes.
    """
    import sys

    import timm
    import torch

    classifiers = getattr(cfg, "classifier", None) or "head"
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    first_conv = getattr(cfg, "first_conv", None) or "patch_embed.proj"
    first_conv = (first_conv,) if isinstance(first_conv, str) else tuple(first_conv)
    if path.endswith(".npz"):  # JAX/big_vision layout; numpy reads only the arrays asked for
        import numpy as np

        with np.load(path) as w:
            for prefix in ("", "opt/target/", "params/"):
                if f"{prefix}head/bias" in w:
                    return int(w[f"{prefix}head/bias"].shape[-1])
                if f"{prefix}embedding/kernel" in w:
                    return 0
        return None
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            sd = {k.removeprefix("module."): torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    else:
        from timm.models import load_state_dict

        sd = load_state_dict(path, device="meta")  # the unwrapping timm's loader applies (EMA, "model", ...)
    try:
        with torch.device("meta"):
            model = timm.create_model(name, **kwargs)
        module = sys.modules[timm.models.model_entrypoint(name.partition(".")[0]).__module__]
        filter_fn = getattr(module, "checkpoint_filter_fn", None)
        if filter_fn is not None:
            sd = filter_fn(dict(sd), model)
    except Exception:  # a best-effort probe: timm's own load reports real problems with the file
        return None
    heads = {f"{c}.{p}" for c in classifiers for p in ("weight", "bias")}
    want = {k: v for k, v in model.state_dict().items() if k not in heads}
    have = {k: v for k, v in sd.items() if k not in heads and isinstance(v, torch.Tensor)}
    missing, unexpected = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
    adapted = {f"{c}.weight" for c in first_conv}  # timm adapts the input conv to in_chans
    shapes = [f"{k}: {tuple(have[k].shape)} in the file, {tuple(v.shape)} in the model"
              for k, v in want.items() if k in have and k not in adapted and have[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ValueError(f"checkpoint {path!r} does not fit timm {name!r}{' with ' + str(kwargs) if kwargs else ''}: "
                         f"{len(missing)} missing keys {missing[:8]}, {len(unexpected)} unexpected keys "
                         f"{unexpected[:8]}, {len(shapes)} shape mismatches {shapes[:4]}")
    w = sd.get(f"{classifiers[0]}.weight")
    return int(w.shape[0]) if isinstance(w, torch.Tensor) else 0


def _is_timm_vit(model: nn.Module) -> bool:
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, VisionTransformer)


@register_spec(_is_timm_vit)
def timm_vit_spec(model: nn.Module) -> BackboneSpec:
    """Spec of a timm ``VisionTransformer``: fused ``qkv`` Linear per block, pre-norm blocks."""
    blk = model.blocks[0]
    if not hasattr(blk, "attn") or not isinstance(getattr(blk.attn, "qkv", None), nn.Linear):
        raise TypeError(f"timm block type {type(blk).__name__} has no fused attn.qkv Linear; vpeft supports the "
                        "standard timm ViT Block (pre-norm, fused qkv)")
    global_sites = {"embed": "patch_embed.proj"}
    if not isinstance(model.norm_pre, nn.Identity):
        global_sites["pre_norm"] = "norm_pre"
    # Token-pooled models normalise with `norm`; average-pooled ones with `fc_norm` (and `norm` is Identity).
    final = "norm" if not isinstance(model.norm, nn.Identity) else "fc_norm"
    if not isinstance(model.get_submodule(final), nn.Identity):
        global_sites["final_norm"] = final
    if not isinstance(model.head, nn.Identity):
        global_sites["head"] = "head"
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
        num_prefix_tokens=model.num_prefix_tokens,
        embed_channel_dim=1,
    )
    return BackboneSpec("timm_vit", {"": tower}, ("",))
