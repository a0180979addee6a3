"""Prompt templates and class names as plain data (open_clip's style), for zero-shot heads and prompt learning.

* :data:`OPENAI_IMAGENET_TEMPLATES` — CLIP's 80 ImageNet templates, and :data:`SIMPLE_IMAGENET_TEMPLATES` — the
  7-template subset (CoOp's ``IMAGENET_TEMPLATES_SELECT``); both re-exported from open_clip (callables
  ``f(classname) -> str``, accepted by ``open_clip.build_zero_shot_classifier``).
* :data:`IMAGENET_CLASSNAMES` — CLIP's 1000 ImageNet class names (from open_clip), in label order.
* :data:`CUSTOM_TEMPLATES` — CoOp's hand-crafted single template per dataset (``trainers/zsclip.py``), keyed by
  this library's dataset names; :func:`dataset_prompts` applies one as CoOp does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

_OPEN_CLIP_DATA = ("IMAGENET_CLASSNAMES", "OPENAI_IMAGENET_TEMPLATES", "SIMPLE_IMAGENET_TEMPLATES")


def __getattr__(name: str) -> Any:
    # Lazy: importing open_clip costs seconds, and most users of the dataset layer never need these.
    if name in _OPEN_CLIP_DATA:
        from open_clip import zero_shot_metadata

        return getattr(zero_shot_metadata, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

#: CoOp's hand-crafted prompt per dataset (format strings with one ``{}`` for the class name).
CUSTOM_TEMPLATES: dict[str, str] = {
    "oxford_pets": "a photo of a {}, a type of pet.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "stanford_cars": "a photo of a {}.",
    "food101": "a photo of {}, a type of food.",
    "sun397": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenet": "a photo of a {}.",
    "imagenet_sketch": "a photo of a {}.",
    "imagenetv2": "a photo of a {}.",
    "imagenet_a": "a photo of a {}.",
    "imagenet_r": "a photo of a {}.",
}

#: The template for datasets without a hand-crafted one.
DEFAULT_TEMPLATE = "a photo of a {}."


def dataset_template(name: str) -> str:
    """CoOp's hand-crafted template for dataset ``name`` (:data:`DEFAULT_TEMPLATE` when it has none)."""
    return CUSTOM_TEMPLATES.get(name, DEFAULT_TEMPLATE)


def dataset_prompts(name: str, classnames: Sequence[str]) -> list[str]:
    """One prompt per class, as CoOp's zero-shot CLIP: the dataset's template, underscores in names as spaces."""
    template = dataset_template(name)
    return [template.format(c.replace("_", " ")) for c in classnames]


#: Named template sets for ``resolve_templates``.
TEMPLATE_SETS = ("dataset", "imagenet80", "imagenet7")


def resolve_templates(templates: Union[str, Sequence[str]], dataset: Optional[str] = None) -> list:
    """Prompt templates for a ``templates`` argument.

    Args:
        templates: ``"dataset"`` (CoOp's hand-crafted template of ``dataset``, ``"a photo of a {}."`` for datasets
            without one), ``"imagenet80"`` (CLIP's 80 ImageNet templates), ``"imagenet7"`` (CoOp's 7-template
            subset), a single format string with ``{}``, or a list of format strings.
        dataset: Dataset name (a key of :data:`CUSTOM_TEMPLATES`) for ``"dataset"``.

    Returns:
        Format strings or open_clip's template callables.

    Raises:
        ValueError: an unknown name, an empty list or a template without ``{}``.
        TypeError: a template that is not a string.
    """
    if isinstance(templates, str):
        if templates == "dataset":
            return [dataset_template(dataset) if dataset else DEFAULT_TEMPLATE]
        if templates == "imagenet80":
            return list(__getattr__("OPENAI_IMAGENET_TEMPLATES"))
        if templates == "imagenet7":
            return list(__getattr__("SIMPLE_IMAGENET_TEMPLATES"))
        if "{}" in templates:
            return [templates]
        raise ValueError(f"templates must be one of {TEMPLATE_SETS}, a format string with '{{}}' or a list of them; "
                         f"got {templates!r}")
    if not isinstance(templates, Sequence) or not templates:
        raise ValueError(f"templates must be a non-empty list of format strings, got {templates!r}")
    for t in templates:
        if not isinstance(t, str):
            raise TypeError(f"a template must be a format string with '{{}}', got {type(t).__name__}")
        if "{}" not in t:
            raise ValueError(f"template {t!r} has no '{{}}' placeholder for the class name")
    return list(templates)
