"""The calibration contract (``vpeft.methods._calibration.calibrate``): the gradient pass leaves the model exactly as it
was, resolves only the configs that need it, matches an independent sensitivity computation, and unresolved configs
are refused before any mutation. The second half is a local copy of the conformance matrix's checks for the two
calibrated methods (the shared matrix does not calibrate yet)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import CASES, rel_err

import vpeft
from vpeft.methods._calibration import calibrate, calibration_tensors
from vpeft.methods.layers import AdapterLayer
from vpeft.methods.mask import MaskTuningConfig
from vpeft.methods.spt import SPTConfig, matrix_key


def batches(n: int = 2, bs: int = 4, classes: int = 5):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(bs, 3, 32, 32, generator=g), torch.randint(0, classes, (bs,), generator=g))
            for _ in range(n)]


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_calibrate_leaves_model_untouched():
    model = CASES["timm_vit"].build(0).train()
    model.head.weight.requires_grad_(False)  # a non-default flag that must survive
    old_grad = torch.ones_like(model.blocks[0].attn.qkv.weight)
    model.blocks[0].attn.qkv.weight.grad = old_grad  # a pre-existing gradient that must survive untouched
    before = snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    lora = vpeft.LoraConfig(r=2)
    spt = SPTConfig(budget=50, r=2)
    out = calibrate(model, [lora, spt], batches())
    assert out[0] is lora  # needs nothing: returned unchanged
    assert spt.selection is None and out[1] is not spt and out[1].selection is not None  # a resolved copy
    assert model.training and all(m.training for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.blocks[0].attn.qkv.weight.grad is old_grad and torch.equal(old_grad, torch.ones_like(old_grad))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "blocks.0.attn.qkv.weight")
    for k, v in snapshot(model).items():
        assert torch.equal(v, before[k]), k


def test_spt_sensitivity_matches_independent_gradients():
    """Small budget, no matrix reaches the LoRA threshold: the selected positions are exactly the top-`budget` of
    sum_batches (dL/dW)^2 over all candidate matrices (computed here with torch.autograd.grad per batch)."""
    model = CASES["timm_vit"].build(0)
    data = batches(3)
    budget = 12
    (cfg,) = calibrate(model, [SPTConfig(budget=budget, r=2, alpha=1.0)], data, max_batches=2)
    mats = {}  # selection key -> (parameter name, output rows)
    d = model.embed_dim
    for i in range(len(model.blocks)):
        for j, n in enumerate("qkv"):
            mats[matrix_key(f"blocks.{i}.attn.qkv", n)] = (f"blocks.{i}.attn.qkv.weight", slice(j * d, (j + 1) * d))
        for mod in ("attn.proj", "mlp.fc1", "mlp.fc2"):
            mats[matrix_key(f"blocks.{i}.{mod}", "w")] = (f"blocks.{i}.{mod}.weight", slice(None))
    ref = copy.deepcopy(model).eval()
    params = dict(ref.named_parameters())
    names = sorted({n for n, _ in mats.values()})
    sens = {n: torch.zeros_like(params[n]) for n in names}
    for x, y in data[:2]:  # max_batches=2
        grads = torch.autograd.grad(F.cross_entropy(ref(x), y), [params[n] for n in names])
        for n, g in zip(names, grads):
            sens[n] += g.square()
    scored = []
    for key, (name, rows) in mats.items():
        s = sens[name][rows].flatten()
        scored += [(float(v), key, i) for i, v in enumerate(s)]
    top = sorted(scored, key=lambda t: -t[0])[:budget]
    expected: dict[str, list[int]] = {}
    for _, key, i in top:
        expected.setdefault(key, []).append(i)
    assert cfg.selection["lora"] == []
    assert cfg.selection["sparse"] == {k: len(v) for k, v in expected.items()}
    tensors = calibration_tensors(cfg)
    for key, idx in expected.items():
        assert tensors[f"sparse_index:{key}"].tolist() == sorted(idx)


def test_unresolved_config_refused_before_mutation():
    for cfg in (MaskTuningConfig(), SPTConfig()):
        model = CASES["timm_vit"].build(0)
        before = snapshot(model)
        with pytest.raises(ValueError, match=rf"{type(cfg).__name__}.*vpeft.calibrate\(|explicit"):
            vpeft.get_peft_model(model, [vpeft.LoraConfig(r=2), cfg])
        assert not any(isinstance(m, AdapterLayer) for m in model.modules())
        assert all(p.requires_grad for p in model.parameters())
        for k, v in snapshot(model).items():
            assert torch.equal(v, before[k])


def test_calibrate_argument_errors():
    model = CASES["timm_vit"].build(0)
    with pytest.raises(ValueError, match="yielded no batch"):
        calibrate(model, [SPTConfig(budget=5)], [])
    with pytest.raises(ValueError, match="max_batches"):
        calibrate(model, [SPTConfig(budget=5)], batches(), max_batches=0)
    with pytest.raises(ValueError, match="budget"):
        calibrate(model, [SPTConfig(budget=0)], batches())
    with pytest.raises(ValueError, match="more than the"):
        calibrate(model, [SPTConfig(budget=10 ** 9)], batches())
    pm = vpeft.get_peft_model(model, vpeft.LoraConfig(r=2))
    with pytest.raises(TypeError, match="plain backbone"):
        calibrate(pm, [SPTConfig(budget=5)], batches())
    calls = []

    def loss(m, x, y):
        calls.append(1)
        return F.cross_entropy(m(x), y)

    calibrate(CASES["timm_vit"].build(0), SPTConfig(budget=5), batches(4), loss_fn=loss, max_batches=3)
    assert len(calls) == 3


def test_selection_round_trips_through_json_without_tensors():
    model = CASES["timm_vit"].build(0)
    mask, spt = calibrate(model, [MaskTuningConfig(), SPTConfig(budget=40, r=2)], batches())
    for cfg in (mask, spt):
        d = json.loads(json.dumps(cfg.to_dict()))  # JSON-serialisable, tensors left out
        assert "_calibration_tensors" not in d and d["selection"] == cfg.selection
        back = vpeft.PeftConfig.from_dict(d)
        assert back == cfg and not calibration_tensors(back)


# ---- local copy of the conformance matrix for the calibrated methods ---------------------------------------------

MATRIX_CASES = ["timm_vit", "clip_visual", "clip_text"]


def calibrated(case, method: str):
    """What tests/test_conformance.py needs for these methods: its SMALL settings, then one calibration step on the
    case's own output (no labels: the loss is the mean square of the output)."""
    model = case.build(0)
    cfg = (SPTConfig(budget=600, r=2, towers=case.towers) if method == "spt"
           else MaskTuningConfig(towers=case.towers))
    (cfg,) = calibrate(model, [cfg], [(case.make_input(), None)],
                       loss_fn=lambda m, x, _: case.run(m, x).square().mean())
    return cfg


def perturb(pm, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in pm.adapter_state_dict().values():
            if t.is_floating_point():
                t.add_(0.05 * torch.randn(t.shape, generator=g))


@pytest.mark.parametrize("case_name", MATRIX_CASES)
@pytest.mark.parametrize("method", ["mask", "spt"])
def test_conformance_copy(method, case_name, tmp_path):
    case = CASES[case_name]
    cfg = calibrated(case, method)
    model = case.build(0)
    x = case.make_input()
    before = snapshot(model)
    pm = vpeft.get_peft_model(model, cfg)
    perturb(pm)
    frozen = case.build(0).requires_grad_(False)
    with torch.no_grad():
        y = case.run(pm, x)
        with pm.disabled():
            assert torch.equal(case.run(pm, x), case.run(frozen, x))
    assert not torch.equal(y, case.run(frozen, x).detach())
    # save / load into a fresh model: the same function
    pm.save_adapter(str(tmp_path))
    pm2 = vpeft.PeftModel.from_pretrained(case.build(0), str(tmp_path))
    with torch.no_grad():
        assert torch.equal(case.run(pm2, x), y)
    # only adapters learn
    pm.train()
    ad_before = {k: v.clone() for k, v in pm.adapter_state_dict().items()}
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    case.run(pm, x).square().mean().backward()
    opt.step()
    assert any(not torch.equal(v, pm.adapter_state_dict()[k]) for k, v in ad_before.items())
    pm.eval()
    # merge exact, unmerge, unload restores the backbone bit for bit (mask) / within rounding (spt)
    with torch.no_grad():
        y = case.run(pm, x)
        pm.merge()
        assert rel_err(case.run(pm, x), y) < 1e-5
        pm.unmerge()
        assert rel_err(case.run(pm, x), y) < 1e-5
    restored = pm.unload()
    for k, v in snapshot(restored).items():
        if method == "mask":
            assert torch.equal(v, before[k]), k
        else:
            torch.testing.assert_close(v, before[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize("method", ["mask", "spt"])
def test_conformance_copy_stacking_with_lora(method):
    case = CASES["timm_vit"]
    cfg = calibrated(case, method)
    lora = vpeft.LoraConfig(r=2, targets=["q", "v", "mlp_in"])
    model = case.build(0)
    if method == "mask":  # like DoRA: the mask acts on the pretrained weight, so it must come first on its sites
        with pytest.raises(ValueError, match="must be the first method on site"):
            vpeft.get_peft_model(model, [lora, cfg])
        configs = [cfg, lora]
    else:
        configs = [lora, cfg]
    pm = vpeft.get_peft_model(model, configs)
    perturb(pm)
    x = case.make_input()
    with torch.no_grad():
        y = case.run(pm, x)
        sd = copy.deepcopy(pm.adapter_state_dict())
        pm2 = vpeft.get_peft_model(case.build(0), configs)
        pm2.load_adapter_state_dict(sd)
        assert torch.equal(case.run(pm2, x), y)
        pm.merge()
        assert rel_err(case.run(pm, x), y) < 1e-5


# ---- Lightning: PeftTask calibrates from the training dataloader -------------------------------------------------

@pytest.mark.parametrize("via", ["dataloader", "datamodule"])
def test_lightning_task_calibrates_from_training_batches(via, tmp_path):
    pytest.importorskip("lightning")
    from lightning.pytorch import LightningDataModule, Trainer
    from torch.utils.data import DataLoader, TensorDataset

    from vpeft.modules import FewShotClassifier

    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(12, 3, 16, 16, generator=g), torch.randint(0, 3, (12,), generator=g))
    loader = DataLoader(data, batch_size=4)

    class DM(LightningDataModule):
        def train_dataloader(self):
            return loader

    task = FewShotClassifier(backbone="timm:vit_tiny_patch16_224", num_classes=3, methods=[SPTConfig(budget=30, r=2)],
                             backbone_kwargs=dict(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2),
                             init_seed=0)
    task.calibration_batches = 2
    with pytest.raises(ValueError, match="no training dataloader"):  # outside fit: nothing to calibrate from
        task.configure_model()
    trainer = Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", default_root_dir=str(tmp_path))
    trainer.fit(task, **({"train_dataloaders": loader} if via == "dataloader" else {"datamodule": DM()}))
    (cfg,) = task.methods
    assert cfg.selection is not None and cfg.selection["budget"] == 30
    assert task.hparams["methods"][0]["init_args"]["selection"] == cfg.selection
    head = sum(p.numel() for p in task.model.base_model.head.parameters())
    assert task.model.num_parameters(trainable_only=True) == 30 + head
    # the same selection as calibrating the backbone by hand on those batches (rebuilt as configure_model builds it)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        backbone = vpeft.create_backbone("timm:vit_tiny_patch16_224", num_classes=3, img_size=16, patch_size=8,
                                         embed_dim=32, depth=1, num_heads=2)
    (ref,) = calibrate(backbone, [SPTConfig(budget=30, r=2)], list(loader)[:2])
    assert ref.selection == cfg.selection


def test_lightning_task_calibration_dataloader_outside_fit():
    pytest.importorskip("lightning")
    from vpeft.modules import FewShotClassifier

    g = torch.Generator().manual_seed(1)
    loader = [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(3)]
    task = FewShotClassifier(backbone="timm:vit_tiny_patch16_224", num_classes=3,
                             methods=[MaskTuningConfig()],
                             backbone_kwargs=dict(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2))
    task.calibration_dataloader = loader
    task.configure_model()
    assert task.methods[0].selection["matrices"] == ["blocks.0.attn.qkv", "blocks.0.attn.proj"]
    assert task(torch.randn(2, 3, 16, 16)).shape == (2, 3)
