"""AdaptFormer numerics: the forward against a hand-written AdaptMLP (forward hooks on an untouched backbone), the
paper's initialisation, parameter counts against the formula (ViT-B/16 included), merge refused, bad configs refused
before any change to the model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import images, make_clip, make_timm, rel_err, tokens

import vpeft
from vpeft.methods.adaptformer import AdaptFormerConfig, BottleneckAdapter
from vpeft.methods.layers import AdapterLayer

# name: (factory, forward, towers, paths of the MLPs in an untouched model)
BACKBONES = {
    "timm": (make_timm, lambda m, x: m(x), None, images, ["blocks.0.mlp", "blocks.1.mlp"]),
    "clip_visual": (make_clip, lambda m, x: m.encode_image(x), ["visual"], images,
                    ["visual.transformer.resblocks.0.mlp", "visual.transformer.resblocks.1.mlp"]),
    "clip_text": (make_clip, lambda m, x: m.encode_text(x), ["text"], tokens,
                  ["transformer.resblocks.0.mlp", "transformer.resblocks.1.mlp"]),
}


def randomize(pm: vpeft.PeftModel, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def adaptmlp_hooks(model: torch.nn.Module, paths: list[str], tensors: dict, scale: float) -> None:
    """The paper's AdaptMLP written out: MLP(h) + s * (ReLU(h W_down^T + b_down) W_up^T + b_up), h the MLP input."""

    def hook_for(path):
        wd, bd, wu, bu = (tensors[f"{path}.adaptformer.{n}"] for n in ("down.weight", "down.bias", "up.weight",
                                                                         "up.bias"))

        def hook(module, inputs, output):
            h = inputs[0]
            return output + scale * (torch.relu(h @ wd.T + bd) @ wu.T + bu)

        return hook

    for path in paths:
        model.get_submodule(path).register_forward_hook(hook_for(path))


@pytest.mark.parametrize("name", list(BACKBONES))
def test_forward_matches_handwritten_adaptmlp(name):
    factory, run, towers, make_x, paths = BACKBONES[name]
    x = make_x()
    pm = vpeft.get_peft_model(factory(0), AdaptFormerConfig(bottleneck=8, towers=towers))
    pm.eval()
    randomize(pm)
    assert sorted(pm.adapter_layers()) == sorted(paths)
    ref_model = factory(0).requires_grad_(False)
    adaptmlp_hooks(ref_model, paths, pm.adapter_state_dict(), 0.1)
    with torch.no_grad():
        y, ref, base = run(pm, x), run(ref_model, x), run(factory(0).requires_grad_(False), x)
    assert rel_err(y, ref) < 1e-5
    assert rel_err(y, base) > 1e-2, "the randomised adapters must matter"


def test_init_is_identity_and_lora_style():
    model = make_timm(0)
    x = images()
    with torch.no_grad():
        y0 = model(x)
    pm = vpeft.get_peft_model(model, AdaptFormerConfig())
    with torch.no_grad():
        assert torch.equal(pm(x), y0), "zero up-projection and biases: the pretrained function at init"
    a = pm.adapter_layers()["blocks.0.mlp"].adaptformer
    assert isinstance(a, BottleneckAdapter)
    assert tuple(a.down.weight.shape) == (64, 64) and tuple(a.up.weight.shape) == (64, 64)
    for t in (a.down.bias, a.up.weight, a.up.bias):
        assert torch.count_nonzero(t) == 0
    bound = 1.0 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on fan_in 64: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    w = a.down.weight
    assert w.abs().max() <= bound and abs(w.std().item() - bound / math.sqrt(3)) < 0.1 * bound


def test_dropout_and_gelu():
    pm = vpeft.get_peft_model(make_timm(0), AdaptFormerConfig(bottleneck=4, dropout=0.5, activation="gelu"))
    randomize(pm)
    a = pm.adapter_layers()["blocks.0.mlp"].adaptformer
    h = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(4))
    pm.eval()
    with torch.no_grad():
        ref = 0.1 * F.linear(F.gelu(F.linear(h, a.down.weight, a.down.bias)), a.up.weight, a.up.bias)
        assert torch.allclose(a.branch(h), ref, atol=1e-6)
    pm.train()
    torch.manual_seed(0)
    with torch.no_grad():
        assert not torch.allclose(a.branch(h), ref, atol=1e-3), "dropout acts in training"


@pytest.mark.parametrize("name", list(BACKBONES))
def test_parameter_count_formula(name):
    factory, _, towers, _, paths = BACKBONES[name]
    pm = vpeft.get_peft_model(factory(0), AdaptFormerConfig(bottleneck=8, towers=towers))
    d, r = 64, 8
    assert pm.num_parameters(trainable_only=True) == len(paths) * (d * r + r + r * d + d)
    pm2 = vpeft.get_peft_model(factory(0), AdaptFormerConfig(bottleneck=8, towers=towers, layers=[-1]))
    assert pm2.num_parameters(trainable_only=True) == d * r + r + r * d + d


def test_vit_b16_parameter_count_in_docstring():
    import timm

    import vpeft.backbones.timm_vit  # noqa: F401  (registers the timm spec for models built with timm directly)

    with torch.device("meta"):  # shapes only: no 86M-parameter allocation
        model = timm.create_model("vit_base_patch16_224", pretrained=False)
    pm = vpeft.get_peft_model(model, AdaptFormerConfig())
    assert pm.num_parameters(trainable_only=True) == 12 * (2 * 768 * 64 + 64 + 768) == 1_189_632


def test_merge_refused():
    pm = vpeft.get_peft_model(make_timm(0), AdaptFormerConfig(bottleneck=4))
    with pytest.raises(ValueError, match="not mergeable"):
        pm.merge()
    assert not pm.merged


@pytest.mark.parametrize("bad, exc", [
    (dict(bottleneck=0), ValueError), (dict(bottleneck=True), ValueError), (dict(bottleneck=2.0), ValueError),
    (dict(scale="0.1"), TypeError), (dict(scale=float("nan")), ValueError), (dict(dropout=1.0), ValueError),
    (dict(activation="tanh"), ValueError), (dict(targets=["q"]), ValueError), (dict(targets=["mlp_in"]), ValueError),
    (dict(targets="mlp"), TypeError), (dict(layers=[7]), ValueError), (dict(towers=["text"]), ValueError),
])
def test_bad_config_refused_before_mutation(bad, exc):
    model = make_timm(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(exc):
        vpeft.get_peft_model(model, AdaptFormerConfig(**bad))
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_config_roundtrip():
    cfg = AdaptFormerConfig(bottleneck=16, scale=0.2, towers=["visual", "text"])
    d = cfg.to_dict()
    assert d["method"] == "adaptformer" and vpeft.PeftConfig.from_dict(d) == cfg
    assert (AdaptFormerConfig().bottleneck, AdaptFormerConfig().scale) == (64, 0.1)
