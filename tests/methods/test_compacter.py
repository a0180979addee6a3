"""Compacter numerics: PHM bottleneck adapters with shared slow weights.

The forward is checked against a hand-written reference (explicit ``torch.kron`` sums, run through forward hooks on a
plain backbone), parameter counts against the paper's formula, and refusals (widths not divisible by ``n``, slices,
merging) against an untouched model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import images, make_clip, make_timm, rel_err, tokens

import vpeft
from vpeft.methods.compacter import CompacterConfig
from vpeft.methods.layers import AdapterLayer


def run_clip(m, x):
    return torch.cat([m.encode_image(x), m.encode_text(tokens())])


CASES = {
    # timm: full Compacter (after attention and MLP); open_clip: Compacter++ on both towers. (open_clip's attention
    # output projection is read as a weight by nn.MultiheadAttention, so a plain-backbone hook cannot reach it.)
    "timm": (make_timm, lambda m, x: m(x), dict(targets=["attn_out", "mlp"])),
    "open_clip": (make_clip, run_clip, dict(towers=["visual", "text"])),
}


def build(case: str, **kw):
    factory, run, base_kw = CASES[case]
    model = factory(0)
    return model, vpeft.get_peft_model(model, CompacterConfig(**{**base_kw, **kw})), run


def randomize(pm, seed: int = 3, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def adapters(pm):
    return [(path, a) for path, layer in pm.adapter_layers().items() for k, a in layer.adapters() if k == "compacter"]


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- config -------------------------------------------------------------------------------------------------------


def test_config_defaults_roundtrip_and_validation():
    cfg = CompacterConfig()
    assert (cfg.n, cfg.reduction_factor, cfg.bottleneck, cfg.rank, cfg.activation, cfg.phm_init_std) == \
        (4, 32, None, 1, "gelu", 1e-4)
    assert "compacter" in vpeft.list_methods()
    # k = d / 32, rounded up to a multiple of n: 24 on ViT-B (768), 32 on ViT-L, 4 on the width-64 test models.
    assert [cfg.bottleneck_for(d) for d in (768, 1024, 512, 64)] == [24, 32, 16, 4]
    assert CompacterConfig(bottleneck=8).bottleneck_for(64) == 8
    d = CompacterConfig(n=2, targets=["mlp"]).to_dict()
    assert d["method"] == "compacter" and vpeft.PeftConfig.from_dict(d) == CompacterConfig(n=2, targets=["mlp"])
    for field, bad in (("n", 0), ("n", True), ("reduction_factor", 0), ("rank", 1.0), ("bottleneck", 0),
                       ("bottleneck", 6), ("activation", "tanh"), ("phm_init_std", -1.0)):
        with pytest.raises(ValueError, match=field):
            CompacterConfig(**{field: bad}).validate()


def test_vit_b16_parameter_count_from_formula():
    import timm

    import vpeft.backbones.timm_vit  # noqa: F401

    d, k, n = 768, 24, 4
    per_adapter = 2 * (d + k) + (d + k)  # rank-1 PHM factors of both projections + both biases
    for targets, adapters_per_block in ((None, 1), (["attn_out", "mlp"], 2)):
        with torch.device("meta"):  # shapes only
            model = timm.create_model("vit_base_patch16_224")
        pm = vpeft.get_peft_model(model, CompacterConfig(targets=targets))
        assert pm.num_parameters(trainable_only=True) == 12 * adapters_per_block * per_adapter + n ** 3
    assert 12 * per_adapter + n ** 3 == 28_576


# --- structure ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_parameter_count_and_shared_slow_weights(case):
    model, pm, run = build(case)
    ads = adapters(pm)
    assert len(ads) == 4  # timm: 2 blocks x (attn_out, mlp); open_clip: 2 towers x 2 blocks x mlp
    d, k, n = 64, 4, 4
    assert pm.num_parameters(trainable_only=True) == len(ads) * 3 * (d + k) + n ** 3
    sd = pm.adapter_state_dict()
    assert tuple(sd["_shared.compacter.phm_rule"].shape) == (n, n, n)
    assert sum(key.startswith("_shared.") for key in sd) == 1
    assert all(a.shared is pm.shared["compacter"] for _, a in ads)
    path, a = ads[0]
    assert tuple(sd[f"{path}.compacter.down_left"].shape) == (n, d // n, 1)
    assert tuple(sd[f"{path}.compacter.down_right"].shape) == (n, 1, k // n)
    assert tuple(sd[f"{path}.compacter.up_left"].shape) == (n, k // n, 1)
    assert tuple(sd[f"{path}.compacter.up_right"].shape) == (n, 1, d // n)
    # Every adapter's gradient reaches the one shared tensor.
    randomize(pm)
    pm.train()
    run(pm, images()).square().mean().backward()
    assert pm.shared["compacter"].phm_rule.grad.abs().sum() > 0
    for _, a in ads:
        assert a.down_left.grad.abs().sum() > 0 and a.up_right.grad.abs().sum() > 0


def test_init_is_near_identity_and_layout_kept():
    model, pm, run = build("timm")
    x = images()
    with torch.no_grad():
        y = run(pm, x)
        with pm.disabled():
            y0 = run(pm, x)
    assert y.shape == y0.shape
    assert rel_err(y, y0) < 1e-4  # slow weights ~ N(0, 1e-4) and zero biases: the adapters start near zero
    for _, a in adapters(pm):
        assert torch.count_nonzero(a.down_bias) == 0 and torch.count_nonzero(a.up_bias) == 0


# --- forward against a hand-written reference ---------------------------------------------------------------------


def reference_adapter(rule, a, activation: str):
    """The adapter as the paper writes it, from explicit Kronecker products: y + U(act(D(y)))."""
    n = rule.shape[0]
    w_down = sum(torch.kron(rule[i], a.down_left[i] @ a.down_right[i]) for i in range(n))  # (d, k)
    w_up = sum(torch.kron(rule[i], a.up_left[i] @ a.up_right[i]) for i in range(n))  # (k, d)
    act = {"gelu": F.gelu, "relu": F.relu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[activation]

    def hook(module, inputs, y):
        return y + act(y @ w_down + a.down_bias) @ w_up + a.up_bias

    return hook


@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_hand_written_reference(case, activation):
    model, pm, run = build(case, activation=activation)
    randomize(pm)
    x = images()
    with torch.no_grad():
        y = run(pm, x)
        ref = CASES[case][0](0)
        rule = pm.shared["compacter"].phm_rule.detach()
        for path, a in adapters(pm):
            ref.get_submodule(path).register_forward_hook(reference_adapter(rule, a, activation))
        y_ref = run(ref, x)
        y_base = run(CASES[case][0](0), x)
    assert rel_err(y, y_ref) < 1e-5
    assert rel_err(y, y_base) > 1e-3


# --- refusals -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config, match", [
    (CompacterConfig(n=3), r"'blocks\.0\.mlp' has width 64, which is not divisible by n=3"),
    (CompacterConfig(n=5, targets=["attn_out"]), r"'blocks\.0\.attn\.proj' has width 64, .*n=5"),
    (CompacterConfig(targets=["q"]), "slice of a fused projection"),
    (CompacterConfig(targets=["norm1"]), "cannot attach"),
    (CompacterConfig(bottleneck=6), "bottleneck=6 is not a multiple of n=4"),
])
def test_bad_config_refused_before_mutation(config, match):
    model = make_timm(0)
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        vpeft.get_peft_model(model, config)
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    after = snapshot(model)
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())


def test_merge_refused_and_nothing_changes():
    model, pm, run = build("timm")
    randomize(pm)
    x = images()
    with torch.no_grad():
        y = run(pm, x)
    weights = snapshot(pm.base_model)
    with pytest.raises(ValueError, match="not mergeable"):
        pm.merge()
    assert not pm.merged
    after = snapshot(pm.base_model)
    assert all(torch.equal(weights[k], after[k]) for k in weights)
    with torch.no_grad():
        assert torch.equal(run(pm, x), y)


def test_save_load_roundtrip(tmp_path):
    model, pm, run = build("open_clip")
    randomize(pm)
    x = images()
    with torch.no_grad():
        y = run(pm, x)
    pm.save_adapter(str(tmp_path))
    pm2 = vpeft.PeftModel.from_pretrained(make_clip(0), str(tmp_path))
    with torch.no_grad():
        assert torch.equal(run(pm2, x), y)
