"""The conformance matrix (DESIGN sections 3 and 8): every registered method x every tiny backbone.

A new method or backbone is covered automatically. Method-specific numerics live in tests/methods/.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Optional

import pytest
import torch
from conftest import CASES, Case, rel_err
from torch.utils.flop_counter import FlopCounterMode

import vpeft
from vpeft.methods._calibration import needs_calibration
from vpeft.methods.base import get_method
from vpeft.methods.layers import AdapterLayer

# Small settings so the matrix runs in seconds; everything else is the method's paper default.
SMALL = {"r": 2, "num_tokens": 3, "rank": 2, "dropout": 0.0, "budget": 600,
         # prompt learning: 2 random context tokens (the tiny CLIP has no BPE vocabulary for ctx_init), depth 2
         "n_ctx": 2, "ctx_init": None, "n_ctx_vision": 2, "depth": 2, "text_depth": 2, "vision_depth": 2}


def small_config(method: str, towers, case: Optional[Case] = None):
    """The method's config with the SMALL settings; data-dependent methods (mask tuning, SPT) are calibrated on the
    case's model and input (a squared-output loss) when ``case`` is given."""
    cls = get_method(method).config_class
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in SMALL.items() if k in names}
    cfg = cls(towers=towers, **kw)
    if case is not None and needs_calibration(cfg):
        (cfg,) = vpeft.calibrate(case.build(0), [cfg], [(case.make_input(), None)],
                                 loss_fn=lambda m, x, _: case.run(m, x).square().mean())
    return cfg


def is_text_prompt(method: str) -> bool:
    from vpeft.methods._text_prompts import TextPromptMethod

    return issubclass(get_method(method), TextPromptMethod)


def applicable(method: str, case: Case) -> bool:
    """The clip_prompt case exercises text-prompt methods only (other methods are covered by the other CLIP cases)."""
    return case.name != "clip_prompt" or is_text_prompt(method)


POINT_ONLY = ("idpt", "point_peft")


def supported(method: str, case: Case) -> bool:
    # VPT, Earth-Adapter and DAPT (its prompts) need an image tower; text-prompt methods attach to fixed CLIP sites
    # (clip_prompt) and refuse towers/targets or a backbone without a text tower; every other built-in method applies
    # to all cases.
    if is_text_prompt(method):
        return case.name == "clip_prompt"
    # Point-cloud methods need group centres: they refuse every other backbone.
    if method in POINT_ONLY:
        return case.name == "point_mae"
    # Earth-Adapter's frequency split needs a 2-D patch grid: it refuses the text tower and point clouds.
    if method == "earth_adapter" and case.name == "point_mae":
        return False
    return not (method in ("vpt", "earth_adapter", "dapt") and case.name == "clip_text")


def perturb(pm: vpeft.PeftModel, seed: int = 0) -> None:
    """Move every adapter tensor away from its (often identity) initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in pm.adapter_state_dict().values():
            if t.is_floating_point():
                t.add_(0.05 * torch.randn(t.shape, generator=g))


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


METHODS = vpeft.list_methods()


@pytest.fixture(params=METHODS, ids=METHODS)
def method(request) -> str:
    return request.param


def build(case: Case, method: str, seed: int = 0):
    model = case.build(seed)
    pm = vpeft.get_peft_model(model, small_config(method, case.towers, case))
    perturb(pm)
    return model, pm


UNSUPPORTED = [(m, c) for m in METHODS for c in CASES if applicable(m, CASES[c]) and not supported(m, CASES[c])]


@pytest.mark.parametrize("method_name, case_name", UNSUPPORTED, ids=[f"{c}-{m}" for m, c in UNSUPPORTED])
def test_unsupported_raises_before_mutation(method_name: str, case_name: str):
    case = CASES[case_name]
    model = case.build(0)
    before = snapshot(model)
    match = "VPT" if method_name == "vpt" else "text tower|must be None|point-cloud|patch grid"
    with pytest.raises(ValueError, match=match):
        vpeft.get_peft_model(model, small_config(method_name, case.towers))
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert_same_state(before, snapshot(model))
    assert all(p.requires_grad for p in model.parameters())


@pytest.fixture
def built(case: Case, method: str):
    if not applicable(method, case):
        pytest.skip("not applicable (covered by the other CLIP cases)")
    if not supported(method, case):
        pytest.skip("unsupported combination (checked by test_unsupported_raises_before_mutation)")
    model = case.build(0)
    x = case.make_input()
    with torch.no_grad():
        y_base = case.run(model, x)
    before = snapshot(model)
    pm = vpeft.get_peft_model(model, small_config(method, case.towers, case))
    perturb(pm)
    return case, pm, x, y_base, before


def frozen_output(case: Case, x: torch.Tensor) -> torch.Tensor:
    """The backbone's output with its weights frozen, as they are inside a PeftModel.

    torch's nn.MultiheadAttention gives different last bits (~1e-6) under a float attn_mask depending on whether
    ``in_proj_weight.requires_grad`` is set, even under no_grad (measured on the text tower); the bit-exact
    comparison is against the backbone in the same state.
    """
    model = case.build(0).requires_grad_(False)
    with torch.no_grad():
        return case.run(model, x)


def test_layout_and_disabled_equals_base(built):
    case, pm, x, y_base, _ = built
    with torch.no_grad():
        y = case.run(pm, x)
        with pm.disabled():
            y_off = case.run(pm, x)
    y_base = frozen_output(case, x)
    assert y.shape == y_base.shape
    assert not torch.equal(y, y_base), "perturbed adapters should change the output"
    assert torch.equal(y_off, y_base), "disabled adapters must give the backbone's output bit for bit"


def test_intermediates_keep_layout(built):
    case, pm, x, _, _ = built
    if case.name != "timm_vit":
        pytest.skip("forward_intermediates checked on timm")
    base = case.build(0)
    _, ref = base.forward_intermediates(x)
    with torch.no_grad():
        _, inter = pm.forward_intermediates(x)
    assert [t.shape for t in inter] == [t.shape for t in ref]


def test_unload_restores_keys_and_values(built):
    case, pm, x, y_base, before = built
    model = pm.unload()
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert_same_state(before, snapshot(model))
    with torch.no_grad():
        assert torch.equal(case.run(model, x), y_base)


def test_adapter_state_is_separable(built):
    _, pm, _, _, before = built
    sd = pm.adapter_state_dict()
    assert sd, "a method must own at least one tensor"
    key = pm.method_keys[0]
    for k in sd:
        assert "base_layer" not in k
        assert k.startswith(f"_shared.{key}.") or f".{key}." in k, k
        assert k not in before, f"adapter key {k} collides with a backbone key"


def test_only_adapters_learn(built):
    case, pm, x, _, before = built
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    adapter_before = {k: v.clone() for k, v in pm.adapter_state_dict().items()}
    opt = torch.optim.SGD(params, lr=0.1)
    case.run(pm, x).square().mean().backward()
    opt.step()
    adapter_after = pm.adapter_state_dict()
    model = pm.unload()
    assert_same_state(before, snapshot(model))
    changed = [k for k, v in adapter_before.items() if not torch.equal(v, adapter_after[k])]
    assert changed, "no adapter tensor changed after an optimizer step"


def test_save_load_roundtrip(built, tmp_path):
    case, pm, x, _, _ = built
    with torch.no_grad():
        y = case.run(pm, x)
    pm.save_adapter(str(tmp_path))
    fresh = case.build(0)
    pm2 = vpeft.PeftModel.from_pretrained(fresh, str(tmp_path))
    with torch.no_grad():
        assert torch.equal(case.run(pm2, x), y)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert set(saved) == set(pm.adapter_state_dict())


def test_merge_exact_and_flops(built):
    case, pm, x, y_base, before = built
    methods = [get_method(type(c).method) for c in pm.configs]
    mergeable = all(
        a.mergeable for layer in pm.adapter_layers().values() for _, a in layer.adapters())
    if not mergeable:
        assert not all(m.mergeable for m in methods) or case.name == "clip_visual"
        with pytest.raises(ValueError, match="not mergeable"):
            pm.merge()
        return
    with torch.no_grad():
        y = case.run(pm, x)
        pm.merge()
        y_m = case.run(pm, x)
    assert rel_err(y_m, y) < 1e-5
    with pytest.raises(ValueError, match="unmerge"):
        with pm.disabled():
            pass
    pm.unmerge()
    with torch.no_grad():
        assert rel_err(case.run(pm, x), y) < 1e-5
    merged = pm.merge_and_unload()
    assert list(snapshot(merged)) == list(before)
    base = case.build(0)
    with FlopCounterMode(display=False) as f_base, torch.no_grad():
        case.run(base, x)
    with FlopCounterMode(display=False) as f_merged, torch.no_grad():
        case.run(merged, x)
    assert f_merged.get_total_flops() == f_base.get_total_flops()


def test_grad_checkpointing_same_grads(built):
    case, pm, x, _, _ = built
    pm.train()

    def grads(ckpt: bool):
        pm.set_grad_checkpointing(ckpt)
        pm.zero_grad()
        torch.manual_seed(0)  # methods that draw per forward (dropout, MoSA's sparse module) draw the same twice
        case.run(pm, x).square().mean().backward()
        return {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}

    g0, g1 = grads(False), grads(True)
    assert set(g0) == set(g1)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7, msg=n)


def test_stacking_two_methods(case: Case, method: str):
    if not supported(method, case) or method == "lora":
        pytest.skip("pairs with LoRA")
    model = case.build(0)
    x = case.make_input()
    lora = vpeft.LoraConfig(r=2, towers=case.towers, targets=["q", "v", "mlp_in"])
    configs = [lora, small_config(method, case.towers, case)]
    if method in ("dora", "mask"):  # their norm / mask is the raw base weight's: they must come first on a site
        before = snapshot(model)
        with pytest.raises(ValueError, match="must be the first method on site"):
            vpeft.get_peft_model(model, configs)
        assert_same_state(before, snapshot(model))
        configs = configs[::-1]
    pm = vpeft.get_peft_model(model, configs)
    perturb(pm)
    assert len(pm.method_keys) == 2 and "lora" in pm.method_keys
    y_base = frozen_output(case, x)
    with torch.no_grad():
        y = case.run(pm, x)
        with pm.disabled():
            assert torch.equal(case.run(pm, x), y_base)
    # The same adapter tensors in a fresh model give the same function (composition is order-deterministic).
    sd = copy.deepcopy(pm.adapter_state_dict())
    model2 = case.build(0)
    pm2 = vpeft.get_peft_model(model2, configs)
    pm2.load_adapter_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(case.run(pm2, x), y)
    if all(a.mergeable for layer in pm.adapter_layers().values() for _, a in layer.adapters()):
        with torch.no_grad():
            pm.merge()
            assert rel_err(case.run(pm, x), y) < 1e-5
