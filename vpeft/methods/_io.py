"""Adapter files: ``vpeft_config.json`` + ``adapter_model.safetensors`` (adapter tensors only, never pickle)."""

from __future__ import annotations

import hashlib
import json
import os
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from .._fileio import atomic_write

if TYPE_CHECKING:  # pragma: no cover
    from .peft_model import PeftModel

CONFIG_NAME = "vpeft_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1


def fingerprint(model: nn.Module) -> str:
    """sha256 over the sorted (name, shape, dtype) of a plain backbone's state dict."""
    from .peft_model import canonical_name

    items = sorted((canonical_name(k), tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items())
    return hashlib.sha256(repr(items).encode()).hexdigest()


def save_adapter(pm: PeftModel, directory: str) -> None:
    from safetensors.torch import save

    from .. import __version__

    os.makedirs(directory, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in pm.adapter_state_dict().items()}
    meta = {
        "format_version": FORMAT_VERSION,
        "vpeft_version": __version__,
        "backbone_id": getattr(pm.base_model, "vpeft_backbone_id", None),
        "backbone_class": f"{type(pm.base_model).__module__}.{type(pm.base_model).__name__}",
        "fingerprint": pm.fingerprint,
        "methods": [c.to_dict() for c in pm.configs],
        "trainable_extra": list(pm.trainable_extra),
        "num_tensors": len(tensors),
    }
    atomic_write(os.path.join(directory, WEIGHTS_NAME), lambda f: f.write(save(tensors, metadata={"format": "pt"})))
    atomic_write(os.path.join(directory, CONFIG_NAME), lambda f: json.dump(meta, f, indent=2, sort_keys=True),
                 binary=False)


def read_adapter(directory: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and validate an adapter directory; ``ValueError`` for anything missing, corrupt or truncated."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg_path, w_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise ValueError(f"adapter directory {directory!r} lacks {os.path.basename(p)} (an adapter dir holds "
                             f"{CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        with open(cfg_path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION or "methods" not in meta:
        raise ValueError(f"{cfg_path} is not a vpeft adapter config (format_version {FORMAT_VERSION} expected)")
    try:
        tensors = load_file(w_path)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{w_path} is corrupt or truncated and cannot be read as safetensors: {e}") from None
    if meta.get("num_tensors") not in (None, len(tensors)):
        raise ValueError(f"{w_path} holds {len(tensors)} tensors but {CONFIG_NAME} records {meta['num_tensors']}")
    return meta, tensors


def load_adapter(model: nn.Module, directory: str) -> PeftModel:
    from .base import PeftConfig
    from .peft_model import get_peft_model

    meta, tensors = read_adapter(directory)
    fp = fingerprint(model)
    if fp != meta["fingerprint"]:
        raise ValueError(
            f"adapter in {directory!r} was saved from another backbone (id {meta.get('backbone_id')!r}, class "
            f"{meta.get('backbone_class')}); this model (id {getattr(model, 'vpeft_backbone_id', None)!r}, class "
            f"{type(model).__module__}.{type(model).__name__}) has different parameter names/shapes "
            "(fingerprint mismatch)")
    configs = [PeftConfig.from_dict(d) for d in meta["methods"]]
    pm = get_peft_model(model, configs, trainable_extra=meta.get("trainable_extra", []))
    try:
        pm.load_adapter_state_dict(tensors)
    except BaseException:
        pm.unload()  # leave `model` exactly as it was handed in
        raise
    return pm
