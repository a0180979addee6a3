"""Importers for the published prompt checkpoints of CoOp, CoCoOp, MaPLe, IVLP and PromptSRC.

The official code of these methods trains with Dassl (KaiyangZhou/Dassl.pytorch), whose ``save_checkpoint`` writes
``{"state_dict", "epoch", "optimizer", "scheduler", ...}`` with ``torch.save`` to
``<output>/<registered name>/model.pth.tar-<epoch>`` (and a copy ``model-best.pth.tar``). This module reads such a
file safely, maps the prompt tensors onto vpeft's prompt learners and returns a ready :class:`PeftModel`::

    model = vpeft.create_backbone("open_clip:ViT-B-16", pretrained="ViT-B-16.pt")  # the OpenAI weights
    pm = load_official_prompts(model, "output/base2new/.../MultiModalPromptLearner/model.pth.tar-5")
    clf = vpeft.ClipClassifier(pm, open_clip.get_tokenizer("ViT-B-16"), classnames)

Supported sources and key layouts (read from the repositories' ``trainers/*.py`` and ``clip/model.py``):

* **CoOp / CoCoOp** (KaiyangZhou/CoOp ``trainers/coop.py``, ``trainers/cocoop.py``; the same trainers ship in
  muzairkhattak/multimodal-prompt-learning). The registered model is the prompt learner alone
  (``<output>/prompt_learner/...``), so keys have no prefix: ``ctx`` ``(n_ctx, d)`` or ``(n_cls, n_ctx, d)`` for
  class-specific context, the fixed buffers ``token_prefix``/``token_suffix`` (dropped), and for CoCoOp
  ``meta_net.linear1.{weight,bias}`` ``(D // 16, D)``/``(D // 16,)`` and ``meta_net.linear2.{weight,bias}``
  ``(d, D // 16)``/``(d,)``.
* **MaPLe** (muzairkhattak/multimodal-prompt-learning ``trainers/maple.py``, registered as
  ``MultiModalPromptLearner``): the whole ``CustomCLIP`` state dict. Prompt keys: ``prompt_learner.ctx``
  ``(n_ctx, d)``, ``prompt_learner.proj.{weight,bias}`` (``Linear(d, d_vision)``, the block-0 coupling),
  ``prompt_learner.compound_prompts_text.{j}`` ``(n_ctx, d)`` (text block ``j + 1``) and
  ``prompt_learner.compound_prompt_projections.{j}.{weight,bias}``; ``prompt_learner.token_prefix/suffix`` and the
  frozen CLIP (``image_encoder.*``, ``text_encoder.*``, ``logit_scale``) are dropped.
* **IVLP** (multimodal-prompt-learning ``trainers/independentVL.py``) and **PromptSRC** (muzairkhattak/PromptSRC
  ``trainers/promptsrc.py``), both registered as ``VLPromptLearner``, whole-model state dicts: ``prompt_learner.ctx``
  (text, block 0), ``text_encoder.transformer.resblocks.{i}.VPT_shallow`` ``(n_ctx, d)`` (text block ``i >= 1``),
  ``image_encoder.VPT`` ``(n_ctx_vision, d_vision)`` (image block 0) and
  ``image_encoder.transformer.resblocks.{i}.VPT_shallow`` (image block ``i >= 1``). PromptSRC additionally stores
  its frozen zero-shot image encoder under ``prompt_learner.ZS_image_encoder.*`` (dropped; its presence is how a
  PromptSRC checkpoint is told from an IVLP one). A PromptSRC checkpoint of the last epoch holds the
  Gaussian-aggregated (GPA) prompts, since the trainer loads them into the model before saving.

vpeft names (relative to the method's shared module, i.e. adapter keys ``_shared.<method>.<name>``):

============  ==========================================================  ===========================================
method        official key                                                vpeft name
============  ==========================================================  ===========================================
coop          ``ctx``                                                     ``ctx``
cocoop        ``ctx``, ``meta_net.linear{1,2}.{weight,bias}``             same names
maple         ``prompt_learner.ctx`` / ``.proj.*``                        ``ctx`` / ``proj.*``
maple         ``prompt_learner.compound_prompts_text.{j}``                ``compound_prompts_text.{j}``
maple         ``prompt_learner.compound_prompt_projections.{j}.*``        ``compound_prompt_projections.{j}.*``
ivlp/psrc     ``prompt_learner.ctx``                                      ``ctx``
ivlp/psrc     ``text_encoder.transformer.resblocks.{i}.VPT_shallow``      ``text_prompts.{i-1}``
ivlp/psrc     ``image_encoder.VPT``                                       ``vision_prompts.0``
ivlp/psrc     ``image_encoder.transformer.resblocks.{i}.VPT_shallow``     ``vision_prompts.{i}``
============  ==========================================================  ===========================================

The config is inferred from the shapes (``n_ctx``, ``csc``/``num_classes``, depths, ``n_ctx_vision``, CoCoOp's
``reduction``). What the shapes cannot tell is the prompt *text* around the learned context, which ``ctx_init``
supplies:

* MaPLe, IVLP and PromptSRC initialise the first ``n_ctx`` tokens of ``CTX_INIT`` and keep the *remaining words as
  fixed prompt text*, but only when ``n_ctx <= 4`` (their ``if ctx_init and n_ctx <= 4`` branch); otherwise the
  context is random and the prompt is ``"X ... X {class}."``. So a MaPLe checkpoint with ``n_ctx=2`` trained with
  the default ``"a photo of a"`` prompts ``"X X of a {class}."``; loading it with another ``ctx_init`` would give
  different text features. ``ctx_init`` defaults to each method's default (``"a photo of a"``, what the published
  configs use); pass the ``CTX_INIT`` of the training config if it differed, or ``None`` for a run without one.
* CoOp and CoCoOp learn *all* tokens of their init, so no words stay fixed and ``ctx_init`` does not matter (see
  the deviations for the one exception).

Reading files: always ``torch.load(..., weights_only=True)``. Dassl pickles the optimizer and, inside the warm-up
scheduler's state, the successor scheduler as Python objects (``torch.optim.sgd.SGD``,
``torch.optim.lr_scheduler.CosineAnnealingLR``, ...), which plain ``weights_only`` refuses. For a fixed list of
such training-state classes (:data:`TRAINING_STATE_GLOBALS`) the unpickler is given inert placeholders that run no
code; any other object makes :func:`read_official_checkpoint` raise ``ValueError`` explaining how to re-save the
state dict alone. (The placeholders need torch >= 2.6; older torch reads only files without such objects.)

Deviations from the reference implementations:
    * Only the prompt tensors are read; the optimizer, scheduler and epoch are dropped, and so are the
      class-name buffers ``token_prefix``/``token_suffix`` (the official ``load_model`` drops them too: prompts are
      re-built for the class names given at use time, here by ``ClipClassifier``).
    * Official tensors are often float16 (OpenAI CLIP runs in half precision under ``PREC: fp16``); they are cast
      to the dtype of the model's prompt learner when copied in.
    * CoOp/CoCoOp count ``CTX_INIT`` in words and keep extra BPE tokens of words that split into several tokens as
      fixed text; vpeft's CoOp cannot express that, so such a combination (``ctx_init`` passed explicitly, its word
      count equal to ``n_ctx`` but more BPE tokens) raises ``ValueError``. Inits of single-token words such as
      ``"a photo of a"`` and random inits are exact.
    * Prompt placement differences of vpeft's methods apply (vision prompts after the class token instead of at
      the end of the sequence: equal outputs up to float summation order; see ``ivlp.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import re
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn as nn

from .base import PeftConfig, get_method, method_for_config
from .peft_model import PeftModel, get_peft_model

#: Methods with an importer, in detection order.
SUPPORTED_METHODS = ("coop", "cocoop", "maple", "ivlp", "promptsrc")


class _MethodDefault:
    """Sentinel: use the method config's default ``ctx_init``."""

    def __repr__(self) -> str:
        return "<method default>"


#: Default of ``ctx_init``: each method's own default (``"a photo of a"`` for MaPLe, IVLP, PromptSRC).
METHOD_DEFAULT: Any = _MethodDefault()

#: Training-state classes Dassl checkpoints pickle next to the weights; read as inert placeholders.
TRAINING_STATE_GLOBALS = (
    "torch.optim.sgd.SGD", "torch.optim.adam.Adam", "torch.optim.adamw.AdamW", "torch.optim.rmsprop.RMSprop",
    "torch.optim.lr_scheduler.CosineAnnealingLR", "torch.optim.lr_scheduler.StepLR",
    "torch.optim.lr_scheduler.MultiStepLR", "dassl.optim.radam.RAdam", "dassl.optim.radam.PlainRAdam",
    "dassl.optim.radam.AdamW", "dassl.optim.lr_scheduler.ConstantWarmupScheduler",
    "dassl.optim.lr_scheduler.LinearWarmupScheduler",
)

_BUFFERS = ("token_prefix", "token_suffix")
_META = tuple(f"meta_net.linear{i}.{p}" for i in (1, 2) for p in ("weight", "bias"))
_FROZEN = ("image_encoder.", "text_encoder.", "logit_scale")
_TEXT_VPT = re.compile(r"text_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow")
_VIS_VPT = re.compile(r"image_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow")
_VIS_VPT0 = "image_encoder.VPT"
_MAPLE_TEXT = re.compile(r"prompt_learner\.compound_prompts_text\.(\d+)")
_MAPLE_PROJ = re.compile(r"prompt_learner\.compound_prompt_projections\.(\d+)\.(weight|bias)")
_ZS = "prompt_learner.ZS_image_encoder."

_EXPECTED = {
    "coop": "ctx (plus the buffers token_prefix/token_suffix, dropped)",
    "cocoop": "ctx, meta_net.linear1.weight/bias, meta_net.linear2.weight/bias (plus the buffers "
              "token_prefix/token_suffix, dropped)",
    "maple": "prompt_learner.ctx, prompt_learner.proj.weight/bias, prompt_learner.compound_prompts_text.<j>, "
             "prompt_learner.compound_prompt_projections.<j>.weight/bias (plus prompt_learner.token_prefix/"
             "token_suffix and the frozen CLIP under image_encoder./text_encoder./logit_scale, dropped)",
    "ivlp": "prompt_learner.ctx, text_encoder.transformer.resblocks.<i>.VPT_shallow (i >= 1), image_encoder.VPT, "
            "image_encoder.transformer.resblocks.<i>.VPT_shallow (i >= 1) (plus prompt_learner.token_prefix/"
            "token_suffix, prompt_learner.ZS_image_encoder.* and the frozen CLIP under image_encoder./"
            "text_encoder./logit_scale, dropped)",
}
_EXPECTED["promptsrc"] = _EXPECTED["ivlp"]


def _few(items, n: int = 8) -> str:
    items = list(items)
    return str(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


# --- reading ----------------------------------------------------------------------------------------------------------

class _TrainingState:
    """Inert stand-in for an optimizer/scheduler object in a checkpoint: runs no code and keeps no state."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass

    def __repr__(self) -> str:
        return "<training state (not loaded)>"


def _plain_dict(*args) -> dict:
    # stands in for collections.defaultdict(dict) (the optimizer's per-parameter state): items are set afterwards
    return {}


def _training_state_globals():
    """``weights_only`` allow-list context mapping the training-state classes to inert placeholders."""
    ser = torch.serialization
    if not hasattr(ser, "safe_globals"):  # torch < 2.6
        return contextlib.nullcontext()
    entries: list = [dict, (_plain_dict, "collections.defaultdict")]
    entries += [(_TrainingState, name) for name in TRAINING_STATE_GLOBALS]
    return ser.safe_globals(entries)


def read_official_checkpoint(path: Union[str, os.PathLike]) -> Mapping[str, Any]:
    """Read a Dassl checkpoint (or a plain state dict file) with ``torch.load(weights_only=True)`` on the CPU.

    Training-state objects listed in :data:`TRAINING_STATE_GLOBALS` come back as inert placeholders.

    Returns:
        The loaded mapping (a Dassl dict with ``"state_dict"``, or the state dict itself).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file needs full unpickling (other Python objects) or is not a torch checkpoint; the message
            says how to re-save only the state dict.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path!r}")
    try:
        with _training_state_globals():
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", msg)
        what = f"it pickles the Python object {found.group(1)}" if found else msg.strip().splitlines()[-1][:300]
        raise ValueError(
            f"{path!r} cannot be read with torch.load(weights_only=True): {what}. vpeft does not unpickle arbitrary "
            "objects. If you trust the file, re-save only its state dict once, e.g. `ckpt = torch.load(path, "
            "map_location='cpu', weights_only=False); torch.save(ckpt.get('state_dict', ckpt), 'prompts.pth')`, "
            "and load 'prompts.pth'") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path!r} is not a readable torch checkpoint: {e}") from None
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path!r} holds a {type(obj).__name__}, not a state dict or a Dassl checkpoint dict")
    return obj


def _state_dict_of(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    if not isinstance(state, Mapping):
        raise TypeError(f"expected a state dict (a mapping of names to tensors), got {type(state).__name__}")
    inner = state.get("state_dict")
    if isinstance(inner, Mapping):
        state = inner
    out: dict[str, torch.Tensor] = {}
    bad = []
    for k, v in state.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            bad.append(f"{k!r}: {type(v).__name__}")
            continue
        out[k[len("module."):] if k.startswith("module.") else k] = v  # DataParallel prefix
    if bad:
        raise ValueError(f"the checkpoint's state dict holds non-tensor entries {_few(bad)}; pass a Dassl checkpoint "
                         "dict (with 'state_dict') or a state dict of tensors")
    return out


# --- conversion -------------------------------------------------------------------------------------------------------

def _canonical(method: str) -> str:
    if not isinstance(method, str) or method.lower() not in SUPPORTED_METHODS:
        raise ValueError(f"method must be one of {SUPPORTED_METHODS} (or None to detect it), got {method!r}")
    return method.lower()


def _detect(keys: set[str]) -> str:
    if any(k.startswith("prompt_learner.") for k in keys):
        if any(_MAPLE_TEXT.fullmatch(k) or _MAPLE_PROJ.fullmatch(k) or k.startswith("prompt_learner.proj.")
               for k in keys):
            return "maple"
        return "promptsrc" if any(k.startswith(_ZS) for k in keys) else "ivlp"
    if "ctx" in keys or any(k in _BUFFERS for k in keys):
        return "cocoop" if any(k.startswith("meta_net.") for k in keys) else "coop"
    raise ValueError(f"cannot tell which method wrote this checkpoint (keys {_few(sorted(keys))}); expected a CoOp/"
                     "CoCoOp prompt learner state dict (ctx, token_prefix, ...) or a MaPLe/IVLP/PromptSRC model state "
                     "dict (prompt_learner.ctx, ...). Pass method= to name it")


def _indexed(found: dict[int, str], start: int, what: str, method: str) -> list[str]:
    """Keys of ``found`` (index -> key) in order; the indices must run ``start, start + 1, ...`` without gaps."""
    idx = sorted(found)
    if idx != list(range(start, start + len(idx))):
        raise ValueError(f"{method}: {what} found for blocks {idx}; the official code prompts blocks {start}.."
                         f"<depth - 1> without gaps")
    return [found[i] for i in idx]


def _shape_error(method: str, key: str, got: torch.Tensor, want: tuple) -> ValueError:
    return ValueError(f"{method}: official tensor {key!r} has shape {tuple(got.shape)}, expected {want} to match the "
                      "other prompt tensors of the checkpoint")


def _convert(state: Mapping[str, Any], method: Optional[str]) -> tuple[str, dict[str, torch.Tensor], dict[str, str]]:
    sd = _state_dict_of(state)
    keys = set(sd)
    method = _detect(keys) if method is None else _canonical(method)
    model_layout = any(k.startswith("prompt_learner.") for k in keys)
    if (method in ("coop", "cocoop")) == model_layout:
        kind = "a whole-model state dict (prompt_learner.* keys)" if model_layout else "a prompt-learner state dict"
        raise ValueError(f"{method}: this checkpoint is {kind}, but official {method} checkpoints hold "
                         f"{_EXPECTED[method]}")
    out: dict[str, torch.Tensor] = {}
    src: dict[str, str] = {}
    unknown: list[str] = []

    def take(official: str, name: str) -> None:
        out[name], src[name] = sd[official], official

    if method in ("coop", "cocoop"):
        wanted = ("ctx",) + (_META if method == "cocoop" else ())
        for k in sorted(keys):
            if k in wanted:
                take(k, k)
            elif k not in _BUFFERS:
                unknown.append(k)
    elif method == "maple":
        text, proj = {}, {}
        for k in sorted(keys):
            if m := _MAPLE_TEXT.fullmatch(k):
                text[int(m.group(1))] = k
            elif m := _MAPLE_PROJ.fullmatch(k):
                proj.setdefault(int(m.group(1)), {})[m.group(2)] = k
            elif k in ("prompt_learner.ctx", "prompt_learner.proj.weight", "prompt_learner.proj.bias"):
                take(k, k[len("prompt_learner."):])
            elif k in tuple(f"prompt_learner.{b}" for b in _BUFFERS):
                pass
            elif k.startswith(_FROZEN) and "VPT" not in k:
                pass
            else:
                unknown.append(k)
        for j, k in enumerate(_indexed(text, 0, "compound_prompts_text", method)):
            take(k, f"compound_prompts_text.{j}")
        if sorted(proj) != sorted(text) or any(set(p) != {"weight", "bias"} for p in proj.values()):
            raise ValueError(f"{method}: compound_prompts_text has indices {sorted(text)} but "
                             f"compound_prompt_projections has {sorted(proj)} (each needs weight and bias); the "
                             "official MaPLe learner has one projection per deep text prompt")
        for j in sorted(proj):
            for p in ("weight", "bias"):
                take(proj[j][p], f"compound_prompt_projections.{j}.{p}")
    else:  # ivlp, promptsrc
        text, vis = {}, {}
        for k in sorted(keys):
            if m := _TEXT_VPT.fullmatch(k):
                text[int(m.group(1))] = k
            elif m := _VIS_VPT.fullmatch(k):
                vis[int(m.group(1))] = k
            elif k == _VIS_VPT0:
                vis[0] = k
            elif k == "prompt_learner.ctx":
                take(k, "ctx")
            elif k in tuple(f"prompt_learner.{b}" for b in _BUFFERS) or k.startswith(_ZS):
                pass
            elif k.startswith(_FROZEN) and "VPT" not in k:
                pass
            else:
                unknown.append(k)
        for j, k in enumerate(_indexed(text, 1, "text prompts (VPT_shallow)", method)):
            take(k, f"text_prompts.{j}")
        if vis and 0 not in vis:
            raise ValueError(f"{method}: deep vision prompts (image_encoder.transformer.resblocks.<i>.VPT_shallow) "
                             f"without the block-0 prompts {_VIS_VPT0!r}")
        for i, k in enumerate(_indexed(vis, 0, "vision prompts", method)):
            take(k, f"vision_prompts.{i}")
    if unknown:
        raise ValueError(f"{method}: unexpected key(s) in the official checkpoint: {_few(unknown)}; an official "
                         f"{method} checkpoint holds {_EXPECTED[method]}")
    missing = [k for k in (("ctx",) + (_META if method == "cocoop" else ()) +
                           (("proj.weight", "proj.bias") if method == "maple" else ())) if k not in out]
    if missing:
        prefix = "prompt_learner." if model_layout else ""
        raise ValueError(f"{method}: the official checkpoint lacks {[prefix + k for k in missing]}; it should hold "
                         f"{_EXPECTED[method]}")
    _check_consistent(method, out, src)
    return method, out, src


def _check_consistent(method: str, out: dict[str, torch.Tensor], src: dict[str, str]) -> None:
    for name, t in out.items():
        if not t.is_floating_point():
            raise ValueError(f"{method}: official tensor {src[name]!r} has dtype {t.dtype}; prompts are floating point")
    ctx = out["ctx"]
    if ctx.dim() != 2 and not (method == "coop" and ctx.dim() == 3):
        want = "(n_ctx, d) or (n_classes, n_ctx, d)" if method == "coop" else "(n_ctx, d)"
        raise ValueError(f"{method}: official tensor {src['ctx']!r} has shape {tuple(ctx.shape)}, expected {want}")
    n, d = ctx.shape[-2:]
    want: dict[str, tuple] = {}
    if method == "cocoop":
        w1 = out["meta_net.linear1.weight"]
        if w1.dim() != 2:
            raise _shape_error(method, src["meta_net.linear1.weight"], w1, ("hidden", "image_dim"))
        h = w1.shape[0]
        want = {"meta_net.linear1.bias": (h,), "meta_net.linear2.weight": (d, h), "meta_net.linear2.bias": (d,)}
    elif method == "maple":
        pw = out["proj.weight"]
        if pw.dim() != 2 or pw.shape[1] != d:
            raise _shape_error(method, src["proj.weight"], pw, ("d_vision", d))
        dv = pw.shape[0]
        want = {"proj.bias": (dv,)}
        for name in out:
            if name.startswith("compound_prompts_text."):
                want[name] = (n, d)
            elif name.startswith("compound_prompt_projections."):
                want[name] = (dv, d) if name.endswith("weight") else (dv,)
    elif method in ("ivlp", "promptsrc"):
        vis = out.get("vision_prompts.0")
        if vis is not None and vis.dim() != 2:
            raise _shape_error(method, src["vision_prompts.0"], vis, ("n_ctx_vision", "d_vision"))
        for name in out:
            if name.startswith("text_prompts."):
                want[name] = (n, d)
            elif name.startswith("vision_prompts."):
                want[name] = tuple(vis.shape)
    for name, shape in want.items():
        if tuple(out[name].shape) != shape:
            raise _shape_error(method, src[name], out[name], shape)


def convert_official_prompts(state: Mapping[str, Any],
                             method: Optional[str] = None) -> tuple[str, dict[str, torch.Tensor]]:
    """Map an official prompt checkpoint onto vpeft's prompt-learner parameter names.

    Args:
        state: A Dassl checkpoint dict (its ``"state_dict"`` is used) or the state dict itself. Keys may carry
            DataParallel's ``module.`` prefix.
        method: ``"coop"``, ``"cocoop"``, ``"maple"``, ``"ivlp"`` or ``"promptsrc"``; ``None`` detects it from the
            keys (``meta_net.*``: CoCoOp; MaPLe's ``compound_*``/``proj``; PromptSRC's
            ``prompt_learner.ZS_image_encoder.*``; other whole-model checkpoints: IVLP).

    Returns:
        ``(method, tensors)`` with tensors keyed by the parameter name in the method's shared prompt learner (e.g.
        ``"text_prompts.0"``), unchanged in dtype. Buffers, frozen CLIP weights and training state are dropped.

    Raises:
        ValueError: unknown or missing keys (the message names them and lists the expected layout), gaps in the
            prompted blocks, tensors whose shapes disagree with each other, non-tensor entries.
    """
    method, out, _ = _convert(state, method)
    return method, out


# --- config -----------------------------------------------------------------------------------------------------------

def _config_default(method: str, field_name: str):
    cls = get_method(method).config_class
    return {f.name: f.default for f in dataclasses.fields(cls)}[field_name]


def _fixed_text_init(method: str, ctx_init, n_ctx: int) -> Optional[str]:
    """The ``ctx_init`` that reproduces the official prompt text of MaPLe/IVLP/PromptSRC."""
    if ctx_init is METHOD_DEFAULT:
        ctx_init = _config_default(method, "ctx_init")
    if ctx_init is not None and not isinstance(ctx_init, str):
        raise TypeError(f"ctx_init must be a string or None, got {type(ctx_init).__name__}")
    # The official learners use CTX_INIT only `if ctx_init and n_ctx <= 4`; otherwise "X X ... {class}."
    if not ctx_init or not ctx_init.strip() or n_ctx > 4:
        return None
    return ctx_init


def _check_coop_init(method: str, ctx_init, n_ctx: int) -> None:
    if ctx_init is METHOD_DEFAULT or ctx_init is None:
        return
    if not isinstance(ctx_init, str):
        raise TypeError(f"ctx_init must be a string or None, got {type(ctx_init).__name__}")
    words = ctx_init.replace("_", " ").split(" ")
    if len(words) != n_ctx:  # the checkpoint was not trained from this init: nothing stays fixed
        return
    from ._text_prompts import default_tokenizer

    tokens = default_tokenizer().encode(ctx_init.replace("_", " "))
    if len(tokens) > n_ctx:
        raise ValueError(f"{method}: ctx_init {ctx_init!r} has {n_ctx} words but {len(tokens)} BPE tokens; the "
                         f"official {method} learned the first {n_ctx} tokens and kept the rest as fixed text, which "
                         f"vpeft's {method} cannot express")


def config_from_official(method: str, converted: Mapping[str, torch.Tensor], ctx_init: Optional[str] = METHOD_DEFAULT,
                         **overrides) -> PeftConfig:
    """The vpeft config that an official checkpoint's tensors fit.

    Shapes give ``n_ctx``, class-specific context and ``num_classes`` (CoOp), ``reduction`` (CoCoOp: image feature
    dim // meta-net hidden width), ``depth`` (MaPLe: 1 + deep text prompts), ``text_depth``, ``vision_depth`` and
    ``n_ctx_vision`` (IVLP/PromptSRC).

    Args:
        method: One of :data:`SUPPORTED_METHODS`.
        converted: Output tensors of :func:`convert_official_prompts`.
        ctx_init: The training run's ``CTX_INIT``. For MaPLe/IVLP/PromptSRC it decides the *fixed prompt text*: with
            ``n_ctx <= 4`` the official learners learn the first ``n_ctx`` tokens of it and keep the other words as
            text (MaPLe ``n_ctx=2`` with ``"a photo of a"``: ``"X X of a {class}."``); with ``n_ctx > 4`` or
            ``None`` there is no fixed text. Default: the method config's default (``"a photo of a"``). For
            CoOp/CoCoOp no words stay fixed and the value is only checked (see the module's deviations).
        **overrides: Further config fields that shapes cannot tell, e.g. ``class_token_position="middle"`` (CoOp)
            or PromptSRC's loss weights; inferred fields cannot be overridden.

    Returns:
        The config (validated); its ``ctx_init`` is what the vpeft learner needs to rebuild the official prompt.

    Raises:
        ValueError: an unknown method, missing tensors, an override of an inferred field, an unrepresentable
            meta-net width.
    """
    method = _canonical(method)
    if "ctx" not in converted:
        raise ValueError(f"{method}: converted tensors lack 'ctx'; pass the output of convert_official_prompts")
    ctx = converted["ctx"]
    n_ctx = int(ctx.shape[-2])
    if method == "coop":
        _check_coop_init(method, ctx_init, n_ctx)
        csc = ctx.dim() == 3
        fields = dict(n_ctx=n_ctx, ctx_init=None, csc=csc, num_classes=int(ctx.shape[0]) if csc else None)
    elif method == "cocoop":
        _check_coop_init(method, ctx_init, n_ctx)
        hidden, image_dim = converted["meta_net.linear1.weight"].shape
        reduction = image_dim // hidden if hidden else 0
        if reduction < 1 or image_dim // reduction != hidden:
            raise ValueError(f"cocoop: a meta-net hidden width of {hidden} for {image_dim}-dim image features is not "
                             "image_dim // reduction for any integer reduction")
        fields = dict(n_ctx=n_ctx, ctx_init=None, reduction=reduction)
    elif method == "maple":
        depth = 1 + sum(k.startswith("compound_prompts_text.") for k in converted)
        fields = dict(n_ctx=n_ctx, depth=depth, ctx_init=_fixed_text_init(method, ctx_init, n_ctx))
    else:
        vision_depth = sum(k.startswith("vision_prompts.") for k in converted)
        fields = dict(n_ctx=n_ctx, text_depth=1 + sum(k.startswith("text_prompts.") for k in converted),
                      vision_depth=vision_depth, ctx_init=_fixed_text_init(method, ctx_init, n_ctx))
        if vision_depth:
            fields["n_ctx_vision"] = int(converted["vision_prompts.0"].shape[0])
    clash = sorted(set(overrides) & set(fields))
    if clash:
        raise ValueError(f"{method}: {clash} are inferred from the checkpoint and cannot be overridden")
    cfg = get_method(method).config_class(**fields, **overrides)
    cfg.validate()
    return cfg


# --- loading ----------------------------------------------------------------------------------------------------------

def _expected_shapes(model: nn.Module, cfg: PeftConfig) -> dict[str, tuple]:
    """Parameter shapes of the learner ``cfg`` builds on ``model``, without changing the model (or the RNG)."""
    from ..backbones import get_spec

    cls = method_for_config(cfg)
    if getattr(cfg, "ctx_init", None) is not None:  # values only, not shapes; get_peft_model checks it (pre-mutation)
        cfg = dataclasses.replace(cfg, ctx_init=None)
    method = cls(cfg, cls.name)
    spec = get_spec(model)
    sites = method.resolve(model, spec)
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        shared = method.build_shared(model, spec, sites)
    return {k: tuple(v.shape) for k, v in shared.state_dict().items()}


def _width_hint(model: nn.Module) -> str:
    from ..backbones import get_spec

    towers = get_spec(model).towers
    parts = [f"{t} width {towers[t].width}" for t in ("text", "visual") if t in towers]
    return ", ".join(parts)


def load_official_prompts(model: nn.Module, path_or_state: Union[str, os.PathLike, Mapping[str, Any]],
                          method: Optional[str] = None, ctx_init: Optional[str] = METHOD_DEFAULT,
                          **overrides) -> PeftModel:
    """Attach the prompts of an official CoOp/CoCoOp/MaPLe/IVLP/PromptSRC checkpoint to an open_clip CLIP.

    Args:
        model: The plain open_clip CLIP the prompts were trained for (e.g. ``ViT-B-16`` with the OpenAI weights).
        path_or_state: A Dassl checkpoint file (``.../prompt_learner/model.pth.tar-50``,
            ``.../MultiModalPromptLearner/model.pth.tar-5``, ``.../VLPromptLearner/model-best.pth.tar``), a state
            dict file, or an already loaded mapping.
        method: The method, or ``None`` to detect it from the keys (see :func:`convert_official_prompts`).
        ctx_init: The training run's ``CTX_INIT`` (default: the method's default); it fixes the prompt text of
            MaPLe/IVLP/PromptSRC with ``n_ctx <= 4`` (see :func:`config_from_official`).
        **overrides: Extra config fields, e.g. ``class_token_position`` for CoOp.

    Returns:
        A :class:`PeftModel` with the method attached and the official tensors copied in (cast to the learner's
        dtype and device). Use it with ``vpeft.ClipClassifier``; save it with ``save_adapter``.

    Raises:
        ValueError: an unreadable or unsafe file (see :func:`read_official_checkpoint`), unknown/missing keys, or
            tensors that do not fit this model (e.g. ViT-B/16 prompts on a ViT-L model: the message names the
            tensor). Everything is checked before the model is changed, so on error ``model`` is left untouched.
        TypeError: ``model`` is already a ``PeftModel``.
    """
    if isinstance(model, PeftModel):
        raise TypeError("model is already a PeftModel; pass the plain open_clip model (unload() the other first)")
    if isinstance(path_or_state, (str, os.PathLike)):
        state = read_official_checkpoint(path_or_state)
    else:
        state = path_or_state
    method, converted, src = _convert(state, method)
    cfg = config_from_official(method, converted, ctx_init, **overrides)
    expected = _expected_shapes(model, cfg)
    if set(expected) != set(converted):  # a converter/learner disagreement, not a user error
        raise RuntimeError(f"{method}: converted names {_few(sorted(converted))} do not match the learner's "
                           f"{_few(sorted(expected))}")
    bad = [f"{src[k]} (vpeft {k}): checkpoint {tuple(converted[k].shape)}, model {expected[k]}"
           for k in sorted(expected) if tuple(converted[k].shape) != expected[k]]
    if bad:
        raise ValueError(f"{method}: the official prompts do not fit this model: {_few(bad, 4)}. Prompts are "
                         f"trained for one CLIP architecture; this model has {_width_hint(model)}")
    pm = get_peft_model(model, cfg)
    key = pm.method_keys[0]
    try:
        pm.load_adapter_state_dict({f"_shared.{key}.{k}": v for k, v in converted.items()})
    except BaseException:
        pm.unload()  # leave `model` as it was handed in
        raise
    return pm


__all__ = ["METHOD_DEFAULT", "SUPPORTED_METHODS", "TRAINING_STATE_GLOBALS", "config_from_official",
           "convert_official_prompts", "load_official_prompts", "read_official_checkpoint"]
