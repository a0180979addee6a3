"""CLIP tasks: zero-shot evaluation (:class:`ZeroShotEvaluator`) and few-shot prompt learning / CLIP fine-tuning
(:class:`ClipPromptTask`), both classifying through :class:`vpeft.clip.ClipClassifier`.

The class list is data, not architecture: both tasks read it from the data module (``trainer.datamodule.classnames``)
in ``setup`` (or take an explicit ``classnames``) and rebuild the classifier whenever it changes. That is what
base-to-new generalisation needs (CoCoOp, arXiv:2203.05557): a prompt learner trained on the base classes
(``FewShotDataModule(subsample="base")``) is tested, unchanged, on the new classes (``subsample="new"``)::

    vpeft fit  -c configs/trainer/gpu.yaml -c configs/data/caltech101.yaml -c configs/method/clip/coop.yaml \\
               -c configs/experiment/clip_prompt_vit_b16.yaml --data.subsample base --trainer.default_root_dir RUN
    vpeft test -c configs/trainer/gpu.yaml -c configs/data/caltech101.yaml --data.subsample new \\
               --ckpt_path RUN/checkpoints/last.ckpt --trainer.default_root_dir RUN/new

Class names are used as CoOp uses them: underscores become spaces (``"cougar_face"`` -> ``"cougar face"``).

PromptSRC (arXiv:2307.06948) is recognised among the methods and trained with its self-regulating loss
(:func:`vpeft.methods.promptsrc.promptsrc_loss`) and Gaussian prompt aggregation (GPA); see :class:`ClipPromptTask`.

Deviations from the reference implementations:
    * GPA adds each epoch's prompts right after the epoch's last optimizer step (before that epoch's validation and
      checkpoint) and loads the aggregate into the model after the last epoch's last step, so the last epoch's
      validation, its checkpoints and the exported adapter all hold the aggregated prompts. The reference swaps them
      in after training.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchmetrics.classification import MulticlassAccuracy

import vpeft
from vpeft.clip import ClipClassifier, clean_classnames, find_prompt_learner, tokenizer_for
from vpeft.datasets.templates import resolve_templates
from vpeft.methods.mask import MaskTuningConfig, drop_gradient, general_knowledge_loss, score_tensors
from vpeft.methods.promptsrc import GaussianPromptAggregator, PromptSRCConfig, promptsrc_loss

from .base import PeftTask, method_configs

#: PromptSRC's template ensemble is the first 60 of CLIP's 80 ImageNet templates (its ``IMAGENET_TEMPLATES``).
PROMPTSRC_NUM_TEMPLATES = 60

#: Checkpoint keys of the CLIP tasks' extra state (plain data and tensors: ``torch.load(weights_only=True)`` reads it).
GPA_KEY = "vpeft_gpa"
CLASSES_KEY = "vpeft_clip"

Templates = Union[str, Sequence[str]]


# -- shared machinery --------------------------------------------------------------------------------------------------
class _ClipTask(PeftTask):
    """Class names, templates, tokenizer and the (rebuilt-on-change) ``ClipClassifier`` of the CLIP tasks.

    The classifier holds the model, so it is kept outside the module tree (it must not add the backbone to the
    task's ``state_dict``); it is rebuilt when the class list, the templates or the device change.
    """

    def _init_clip(self, classnames: Optional[Sequence[str]], templates: Templates, dataset: Optional[str],
                   num_classes: Optional[int], class_chunk: int) -> None:
        if classnames is not None:
            classnames = list(classnames)
            clean_classnames(classnames)
        if num_classes is not None and (not isinstance(num_classes, int) or isinstance(num_classes, bool)
                                        or num_classes < 1):
            raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
        if not isinstance(class_chunk, int) or isinstance(class_chunk, bool) or class_chunk < 1:
            raise ValueError(f"class_chunk must be a positive int, got {class_chunk!r}")
        if not self.backbone_id.startswith("open_clip:"):
            raise ValueError(f"{type(self).__name__} needs an open_clip backbone ('open_clip:ViT-B-16/openai'), "
                             f"got {self.backbone_id!r}")
        resolve_templates(templates, dataset)  # fail at construction, not in the middle of a run
        self.classnames_arg = classnames
        self.templates = templates if isinstance(templates, str) else list(templates)
        self.template_dataset = dataset
        self.num_classes = num_classes
        self.class_chunk = class_chunk
        self._classnames: Optional[list[str]] = clean_classnames(classnames) if classnames is not None else None
        self._dataset_name: Optional[str] = dataset
        self.__dict__["_clf"] = None  # outside the module tree (see the class docstring)
        self._clf_key: Optional[tuple] = None
        self._tokenizer = None

    # -- class list ------------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Take the class names (and dataset name, for its template) from the data module unless given."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self.classnames_arg is None:
            names = getattr(dm, "classnames", None)
            if names is None:
                raise ValueError(f"{type(self).__name__} needs class names: pass classnames=[...] or use a data module "
                                 "with a `classnames` attribute (FewShotDataModule)")
            self._classnames = clean_classnames(list(names))
        if self.template_dataset is None:
            name = getattr(dm, "dataset", None)
            self._dataset_name = name if isinstance(name, str) else None
        self._check_num_classes()

    def _check_num_classes(self) -> None:
        """Hook: checks of ``num_classes`` against the class list (default: none)."""

    @property
    def classnames(self) -> list[str]:
        """The current class names (as written into prompts)."""
        if self._classnames is None:
            raise RuntimeError(f"{type(self).__name__} has no class names yet: pass classnames=[...] or run it "
                               "through a Trainer with a data module that has them")
        return list(self._classnames)

    def prompt_templates(self) -> list:
        """The resolved templates (for classes without a prompt learner)."""
        return resolve_templates(self.templates, self._dataset_name)

    @property
    def tokenizer(self):
        """open_clip's tokenizer for the backbone."""
        if self._tokenizer is None:
            self._tokenizer = tokenizer_for(self.backbone_id, self._require_model())
        return self._tokenizer

    def calibration_loss(self, backbone: nn.Module, inputs: Any, targets: Any) -> torch.Tensor:
        """The task's loss for the placement pass of data-dependent methods (mask tuning, SPT): cross-entropy of the
        plain CLIP's zero-shot logits over the current classes and templates (the backbone has no adapters yet, so
        the templates stand in for any prompt learner)."""
        templates = self.prompt_templates()
        clf = ClipClassifier(backbone, tokenizer_for(self.backbone_id, backbone), self.classnames, templates,
                             max(1, self.class_chunk // len(templates)))
        return F.cross_entropy(clf(inputs), targets)

    # -- classifier ------------------------------------------------------------------------------------------------
    def _check_classifier_classes(self, names: list[str]) -> None:
        """Refuse class lists the adapters cannot serve: class-specific prompts of another number of classes."""
        ctx = getattr(find_prompt_learner(self._require_model()), "ctx", None)
        if isinstance(ctx, torch.Tensor) and ctx.dim() == 3 and ctx.shape[0] != len(names):
            raise ValueError(f"class-specific prompts were trained for {ctx.shape[0]} classes and cannot classify "
                             f"{len(names)} others (base-to-new needs a prompt shared by all classes: csc=False)")

    def classifier(self) -> ClipClassifier:
        """The ``ClipClassifier`` for the current classes (rebuilt when they, the templates or the device change)."""
        model = self._require_model()
        names = self.classnames
        templates = self.prompt_templates()
        device = next(model.parameters()).device
        key = (tuple(names), tuple(map(id, templates)) if any(callable(t) for t in templates) else tuple(templates),
               device)
        if self._clf is None or self._clf_key != key:
            self._check_classifier_classes(names)
            # class_chunk bounds text rows per forward: with a template ensemble each class has len(templates) rows.
            chunk = self.class_chunk if find_prompt_learner(model) else max(1, self.class_chunk // len(templates))
            self.__dict__["_clf"] = ClipClassifier(model, self.tokenizer, names, templates, chunk)
            self._clf_key = key
        clf = self._clf
        clf.train(self.training)
        return clf

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, C)`` over the current classes."""
        return self.classifier()(images)

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        """Class probabilities."""
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x).softmax(dim=-1)


# -- zero-shot evaluation ----------------------------------------------------------------------------------------------
class ZeroShotEvaluator(_ClipTask):
    """Zero-shot CLIP classification of a data module's classes (no training).

    The text side is the template ensemble of ``templates`` (see :func:`resolve_templates`), or, when ``adapter``
    holds a text-prompt method (CoOp, MaPLe, ...), its learned prompts. Any saved adapter (LoRA on either tower,
    prompts, ...) can be evaluated this way on any class list its methods support.

    Logs, for ``validate`` and ``test``: ``<stage>/top1`` and ``<stage>/acc`` (the same number: micro accuracy),
    ``<stage>/top5`` (when there are at least 5 classes), ``<stage>/mean_per_class_acc`` (macro accuracy) and
    ``<stage>/loss`` (cross-entropy of the logits).

    Args:
        backbone: open_clip backbone id (``"open_clip:ViT-B-16/openai"``).
        classnames: Class names in label order; default: the data module's ``classnames``.
        templates: ``"dataset"`` (CoOp's hand-crafted template of the data module's dataset, else
            ``"a photo of a {}."``), ``"imagenet80"`` (CLIP's 80 ImageNet templates), ``"imagenet7"``, or explicit
            format strings.
        template_dataset: Dataset name whose template ``templates="dataset"`` uses; default: the data module's
            ``dataset``.
        source_dataset: The dataset the evaluated adapter was trained on, when testing it on another one
            (cross-dataset transfer, ImageNet -> V2/Sketch/A/R). Only recorded (hyper-parameters, result card),
            where ``vpeft aggregate --table cross_dataset`` reads it.
        num_classes: Number of classes (the CLI links it from the data module); checked against the class names.
        pretrained: See :class:`~vpeft.modules.base.PeftTask`.
        backbone_kwargs: See :class:`~vpeft.modules.base.PeftTask`.
        adapter: A saved adapter directory to evaluate (``None``: the plain model).
        init_seed: See :class:`~vpeft.modules.base.PeftTask` (random backbones only).
        class_chunk: Text rows per text-encoder forward (classes times templates).
    """

    #: Training-free: the CLI marks its result cards' model config ``zero_shot: true`` (read by
    #: ``vpeft.protocols.aggregate``, which labels such runs ``zero_shot``).
    zero_shot = True

    def __init__(
            self,
            backbone: str,
            classnames: Optional[list[str]] = None,
            templates: Union[str, list[str]] = "dataset",
            template_dataset: Optional[str] = None,
            source_dataset: Optional[str] = None,
            num_classes: Optional[int] = None,
            pretrained: Union[bool, str] = False,
            backbone_kwargs: Optional[dict[str, Any]] = None,
            adapter: Optional[str] = None,
            init_seed: Optional[int] = None,
            class_chunk: int = 100,
    ) -> None:
        super().__init__(backbone, methods=[], trainable_extra=(), pretrained=pretrained,
                         backbone_kwargs=backbone_kwargs, adapter=adapter, init_seed=init_seed)
        self._init_clip(classnames, templates, template_dataset, num_classes, class_chunk)
        self.source_dataset = source_dataset
        self.metrics: Optional[nn.ModuleDict] = None

    def _check_num_classes(self) -> None:
        if self.num_classes is not None and self.num_classes != len(self.classnames):
            raise ValueError(f"num_classes={self.num_classes} but there are {len(self.classnames)} class names")

    def setup(self, stage: str) -> None:  # noqa: D102
        super().setup(stage)
        n = len(self.classnames)
        metrics = {}
        for s in ("val", "test"):
            m = {"top1": MulticlassAccuracy(n, average="micro"), "acc": MulticlassAccuracy(n, average="micro"),
                 "mean_per_class_acc": MulticlassAccuracy(n, average="macro")}
            if n >= 5:
                m["top5"] = MulticlassAccuracy(n, top_k=5, average="micro")
            metrics[s] = nn.ModuleDict(m)
        self.metrics = nn.ModuleDict(metrics)

    def _eval_step(self, batch, stage: str) -> None:
        if self.metrics is None:
            raise RuntimeError("ZeroShotEvaluator.setup() has not run (use it through a Trainer)")
        x, y = batch
        logits = self(x)
        n = len(y)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), on_epoch=True, sync_dist=True, batch_size=n)
        for name, metric in self.metrics[stage].items():
            metric(logits, y)
            self.log(f"{stage}/{name}", metric, on_epoch=True, prog_bar=name == "acc", batch_size=n)

    def validation_step(self, batch, batch_idx: int) -> None:  # noqa: D102
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:  # noqa: D102
        self._eval_step(batch, "test")

    def training_step(self, batch, batch_idx: int):
        """Refused: zero-shot evaluation has nothing to train.

        Raises:
            RuntimeError: always.
        """
        raise RuntimeError("ZeroShotEvaluator only evaluates (vpeft validate/test); to train CLIP prompts or "
                           "adapters use vpeft.modules.clip_tasks.ClipPromptTask")

    def configure_optimizers(self):
        """Refused (see :meth:`training_step`)."""
        raise RuntimeError("ZeroShotEvaluator has nothing to train; use vpeft.modules.clip_tasks.ClipPromptTask")


# -- few-shot prompt learning / CLIP fine-tuning -----------------------------------------------------------------------
class ClipPromptTask(_ClipTask):
    """Few-shot training of CLIP with any PEFT methods, classifying through :class:`~vpeft.clip.ClipClassifier`.

    Text prompts (CoOp, CoCoOp, IVLP, MaPLe, PromptSRC), LoRA-family adapters on both towers
    (``LoraConfig(towers=["visual", "text"], targets=["q", "k", "v"])``, CLIP-LoRA), or anything else that attaches
    to an open_clip model: logits are ``logit_scale * norm(image) @ norm(class text).T``, the loss cross-entropy.
    Methods without a prompt learner read the class texts from ``templates``.

    Logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc`` (which drives checkpoint selection), ``test/loss``
    and ``test/acc`` (micro accuracy).

    Class lists: the classifier follows the data module, so a model trained with ``subsample="base"`` is tested on
    ``subsample="new"`` unchanged. Class-specific CoOp context (``CoOpConfig(csc=True)``) gets ``num_classes`` from
    the task (the CLI links it from the data module) and refuses any other class list than the one it was trained
    on (checked by count, and by name when the training classes are known: from this process's ``fit`` or a
    checkpoint).

    PromptSRC (a ``PromptSRCConfig`` among the methods): the training loss is
    :func:`~vpeft.methods.promptsrc.promptsrc_loss` against the frozen model (``PeftModel.disabled()``): frozen
    image features and logits per batch, frozen text features from CLIP's 80 ImageNet templates, computed once per
    class list. Its parts are logged as ``train/ce``, ``train/scl_text``, ``train/scl_image`` and
    ``train/scl_logits``. Gaussian prompt aggregation (GPA) over ``trainer.max_epochs`` epochs: the adapter state
    after each epoch's last optimizer step is added with its Gaussian weight; after the last epoch the aggregate is
    loaded into the model (``load_adapter_state_dict``), so the final validation, checkpoints and the exported
    adapter hold it. GPA is resume-safe: the running aggregate is stored in checkpoints (``checkpoint["vpeft_gpa"]``,
    plain tensors) and restored; a resumed run must keep ``max_epochs`` (and the GPA mean/std). Exactness needs
    epoch-boundary checkpoints (the default). A run that stops before its last epoch (``max_steps``, early stopping)
    gets the aggregate of the epochs it finished, renormalised, with a warning.

    Args:
        backbone: open_clip backbone id (``"open_clip:ViT-B-16/openai"``).
        methods: Method configs, applied in order.
        num_classes: Number of classes (linked by the CLI from ``data.num_classes``); only class-specific context
            uses it (default: the number of class names).
        classnames: Class names in label order; default: the data module's ``classnames``.
        templates: Texts of classes without a prompt learner: ``"dataset"`` (CoOp's hand-crafted template of the
            dataset), ``"imagenet80"``, ``"imagenet7"`` or explicit format strings (see :func:`resolve_templates`).
        template_dataset: Dataset name whose template ``templates="dataset"`` uses; default: the data module's
            ``dataset``.
        source_dataset: The dataset the evaluated adapter was trained on, when testing it on another one
            (cross-dataset transfer, ImageNet -> V2/Sketch/A/R). Only recorded (hyper-parameters, result card),
            where ``vpeft aggregate --table cross_dataset`` reads it.
        trainable_extra: Backbone sites or module paths that train with the adapters (e.g. ``"logit_scale"``).
        pretrained: See :class:`~vpeft.modules.base.PeftTask`.
        backbone_kwargs: See :class:`~vpeft.modules.base.PeftTask`.
        adapter: See :class:`~vpeft.modules.base.PeftTask`.
        optimizer: See :class:`~vpeft.modules.base.PeftTask`.
        lr_scheduler: See :class:`~vpeft.modules.base.PeftTask`.
        lr_scheduler_interval: See :class:`~vpeft.modules.base.PeftTask`.
        init_seed: See :class:`~vpeft.modules.base.PeftTask`.
        grad_checkpointing: See :class:`~vpeft.modules.base.PeftTask`.
        class_chunk: Text rows per text-encoder forward (classes, times templates for template ensembles); bounds
            activation memory with many classes.
        gradient_dropout: R-AMT's gradient-dropout regularity (Zheng et al., ICCV 2023, arXiv:2307.15049) with this
            ``lambda`` (the paper's 1.0), for mask tuning (``MaskTuningConfig`` among the methods): each step the
            score tensors' task gradient is dropped element-wise where it conflicts with the gradient of the
            general-knowledge loss (distillation from the zero-shot logits of the frozen model,
            :func:`~vpeft.methods.mask.general_knowledge_loss`), see :func:`~vpeft.methods.mask.drop_gradient`.
            ``None``: off. Needs ``accumulate_grad_batches=1`` (the two gradients are compared per batch).
    """

    def __init__(
            self,
            backbone: str,
            methods: Optional[list[vpeft.PeftConfig]] = None,
            num_classes: Optional[int] = None,
            classnames: Optional[list[str]] = None,
            templates: Union[str, list[str]] = "dataset",
            template_dataset: Optional[str] = None,
            source_dataset: Optional[str] = None,
            trainable_extra: Sequence[str] = (),
            pretrained: Union[bool, str] = False,
            backbone_kwargs: Optional[dict[str, Any]] = None,
            adapter: Optional[str] = None,
            optimizer: OptimizerCallable = torch.optim.AdamW,
            lr_scheduler: Optional[LRSchedulerCallable] = None,
            lr_scheduler_interval: str = "epoch",
            init_seed: Optional[int] = None,
            grad_checkpointing: bool = False,
            class_chunk: int = 100,
            gradient_dropout: Optional[float] = None,
    ) -> None:
        if gradient_dropout is not None:
            if isinstance(gradient_dropout, bool) or not isinstance(gradient_dropout, (int, float)) \
                    or not 0.0 <= gradient_dropout <= 1.0:
                raise ValueError(f"gradient_dropout must be None or a lambda in [0, 1], got {gradient_dropout!r}")
            configs = method_configs(methods)
            if (configs or adapter is None) and not any(isinstance(c, MaskTuningConfig) for c in configs):
                raise ValueError("gradient_dropout is R-AMT's regularity for mask tuning: it needs a MaskTuningConfig "
                                 "among the methods")
        super().__init__(backbone, methods, trainable_extra, pretrained, backbone_kwargs, adapter, optimizer,
                         lr_scheduler, lr_scheduler_interval, init_seed, grad_checkpointing)
        self.gradient_dropout = None if gradient_dropout is None else float(gradient_dropout)
        #: The general-knowledge gradients of the current batch's score tensors (gradient dropout).
        self._general_grads: Optional[list[tuple[torch.Tensor, Optional[torch.Tensor]]]] = None
        self._init_clip(classnames, templates, template_dataset, num_classes, class_chunk)
        self.source_dataset = source_dataset
        self.metrics: Optional[nn.ModuleDict] = None
        self._trained_classnames: Optional[list[str]] = None
        self._frozen_text: Optional[tuple[tuple, torch.Tensor]] = None
        self._gpa: Optional[GaussianPromptAggregator] = None
        self._gpa_epochs: list[int] = []
        self._gpa_applied = False
        self._gpa_restore: Optional[dict[str, Any]] = None

    # -- configuration ---------------------------------------------------------------------------------------------
    @property
    def promptsrc_config(self) -> Optional[PromptSRCConfig]:
        """The PromptSRC config among the methods, if any (its loss weights and GPA settings apply)."""
        model = self.model
        configs = model.configs if model is not None else self.methods
        found = [c for c in configs if isinstance(c, PromptSRCConfig)]
        return found[0] if found else None

    def configure_model(self) -> None:
        """Build the model; class-specific CoOp context gets ``num_classes`` from the task."""
        if self.model is None and self.adapter is None:
            self.methods = [self._with_num_classes(c) for c in self.methods]
        super().configure_model()

    def _with_num_classes(self, cfg: vpeft.PeftConfig) -> vpeft.PeftConfig:
        if not getattr(cfg, "csc", False) or not hasattr(cfg, "num_classes"):
            return cfg
        n = self.num_classes if self.num_classes is not None else (
            len(self._classnames) if self._classnames is not None else None)
        if n is None:
            raise ValueError("class-specific context (csc=True) needs the number of classes: pass num_classes (the "
                             "CLI links it from the data module) or classnames, or set num_classes in the config")
        if cfg.num_classes is None:
            return dataclasses.replace(cfg, num_classes=n)
        if cfg.num_classes != n:
            raise ValueError(f"{type(cfg).__name__}.num_classes={cfg.num_classes} but the task has {n} classes")
        return cfg

    def setup(self, stage: str) -> None:  # noqa: D102
        super().setup(stage)
        n = len(self.classnames)
        # Micro accuracy per stage, sized to the current class list (it changes between base and new classes).
        self.metrics = nn.ModuleDict({f"{s}_acc": MulticlassAccuracy(n, average="micro")
                                      for s in ("train", "val", "test")})

    def _check_classifier_classes(self, names: list[str]) -> None:  # noqa: D102
        super()._check_classifier_classes(names)
        ctx = getattr(find_prompt_learner(self._require_model()), "ctx", None)
        if not (isinstance(ctx, torch.Tensor) and ctx.dim() == 3):
            return
        if self._trained_classnames is not None and list(self._trained_classnames) != list(names):
            raise ValueError("class-specific prompts were trained on other classes than these "
                             f"({self._trained_classnames[:3]}... vs {names[:3]}...); base-to-new needs csc=False")

    # -- steps -----------------------------------------------------------------------------------------------------
    def _metric(self, stage: str) -> MulticlassAccuracy:
        if self.metrics is None:
            raise RuntimeError("ClipPromptTask.setup() has not run (use it through a Trainer)")
        return self.metrics[f"{stage}_acc"]

    def _log_step(self, stage: str, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        metric = self._metric(stage)
        metric(logits.detach(), y)
        self.log(f"{stage}/loss", loss, on_step=stage == "train", on_epoch=True, prog_bar=True, sync_dist=True,
                 batch_size=len(y))
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:  # noqa: D102
        x, y = batch
        clf = self.classifier()
        cfg = self.promptsrc_config
        if cfg is None:
            logits = clf(x)
            loss = F.cross_entropy(logits, y)
        else:
            logits, image, text = clf(x, return_features=True)
            frozen_text = self.frozen_text_features()
            model = self._require_model()
            with torch.no_grad(), model.disabled():
                frozen_image = F.normalize(model.encode_image(x), dim=-1)
                frozen_logits = clf.logit_scale() * frozen_image @ frozen_text.T
                bias = getattr(model, "logit_bias", None)
                if bias is not None:
                    frozen_logits = frozen_logits + bias
            parts = promptsrc_loss(logits, y, text, image, frozen_text.to(text.dtype), frozen_image.to(image.dtype),
                                   frozen_logits.to(logits.dtype), cfg)
            loss = parts["loss"]
            for name in ("ce", "scl_text", "scl_image", "scl_logits"):
                self.log(f"train/{name}", parts[name].detach(), on_step=False, on_epoch=True, sync_dist=True,
                         batch_size=len(y))
        if self.gradient_dropout is not None:
            self._general_grads = self._general_knowledge_grads(x, logits)
        self._log_step("train", loss, logits, y)
        return loss

    def _general_knowledge_grads(self, x: torch.Tensor, logits: torch.Tensor) -> list:
        """R-AMT: the gradients of the general-knowledge loss (the zero-shot model as teacher) with respect to the
        score tensors, kept until :meth:`on_before_optimizer_step` drops the conflicting task gradient."""
        model = self._require_model()
        scores = [p for p in score_tensors(model) if p.requires_grad]
        if not scores:
            return []
        with torch.no_grad(), model.disabled():
            zero_shot = self.classifier()(x)
        general = general_knowledge_loss(logits, zero_shot)
        self.log("train/general_loss", general.detach(), on_step=False, on_epoch=True, sync_dist=True,
                 batch_size=len(x))
        grads = torch.autograd.grad(general, scores, retain_graph=True, allow_unused=True)
        return list(zip(scores, grads))

    def on_before_optimizer_step(self, optimizer) -> None:
        """R-AMT's gradient dropout on the score tensors (after AMP unscaling, before the step)."""
        if self._general_grads is None:
            return
        with torch.no_grad():
            for p, b in self._general_grads:
                if p.grad is not None and b is not None:
                    p.grad = drop_gradient(p.grad, b, self.gradient_dropout)
        self._general_grads = None

    def validation_step(self, batch, batch_idx: int) -> None:  # noqa: D102
        x, y = batch
        logits = self(x)
        self._log_step("val", F.cross_entropy(logits, y), logits, y)

    def test_step(self, batch, batch_idx: int) -> None:  # noqa: D102
        x, y = batch
        logits = self(x)
        self._log_step("test", F.cross_entropy(logits, y), logits, y)

    def frozen_text_features(self) -> torch.Tensor:
        """PromptSRC's frozen class features ``(C, D)`` ("textual diversity"): the frozen model's features of the
        first 60 of CLIP's 80 ImageNet templates (the reference's list), averaged *unnormalised* and then normalised,
        as the reference does (computed once per class list and device)."""
        from vpeft.clip import template_texts
        from vpeft.datasets.templates import OPENAI_IMAGENET_TEMPLATES

        model = self._require_model()
        device = next(model.parameters()).device
        key = (tuple(self.classnames), device)
        if self._frozen_text is None or self._frozen_text[0] != key:
            templates = list(OPENAI_IMAGENET_TEMPLATES)[:PROMPTSRC_NUM_TEMPLATES]
            step = max(1, self.class_chunk // 8)
            out = []
            with torch.no_grad(), model.disabled():
                for i in range(0, len(self.classnames), step):
                    names = self.classnames[i:i + step]
                    tokens = self.tokenizer(template_texts(names, templates)).to(device)
                    feats = model.encode_text(tokens).reshape(len(names), len(templates), -1).mean(dim=1)
                    out.append(F.normalize(feats, dim=-1))
            self._frozen_text = (key, torch.cat(out))
        return self._frozen_text[1]

    # -- fit lifecycle ---------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:  # noqa: D102
        self._trained_classnames = self.classnames
        if self.gradient_dropout is not None and self.trainer.accumulate_grad_batches != 1:
            raise ValueError(f"gradient_dropout compares the task and general-knowledge gradients of each batch; "
                             f"accumulate_grad_batches={self.trainer.accumulate_grad_batches} would mix batches "
                             "(use 1)")

    def on_train_start(self) -> None:
        """Set up GPA for PromptSRC over ``trainer.max_epochs`` (restoring a resumed run's aggregate)."""
        cfg = self.promptsrc_config
        self._gpa, self._gpa_epochs, self._gpa_applied = None, [], False
        restore, self._gpa_restore = self._gpa_restore, None
        if cfg is None:
            return
        epochs = self.trainer.max_epochs
        if epochs is None or epochs < 1:
            rank_zero_warn("PromptSRC: trainer.max_epochs is not set, so Gaussian prompt aggregation (GPA) is off")
            return
        self._gpa = GaussianPromptAggregator(epochs, cfg.gpa_mean, cfg.gpa_std)
        if restore is not None:
            saved = (restore["epochs"], restore["mean"], restore["std"])
            if saved != (epochs, float(cfg.gpa_mean), float(cfg.gpa_std)):
                raise ValueError(f"the checkpoint's GPA ran over (max_epochs, mean, std) = {saved}; this run has "
                                 f"{(epochs, float(cfg.gpa_mean), float(cfg.gpa_std))}. Resume with the same "
                                 "max_epochs and PromptSRC config")
            device = next(self._require_model().parameters()).device
            state = restore["state"]
            self._gpa.state = {k: v.to(device) for k, v in state.items()} if state is not None else None
            self._gpa_epochs = [int(e) for e in restore["epochs_done"]]
            self._gpa.epochs_seen = len(self._gpa_epochs)
            self._gpa_applied = bool(restore["applied"])

    def _gpa_add_epoch(self) -> None:
        """Add this epoch's adapter state (once per epoch); apply the aggregate after the last epoch."""
        gpa = self._gpa
        epoch = self.current_epoch + 1
        if gpa is None or self._gpa_applied or epoch in self._gpa_epochs or epoch > len(gpa.weights):
            return
        state = {k: v for k, v in self._require_model().adapter_state_dict().items() if v.is_floating_point()}
        gpa.update(state, epoch)
        self._gpa_epochs.append(epoch)
        if epoch == len(gpa.weights):
            self._gpa_apply()

    def _gpa_apply(self) -> None:
        gpa = self._gpa
        if gpa is None or gpa.state is None or self._gpa_applied:
            return
        total = sum(gpa.weights[e - 1] for e in self._gpa_epochs)
        if not gpa.complete:
            rank_zero_warn(f"PromptSRC GPA: training stopped after epochs {self._gpa_epochs} of {len(gpa.weights)}; "
                           f"the aggregate is their Gaussian-weighted mean (weight {total:.3g} renormalised to 1)")
        model = self._require_model()
        current = model.adapter_state_dict()
        merged = {k: (gpa.state[k] / total).to(v.dtype) if k in gpa.state else v for k, v in current.items()}
        model.load_adapter_state_dict(merged)
        self._gpa_applied = True
        rank_zero_info(f"PromptSRC: Gaussian prompt aggregation of epochs {self._gpa_epochs} loaded into the model")

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """After the epoch's last optimizer step: add the adapter state to GPA (before validation and checkpoints,
        which Lightning runs before ``on_train_epoch_end``)."""
        if self._gpa is not None and batch_idx + 1 >= self.trainer.num_training_batches:
            self._gpa_add_epoch()

    def on_train_epoch_end(self) -> None:
        """GPA fallback for loaders without a length (no-op when the last batch already added the epoch)."""
        self._gpa_add_epoch()

    def on_train_end(self) -> None:
        """A run that stopped before its last epoch: apply the aggregate of the epochs it finished."""
        if self._gpa is not None and not self._gpa_applied and self._gpa_epochs:
            self._gpa_apply()

    # -- checkpoints -----------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Also store the training class names and the running GPA aggregate (plain data and tensors)."""
        super().on_save_checkpoint(checkpoint)
        if self._trained_classnames is not None:
            checkpoint[CLASSES_KEY] = {"classnames": list(self._trained_classnames)}
        gpa, cfg = self._gpa, self.promptsrc_config
        if gpa is not None and cfg is not None:
            checkpoint[GPA_KEY] = {
                "epochs": len(gpa.weights), "mean": float(cfg.gpa_mean), "std": float(cfg.gpa_std),
                "epochs_done": list(self._gpa_epochs), "applied": self._gpa_applied,
                "state": {k: v.detach().cpu().clone() for k, v in gpa.state.items()} if gpa.state is not None else None,
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:  # noqa: D102
        super().on_load_checkpoint(checkpoint)
        classes = checkpoint.get(CLASSES_KEY)
        if classes is not None:
            self._trained_classnames = list(classes["classnames"])
        self._gpa_restore = checkpoint.get(GPA_KEY)


__all__ = ["ClipPromptTask", "ZeroShotEvaluator"]
