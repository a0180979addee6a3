"""Data-dependent placement: methods that choose *where* to adapt from a few batches of training data.

Some methods (SPT's sensitivity-driven allocation, R-AMT's choice of the weights to mask) read gradients of the task
loss on the frozen pretrained model before any adapter exists. Their configs follow one contract:

* a JSON-serialisable ``selection`` field holding the resolved placement (written to ``vpeft_config.json`` by
  ``save_adapter``, so a saved adapter reloads onto a fresh backbone without data);
* ``needs_calibration()``: ``True`` while ``selection`` is ``None``; ``get_peft_model`` refuses such a config with a
  ``ValueError`` that says to call :func:`calibrate` first or to pass an explicit ``selection``;
* data-sized tensors the selection needs but that do not belong in JSON (SPT's sparse positions) travel on the resolved
  config object as :data:`CALIBRATION_TENSORS` (a plain instance attribute, not a dataclass field, so ``to_dict``,
  equality and the JSON file never see it). The adapter built from a resolved config registers them as persistent
  buffers, so they are saved in ``adapter_model.safetensors``; an adapter rebuilt from a saved config (no tensors)
  creates buffers of the recorded sizes and ``load_adapter`` fills them from the file.

A method opts in by giving its :class:`~vpeft.methods.base.Method` subclass two hooks:

``calibration_weights(model, spec) -> dict[str, tuple[torch.Tensor, Optional[tuple[int, int]]]]``
    The weight tensors (and output-row slices of them) whose gradient statistics the criterion needs, keyed by a
    name the method chooses. Must not change the model; raises ``ValueError`` for bad sites.
``calibration_statistic: ClassVar[str]``
    ``"grad_sq"`` (sum over batches of the squared gradient) or ``"grad_abs"`` (sum of absolute gradients).
``resolve_calibration(model, spec, stats) -> PeftConfig``
    The resolved copy of its config from ``stats`` (key -> statistic tensor of the weight or slice).

:func:`calibrate` runs the shared gradient pass once for all configs that need it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import PeftConfig, method_for_config

#: Instance attribute of a resolved config that carries calibration tensors (never serialised).
CALIBRATION_TENSORS = "_calibration_tensors"

_STATISTICS = ("grad_sq", "grad_abs")


def calibration_tensors(config: PeftConfig) -> dict[str, torch.Tensor]:
    """The data-sized tensors a calibrated config carries (empty for a config rebuilt from JSON)."""
    return dict(config.__dict__.get(CALIBRATION_TENSORS) or {})


def attach_tensors(config: PeftConfig, tensors: dict[str, torch.Tensor]) -> PeftConfig:
    """Attach ``tensors`` to ``config`` (outside its dataclass fields) and return it."""
    config.__dict__[CALIBRATION_TENSORS] = dict(tensors)
    return config


def needs_calibration(config: Any) -> bool:
    """Whether ``config`` is a calibrated-placement config whose selection is still unresolved."""
    fn = getattr(config, "needs_calibration", None)
    return bool(fn()) if callable(fn) else False


def unresolved_error(config: PeftConfig) -> ValueError:
    """The error ``get_peft_model`` raises for a config whose selection is unresolved."""
    name = type(config).__name__
    return ValueError(
        f"{name} has no selection yet: its placement is chosen from training data. Call "
        f"`configs = vpeft.calibrate(model, [config, ...], batches)` on the plain backbone first (batches: a few "
        f"(inputs, targets) pairs), or pass an explicit {name}(selection=...) (e.g. the one a saved adapter's "
        "vpeft_config.json records)")


def default_loss(model: nn.Module, inputs: Any, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``model(inputs)`` against ``targets`` (class indices or probabilities)."""
    return F.cross_entropy(model(inputs), targets)


def calibrate(
        model: nn.Module,
        configs: Union[PeftConfig, Sequence[PeftConfig]],
        batches: Iterable[tuple[Any, Any]],
        loss_fn: Optional[Callable[[nn.Module, Any, Any], torch.Tensor]] = None,
        max_batches: Optional[int] = None,
) -> list[PeftConfig]:
    """Resolve the data-dependent placement of every config that needs it, from a few batches.

    The criterion of each method runs on the frozen base model (no adapters attached). The model is left exactly
    as it was: parameter values, ``requires_grad`` flags, existing ``.grad`` tensors and the train/eval mode are all
    restored, and no gradient the pass created is left behind.

    Args:
        model: The plain backbone the configs will be applied to (not a ``PeftModel``).
        configs: A config or a list of configs, in ``get_peft_model`` order.
        batches: Iterable of ``(inputs, targets)`` pairs (e.g. a training ``DataLoader``).
        loss_fn: ``loss_fn(model, inputs, targets) -> scalar``; default: cross-entropy of ``model(inputs)`` against
            ``targets``. Pass your own for backbones whose call is not the task's logits (CLIP towers).
        max_batches: Use at most this many batches (``None``: all of ``batches``).

    Returns:
        A list of the same length: resolved copies for configs that needed calibration, the others unchanged.

    Raises:
        TypeError: ``model`` is a ``PeftModel`` or holds adapter wrappers, or a config is not a ``PeftConfig``.
        ValueError: a config is invalid, ``max_batches < 1``, ``batches`` is empty, or a loss is not finite.
    """
    from ..backbones import get_spec
    from .layers import AdapterLayer
    from .peft_model import PeftModel

    single = isinstance(configs, PeftConfig)
    configs = [configs] if single else list(configs)
    if isinstance(model, PeftModel) or any(isinstance(m, AdapterLayer) for m in model.modules()):
        raise TypeError("calibrate() runs on the plain backbone, before get_peft_model(); this model already holds "
                        "vpeft adapters (unload() it or build a fresh backbone)")
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ValueError(f"calibrate(max_batches=...) must be a positive int or None, got {max_batches!r}")
    todo = []
    for i, cfg in enumerate(configs):
        cls = method_for_config(cfg)
        cfg.validate()
        if needs_calibration(cfg):
            todo.append((i, cls(cfg, cls.name)))
    if not todo:
        return list(configs)
    spec = get_spec(model)
    wanted: list[tuple[int, str, torch.Tensor, Optional[tuple[int, int]], str]] = []
    for i, method in todo:
        stat = getattr(method, "calibration_statistic", None)
        if stat not in _STATISTICS:
            raise TypeError(f"{type(method).__name__}.calibration_statistic must be one of {_STATISTICS}, got "
                            f"{stat!r}")
        for key, (w, rows) in method.calibration_weights(model, spec).items():
            wanted.append((i, key, w, rows, stat))
    loss_fn = loss_fn or default_loss

    # Accumulators per (weight tensor, statistic), each computed once even when several configs read it.
    tensors = {id(w): w for _, _, w, _, _ in wanted}
    acc: dict[tuple[int, str], torch.Tensor] = {}
    for _, _, w, _, stat in wanted:
        acc.setdefault((id(w), stat), torch.zeros(w.shape, dtype=torch.float32, device=w.device))

    n = 0
    with _frozen_except(model, list(tensors.values())), torch.enable_grad():
        for batch in batches:
            if max_batches is not None and n >= max_batches:
                break
            inputs, targets = _split(batch)
            for w in tensors.values():
                w.grad = None
            loss = loss_fn(model, inputs, targets)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise ValueError(f"calibrate: loss_fn must return a scalar tensor, got {type(loss).__name__}"
                                 f"{'' if not isinstance(loss, torch.Tensor) else f' of shape {tuple(loss.shape)}'}")
            if not torch.isfinite(loss):
                raise ValueError(f"calibrate: the loss of batch {n} is not finite ({loss.item()})")
            loss.backward()
            with torch.no_grad():
                for (wid, stat), a in acc.items():
                    g = tensors[wid].grad
                    if g is None:
                        continue  # this weight does not reach the loss (e.g. the text tower under an image loss)
                    a.add_(g.float().square() if stat == "grad_sq" else g.float().abs())
            n += 1
    if n == 0:
        raise ValueError("calibrate: `batches` yielded no batch; pass a few (inputs, targets) pairs of training data")

    out = list(configs)
    for i, method in todo:
        stats = {}
        for j, key, w, rows, stat in wanted:
            if j == i:
                a = acc[(id(w), stat)]
                stats[key] = a[rows[0]:rows[1]] if rows is not None else a
        resolved = method.resolve_calibration(model, spec, stats)
        resolved.validate()
        out[i] = resolved
    return out


def _split(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, dict) and "inputs" in batch:
        return batch["inputs"], batch.get("targets")
    raise ValueError(f"calibrate: each batch must be an (inputs, targets) pair, got {type(batch).__name__}")


@contextlib.contextmanager
def _frozen_except(model: nn.Module, weights: list[torch.Tensor]):
    """Only ``weights`` require grad inside the block; flags, grads and the module mode are restored after."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    training = {m: m.training for m in model.modules()}
    ids = {id(w) for w in weights}
    try:
        # eval(): the sensitivity of the pretrained function, without dropout / drop-path noise, so that the
        # selection is a deterministic function of the batches.
        model.eval()
        for p in params:
            p.requires_grad_(id(p) in ids)
            p.grad = None
        yield
    finally:
        for p, f, g in zip(params, flags, grads):
            p.requires_grad_(f)
            p.grad = g
        for m, t in training.items():
            m.training = t


__all__ = ["CALIBRATION_TENSORS", "attach_tensors", "calibrate", "calibration_tensors", "default_loss",
           "needs_calibration", "unresolved_error"]
