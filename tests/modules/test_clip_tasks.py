"""CLIP tasks on a tiny CLIP with CLIP's BPE vocabulary and a fake CoOp dataset whose classes are learnable colours:
zero-shot metrics against a hand computation, CoOp beating zero-shot and base-to-new with its HM, PromptSRC's loss
parts and Gaussian prompt aggregation (also across a resume), the method presets, and the real CLI end to end."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path

import pytest

pytest.importorskip("lightning")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from _clip_helpers import CLASSES, make_clip_coop_root, register_tiny_bpe_clip, tokenizer  # noqa: E402
from _train_helpers import CONFIGS, card  # noqa: E402
from lightning.pytorch import Callback, Trainer  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

import vpeft  # noqa: E402
from vpeft.datasets.datamodule import FewShotDataModule  # noqa: E402
from vpeft.datasets.templates import resolve_templates  # noqa: E402
from vpeft.methods.promptsrc import gaussian_weights  # noqa: E402
from vpeft.modules.clip_tasks import ClipPromptTask, ZeroShotEvaluator  # noqa: E402
from vpeft.modules.schedulers import ConstantWarmupCosineLR  # noqa: E402

BACKBONE = register_tiny_bpe_clip()
QUIET = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)


@pytest.fixture(scope="module")
def clip_root(tmp_path_factory) -> str:
    return make_clip_coop_root(tmp_path_factory.mktemp("clip_coop"))


@pytest.fixture(scope="module")
def dtd_root(tmp_path_factory) -> str:
    from fake_coop import make_fake_coop

    root = tmp_path_factory.mktemp("clip_dtd")
    make_fake_coop(root, "dtd", classes=("banded", "bubbly", "cracked", "dotted", "striped", "woven_thing"),
                   per_class=(4, 2, 5), size=32)
    return str(root)


def datamodule(root: str, out, dataset: str = "caltech101", **kw) -> FewShotDataModule:
    """The data module of these tests; its manifests go to ``out`` (not the working directory)."""
    args = dict(shots=8, batch_size=8, backbone=BACKBONE, augment=False, manifest_dir=str(out))
    args.update(kw)
    return FewShotDataModule(dataset, root, **args)


def sgd(lr: float = 0.01):
    return functools.partial(torch.optim.SGD, lr=lr, momentum=0.9)


# -- plain pieces ------------------------------------------------------------------------------------------------------
def test_resolve_templates():
    from vpeft.datasets.templates import OPENAI_IMAGENET_TEMPLATES

    assert resolve_templates("dataset", "dtd") == ["{} texture."]
    assert resolve_templates("dataset", "imagefolder") == resolve_templates("dataset") == ["a photo of a {}."]
    assert len(resolve_templates("imagenet80")) == len(OPENAI_IMAGENET_TEMPLATES) == 80
    assert resolve_templates("itap of a {}.") == ["itap of a {}."]
    assert resolve_templates(["a {}.", "the {}."]) == ["a {}.", "the {}."]
    with pytest.raises(ValueError, match="templates must be one of"):
        resolve_templates("imagenet81")
    with pytest.raises(ValueError, match="placeholder"):
        resolve_templates(["a photo"])
    with pytest.raises(ValueError, match="open_clip backbone"):
        ZeroShotEvaluator("timm:vit_tiny_patch16_224")


def test_constant_warmup_cosine_matches_dassl():
    import math

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.002)
    sched = ConstantWarmupCosineLR(opt, T_max=5, warmup_epochs=1, warmup_lr=1e-5)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # Dassl: epoch 0 at the warm-up rate, then CosineAnnealingLR(T_max) counted from epoch 1.
    expected = [1e-5] + [0.002 * (1 + math.cos(math.pi * k / 5)) / 2 for k in range(5)]
    assert lrs == pytest.approx(expected, rel=1e-12)


# -- zero-shot ---------------------------------------------------------------------------------------------------------
def test_zero_shot_metrics_match_hand_computation(dtd_root, tmp_path):
    task = ZeroShotEvaluator(BACKBONE, init_seed=3)  # templates="dataset": DTD's "{} texture."
    dm = datamodule(dtd_root, tmp_path, "dtd", shots=0)
    got = Trainer(**QUIET).test(task, datamodule=dm, verbose=False)[0]

    torch.manual_seed(3)  # the task builds its random backbone under init_seed
    model = vpeft.create_backbone(BACKBONE).eval()
    names = [c.replace("_", " ") for c in dm.classnames]
    assert names[-1] == "woven thing"
    w = vpeft.build_zero_shot_classifier(model, tokenizer(), names, ["{} texture."])
    logits, labels = [], []
    with torch.no_grad():
        for x, y in dm.test_dataloader():
            logits.append(model.logit_scale.exp() * F.normalize(model.encode_image(x), dim=-1) @ w)
            labels.append(y)
    logits, labels = torch.cat(logits), torch.cat(labels)
    top1 = (logits.argmax(-1) == labels).float()
    top5 = (logits.topk(5, dim=-1).indices == labels[:, None]).any(-1).float()
    per_class = [top1[labels == c].mean().item() for c in range(len(names))]
    assert len(labels) == 6 * 5
    assert got["test/top1"] == got["test/acc"] == pytest.approx(top1.mean().item(), abs=1e-6)
    assert got["test/top5"] == pytest.approx(top5.mean().item(), abs=1e-6)
    assert got["test/mean_per_class_acc"] == pytest.approx(sum(per_class) / len(per_class), abs=1e-6)
    assert got["test/loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    with pytest.raises(RuntimeError, match="ClipPromptTask"):
        task.training_step((torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long)), 0)


# -- CoOp: learning, base-to-new ---------------------------------------------------------------------------------------
class FitVal(Callback):
    """Records ``val/acc`` after each validation of a fit."""

    def __init__(self) -> None:
        self.val_acc: list[float] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.val_acc.append(float(trainer.callback_metrics["val/acc"]))


def test_coop_beats_zero_shot_and_base_to_new_reports_hm(clip_root, tmp_path):
    from vpeft.protocols.base_to_new import RESULT_NAME, base_to_new

    rec = FitVal()
    result = base_to_new(
        task_kwargs=dict(backbone=BACKBONE, methods=[vpeft.CoOpConfig(n_ctx=4)], init_seed=0, optimizer=sgd()),
        data_kwargs=dict(dataset="caltech101", root=clip_root, shots=8, batch_size=8, augment=False,
                         manifest_dir=str(tmp_path / "manifests")),
        trainer_kwargs=dict(**{**QUIET, "logger": None}, max_epochs=5, enable_checkpointing=False, callbacks=[rec],
                            default_root_dir=str(tmp_path)),
    )
    b, n = result["base"], result["new"]
    assert result["hm"] == pytest.approx(2 * b * n / (b + n) if b + n else 0.0, abs=1e-12)
    assert 0.0 <= n <= 1.0 and 0.0 < b <= 1.0
    (path,) = tmp_path.rglob(RESULT_NAME)  # in the logger's folder
    saved = json.loads(path.read_text())
    assert (saved["base"], saved["new"], saved["hm"]) == (b, n, result["hm"])

    # The same random weights zero-shot, on the same (base-class) validation images.
    zs = Trainer(**QUIET).validate(ZeroShotEvaluator(BACKBONE, init_seed=0),
                                   datamodule=datamodule(clip_root, tmp_path, subsample="base"), verbose=False)[0]
    assert len(rec.val_acc) == 5
    assert rec.val_acc[-1] > zs["val/acc"], (rec.val_acc, zs)


def test_class_specific_context_gets_num_classes_and_refuses_other_classes(clip_root, tmp_path):
    task = ClipPromptTask(BACKBONE, methods=[vpeft.CoOpConfig(n_ctx=2, csc=True)], init_seed=0, optimizer=sgd())
    trainer = Trainer(**QUIET, max_epochs=1, enable_checkpointing=False)
    trainer.fit(task, datamodule=datamodule(clip_root, tmp_path, subsample="base"))
    assert task.model.configs[0].num_classes == 3
    assert task.model.adapter_state_dict()["_shared.coop.ctx"].shape[0] == 3
    # Only adapters are task state: the classifier (which holds the model) is outside the module tree.
    assert set(task.state_dict()) == {f"model.{k}" for k in task.model.adapter_state_dict()}
    with pytest.raises(ValueError, match="class-specific prompts were trained on other classes"):
        trainer.test(task, datamodule=datamodule(clip_root, tmp_path, subsample="new"), verbose=False)
    with pytest.raises(ValueError, match="cannot classify"):
        trainer.test(task, datamodule=datamodule(clip_root, tmp_path, subsample="all"), verbose=False)


# -- PromptSRC ---------------------------------------------------------------------------------------------------------
class EpochStates(Callback):
    """The adapter state after each epoch's last optimizer step (callbacks run before the task's own hook)."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx + 1 == trainer.num_training_batches:
            self.states.append({k: v.clone() for k, v in pl_module.model.adapter_state_dict().items()})


def promptsrc_task() -> ClipPromptTask:
    cfg = vpeft.PromptSRCConfig(n_ctx=2, n_ctx_vision=2, text_depth=2, vision_depth=2, gpa_mean=2.0, gpa_std=1.0)
    return ClipPromptTask(BACKBONE, methods=[cfg], init_seed=0, optimizer=sgd(0.05))


def test_promptsrc_logs_loss_parts_and_applies_gpa(clip_root, tmp_path):
    rec = EpochStates()
    ckpts = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), filename="{epoch}", save_top_k=-1, monitor=None)
    task = promptsrc_task()
    base = functools.partial(datamodule, clip_root, tmp_path, subsample="base", batch_size=6)
    trainer = Trainer(**QUIET, max_epochs=3, callbacks=[rec, ckpts])
    trainer.fit(task, datamodule=base())

    m = trainer.callback_metrics
    parts = [float(m[f"train/{k}"]) for k in ("ce", "scl_text", "scl_image", "scl_logits")]
    assert all(p >= 0 for p in parts) and parts[1] > 0 and parts[2] > 0
    assert float(m["train/loss_epoch"]) == pytest.approx(sum(parts), rel=1e-5)
    frozen = task.frozen_text_features()
    assert frozen is task.frozen_text_features() and frozen.shape == (3, 32)  # cached per class list

    # GPA: the final adapter is the Gaussian-weighted mean of the per-epoch states.
    weights = gaussian_weights(3, 2.0, 1.0)
    assert len(rec.states) == 3
    final = task.model.adapter_state_dict()
    for k, v in final.items():
        expected = sum(w * s[k].float() for w, s in zip(weights, rec.states))
        assert torch.allclose(v, expected.to(v.dtype), atol=1e-6), k
    assert not torch.equal(final["_shared.promptsrc.ctx"], rec.states[-1]["_shared.promptsrc.ctx"])

    # Resume-safe: the epoch-0 checkpoint (plain data) holds the epoch-1 aggregate; resuming from it ends identical.
    first = tmp_path / "ckpt" / "epoch=0.ckpt"
    gpa = torch.load(first, weights_only=True)["vpeft_gpa"]
    assert gpa["epochs_done"] == [1] and gpa["epochs"] == 3 and not gpa["applied"]
    resumed = promptsrc_task()
    Trainer(**QUIET, max_epochs=3, enable_checkpointing=False).fit(
        resumed, datamodule=base(), ckpt_path=str(first))
    for k, v in resumed.model.adapter_state_dict().items():
        assert torch.allclose(v, final[k], atol=1e-6, rtol=0), k
    with pytest.raises(ValueError, match="same max_epochs"):
        Trainer(**QUIET, max_epochs=4, enable_checkpointing=False).fit(
            promptsrc_task(), datamodule=base(), ckpt_path=str(first))


# -- presets -----------------------------------------------------------------------------------------------------------
CLIP_PRESETS = sorted((CONFIGS / "method" / "clip").glob("*.yaml"))
SHALLOW = dict(text_depth=2, vision_depth=2, depth=2)  # the tiny towers have 2 blocks


@pytest.mark.parametrize("path", CLIP_PRESETS, ids=[p.name for p in CLIP_PRESETS])
def test_clip_preset_through_the_cli_parser(path: Path, clip_root, tmp_path):
    from vpeft.modules.base import PeftTask
    from vpeft.modules.lightning_cli import VpeftCLI

    argv = ["-c", str(CONFIGS / "trainer/cpu.yaml"), "-c", str(CONFIGS / "data/caltech101.yaml"), "-c", str(path),
            "-c", str(CONFIGS / "experiment/clip_prompt_vit_b16.yaml"), "--model.backbone", BACKBONE,
            "--model.pretrained=false", "--data.root", clip_root, "--data.shots", "2", "--trainer.logger=false",
            "--trainer.default_root_dir", str(tmp_path)]
    cli = VpeftCLI(PeftTask, FewShotDataModule, subclass_mode_model=True, run=False, auto_configure_optimizers=False,
                   args=argv)
    task = cli.model
    expected = yaml.safe_load(path.read_text())["model"]["class_path"].rsplit(".", 1)[-1]
    assert type(task).__name__ == expected and task.num_classes == len(CLASSES)
    assert task.trainable_extra == []  # not the default task's ["head"] (jsonargparse carries init_args over)
    task.methods = [dataclasses.replace(c, **{k: v for k, v in SHALLOW.items() if hasattr(c, k)})
                    for c in task.methods]
    task._classnames = list(CLASSES)  # what setup() takes from the data module
    # Data-dependent presets (R-AMT's mask tuning) calibrate on the data module's training batches, given directly.
    cli.datamodule.setup("fit")
    task.calibration_dataloader = cli.datamodule.train_dataloader()
    task.configure_model()
    assert task(torch.randn(2, 3, 32, 32)).shape == (2, len(CLASSES))
    if task.methods:
        assert 0 < task.num_parameters(trainable_only=True) < task.num_parameters() / 10


# -- the real CLI ------------------------------------------------------------------------------------------------------
TINY_RECIPE = f"""
trainer:
  max_epochs: 2
data:
  batch_size: 8
  num_workers: 0
  augment: false
model:
  backbone: {BACKBONE}
  methods:
    - class_path: vpeft.CoOpConfig
      init_args: {{n_ctx: 4}}
  optimizer:
    class_path: torch.optim.SGD
    init_args: {{lr: 0.01, momentum: 0.9}}
  lr_scheduler:
    class_path: vpeft.modules.schedulers.ConstantWarmupCosineLR
    init_args: {{T_max: 2}}
"""


def test_cli_trains_on_base_and_tests_on_new_classes(clip_root, tmp_path):
    from vpeft.cli import main
    from vpeft.protocols.aggregate import collect_cards

    recipe = tmp_path / "tiny_clip.yaml"
    recipe.write_text(TINY_RECIPE)
    base = ["-c", str(CONFIGS / "trainer/cpu.yaml"), "-c", str(CONFIGS / "data/caltech101.yaml"),
            "--data.root", clip_root, "--data.shots", "4", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false"]
    out = tmp_path / "run"
    assert main(["fit", *base, "-c", str(CONFIGS / "method/clip/coop.yaml"), "-c", str(recipe),
                 "--data.subsample", "base", "--trainer.default_root_dir", str(out)]) == 0
    fit = card(out, "fit")
    assert fit["config"]["model"]["class_path"].endswith("ClipPromptTask") and "val/acc" in fit["metrics"]
    assert fit["params"]["trainable"] == 4 * 64 and os.path.isdir(fit["adapter_dir"])
    last = Path(fit["checkpoints"]["dir"]) / "last.ckpt"

    # `vpeft test` needs no model config: the checkpoint's hyper-parameters name the task and its methods.
    accs = {}
    for half in ("base", "new"):
        assert main(["test", *base, "--data.subsample", half, "--ckpt_path", str(last),
                     "--trainer.default_root_dir", str(out / half)]) == 0
        c = card(out / half, "test")
        assert c["config"]["data"]["subsample"] == half and c["methods"][0]["method"] == "coop"
        accs[half] = c["metrics"]["test/acc"]
    records = {r["subsample"]: r for r in collect_cards([out / "base", out / "new"])}
    assert {k: r["metrics"]["test/acc"] for k, r in records.items()} == accs
    key = ("dataset", "method", "shots", "seed", "backbone")
    assert [records["base"][k] for k in key] == [records["new"][k] for k in key] == ["caltech101", "coop", 4, 1,
                                                                                     BACKBONE]

    # The zero-shot preset through the same CLI: training-free, all classes, full splits.
    assert main(["test", *base, "-c", str(CONFIGS / "method/clip/zero_shot.yaml"), "--model.backbone", BACKBONE,
                 "--trainer.default_root_dir", str(tmp_path / "zs")]) == 0
    zs = card(tmp_path / "zs", "test")
    assert zs["config"]["model"]["class_path"].endswith("ZeroShotEvaluator") and zs["config"]["data"]["shots"] == 0
    assert {"test/top1", "test/top5", "test/mean_per_class_acc", "test/acc"} <= set(zs["metrics"])
    (record,) = collect_cards(tmp_path / "zs")
    assert (record["method"], record["shots"], record["subsample"]) == ("zero_shot", 0, "all")


@pytest.mark.parametrize("cfg", [vpeft.MaskTuningConfig(towers=["visual"]),
                                 vpeft.SPTConfig(budget=400, towers=["visual"])], ids=["mask", "spt"])
def test_data_dependent_methods_calibrate_with_the_clip_loss(cfg, clip_root, tmp_path):
    """Mask tuning and SPT on CLIP choose their placement inside ``fit`` from the task's own loss (zero-shot logits
    over the class texts), train, and record the resolved selection in the hyper-parameters."""
    task = ClipPromptTask(BACKBONE, methods=[cfg], templates=["a photo of a {}."], init_seed=0, optimizer=sgd())
    trainer = Trainer(**QUIET, max_epochs=1, default_root_dir=str(tmp_path), enable_checkpointing=False)
    trainer.fit(task, datamodule=datamodule(clip_root, tmp_path))
    (resolved,) = task.model.configs
    assert resolved.selection is not None and task.hparams["methods"][0]["init_args"]["selection"] is not None
    names = list(task.model.adapter_state_dict())
    assert names and all(n.startswith("visual.") for n in names), names
    if isinstance(cfg, vpeft.SPTConfig):
        assert sum(p.numel() for p in task.model.parameters() if p.requires_grad) == 400


class _GradientProbe(Callback):
    """Records, for R-AMT's gradient dropout, each step's task gradient of the score tensors (callbacks' hook runs
    before the module's), the general-knowledge gradient, the RNG state, and the gradient the optimizer used."""

    def __init__(self) -> None:
        self.steps = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        pairs = pl_module._general_grads
        self.steps.append({"task": [p.grad.clone() for p, _ in pairs], "general": [b.clone() for _, b in pairs],
                           "rng": torch.get_rng_state(), "params": [p for p, _ in pairs]})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps[-1]["used"] = [p.grad.clone() for p in self.steps[-1]["params"]]


def test_r_amt_gradient_dropout_drops_conflicting_task_gradients(clip_root, tmp_path):
    """With ``gradient_dropout`` the score tensors' gradient is R-AMT's: ``drop_gradient(task, general, lambda)``
    recomputed here from the recorded task and general-knowledge gradients under the same RNG state; lambda = 0 keeps
    the task gradient; configurations without mask tuning are refused."""
    from vpeft.methods.mask import drop_gradient

    for lam in (1.0, 0.0):
        probe = _GradientProbe()
        task = ClipPromptTask(BACKBONE, methods=[vpeft.MaskTuningConfig(towers=["visual"])],
                              templates=["a photo of a {}."], init_seed=0, optimizer=sgd(), gradient_dropout=lam)
        trainer = Trainer(**QUIET, max_steps=2, default_root_dir=str(tmp_path), enable_checkpointing=False,
                          callbacks=[probe])
        trainer.fit(task, datamodule=datamodule(clip_root, tmp_path))
        assert len(probe.steps) == 2
        for step in probe.steps:
            torch.set_rng_state(step["rng"])
            want = [drop_gradient(a, b, lam) for a, b in zip(step["task"], step["general"])]
            for got, exp, a in zip(step["used"], want, step["task"]):
                torch.testing.assert_close(got, exp, rtol=0, atol=0)
                if lam == 0.0:
                    torch.testing.assert_close(got, a, rtol=0, atol=0)
        if lam == 1.0:  # some, not all, task gradient entries conflict with the general-knowledge gradient
            dropped = sum(int(((u == 0) & (a != 0)).sum()) for s in probe.steps for u, a in zip(s["used"], s["task"]))
            total = sum(int((a != 0).sum()) for s in probe.steps for a in s["task"])
            assert 0 < dropped < total, (dropped, total)
    with pytest.raises(ValueError, match="MaskTuningConfig"):
        ClipPromptTask(BACKBONE, methods=[vpeft.LoraConfig(r=2)], gradient_dropout=1.0)
    with pytest.raises(ValueError, match="lambda in"):
        ClipPromptTask(BACKBONE, methods=[vpeft.MaskTuningConfig(towers=["visual"])], gradient_dropout=2.0)
