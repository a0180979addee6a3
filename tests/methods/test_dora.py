"""DoRA numerics: identity at init, gradients against an independent implementation of the formula, exact merge /
unmerge, and the memory claim (autograd keeps LoRA's tensors plus one output-sized tensor per adapted slice)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call

import vpeft
import vpeft.backbones.timm_vit  # noqa: F401  (registers the timm spec for models built with timm directly)
from vpeft.methods.dora import DoRAConfig

SEED = 0


def tiny_vit():
    import timm

    torch.manual_seed(SEED)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                             num_classes=5).eval()


def tiny_clip():
    import open_clip

    torch.manual_seed(SEED)
    return open_clip.model.CLIP(
        embed_dim=32, vision_cfg=dict(layers=2, width=64, patch_size=8, image_size=32, head_width=16),
        text_cfg=dict(context_length=16, vocab_size=100, width=64, heads=4, layers=2)).eval()


BACKBONES = {
    # name: (factory, forward, targets covering fused slices and a plain Linear)
    "timm": (tiny_vit, lambda m, x: m(x), ["q", "v", "mlp_in"]),
    "open_clip": (tiny_clip, lambda m, x: m.encode_image(x), ["q", "v", "attn_out"]),
}


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def perturb(pm: vpeft.PeftModel) -> None:
    """Move away from the identity init (B = 0, m = ||W||) so that every term of the formula matters."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=g)
                p.add_(0.1 * noise * (p.abs().mean() if "magnitude" in name else 1.0))


def dora_adapters(pm: vpeft.PeftModel):
    return [(path, a) for path, layer in pm.adapter_layers().items() for k, a in layer.adapters() if k == "dora"]


def weight_name(pm: vpeft.PeftModel, path: str) -> str:
    return f"{path}.in_proj_weight" if hasattr(pm.base_model.get_submodule(path), "in_proj_weight") \
        else f"{path}.weight"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# --- config -----------------------------------------------------------------------------------------------------------


def test_config_defaults_roundtrip_and_validation():
    cfg = DoRAConfig()
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.init_a, cfg.scaling) == (8, None, 0.0, "kaiming", 1.0)
    assert "dora" in vpeft.list_methods()
    d = DoRAConfig(r=4, alpha=8, targets=["q"]).to_dict()
    assert d["method"] == "dora" and vpeft.PeftConfig.from_dict(d) == DoRAConfig(r=4, alpha=8, targets=["q"])
    for bad in (dict(r=0), dict(r=True), dict(dropout=1.0), dict(init_a="xavier")):
        with pytest.raises(ValueError):
            DoRAConfig(**bad).validate()
    with pytest.raises(TypeError):
        DoRAConfig(alpha="8").validate()


def test_rank_larger_than_slice_is_refused_before_mutation():
    m = tiny_vit()
    with pytest.raises(ValueError, match="rank"):
        vpeft.get_peft_model(m, [DoRAConfig(r=65)])
    assert not any(isinstance(x, vpeft.AdapterLayer) for x in m.modules())


# --- forward / parameters ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", BACKBONES)
def test_init_equals_base_and_parameter_count(backbone):
    make, fwd, targets = BACKBONES[backbone]
    model, x = make(), images()
    with torch.no_grad():
        y0 = fwd(model, x)
    pm = vpeft.get_peft_model(model, [DoRAConfig(r=4, targets=targets)])
    with torch.no_grad():
        y1 = fwd(pm, x)
    assert rel_err(y1, y0) < 1e-5

    expected = 0
    for _, a in dora_adapters(pm):
        in_f = next(iter(a.lora_A.values())).shape[1]
        for lo, hi in a.slices.values():
            expected += 4 * (in_f + (hi - lo)) + (hi - lo)  # LoRA's r * (in + out_slice), plus the magnitude
    assert pm.num_parameters(trainable_only=True) == expected
    keys = pm.adapter_state_dict()
    assert all(k.split(".dora.")[1].split(".")[0] in ("lora_A", "lora_B", "magnitude") for k in keys)


def test_magnitude_is_row_norm_of_its_slice():
    pm = vpeft.get_peft_model(tiny_vit(), [DoRAConfig(targets=["q", "v"], layers=[0])])
    (path, a), = dora_adapters(pm)
    w = pm.base_model.get_submodule(path).weight
    torch.testing.assert_close(a.magnitude["q"], w[:64].norm(dim=1))
    torch.testing.assert_close(a.magnitude["v"], w[128:].norm(dim=1))


# --- gradients against an independent implementation --------------------------------------------------------------


@pytest.mark.parametrize("backbone", BACKBONES)
def test_gradients_match_plain_formula(backbone):
    """m, A and B gradients equal those of ``W' = m * (W + s B A) / ||W + s B A||.detach()`` substituted into the
    untouched backbone with ``torch.func.functional_call`` (for open_clip that runs nn.MultiheadAttention's own
    forward, not vpeft's re-implementation)."""
    make, fwd, targets = BACKBONES[backbone]
    model, x = make(), images()
    ref_model = copy.deepcopy(model)
    cfg = DoRAConfig(r=4, alpha=8, targets=targets)
    pm = vpeft.get_peft_model(model, [cfg])
    perturb(pm)
    probe = torch.randn(fwd(ref_model, x).shape, generator=torch.Generator().manual_seed(3))

    (fwd(pm, x) * probe).sum().backward()

    weights, leaves = {}, []
    for path, a in dora_adapters(pm):
        wname = weight_name(pm, path)
        w = ref_model.get_parameter(wname).detach()
        rows = []
        pos = 0
        for name, (lo, hi) in a.slices.items():
            A = a.lora_A[name].detach().clone().requires_grad_(True)
            B = a.lora_B[name].detach().clone().requires_grad_(True)
            m = a.magnitude[name].detach().clone().requires_grad_(True)
            v = w[lo:hi] + cfg.scaling * (B @ A)
            rows += [w[pos:lo], m[:, None] * v / v.norm(dim=1, keepdim=True).detach()]
            pos = hi
            leaves.append(((A, a.lora_A[name]), (B, a.lora_B[name]), (m, a.magnitude[name])))
        rows.append(w[pos:])
        weights[wname] = torch.cat(rows)
    (ref_forward(backbone, ref_model, weights, x) * probe).sum().backward()

    for group in leaves:
        for ref, got in group:
            scale = ref.grad.abs().max()
            assert scale > 0
            torch.testing.assert_close(got.grad, ref.grad, rtol=1e-5, atol=1e-5 * scale.item())


def test_trainable_bias_gets_the_gradient_of_the_plain_formula():
    """DoRA rescales ``W x`` but not the bias, so a bias that trains (DoRA composed with BitFit, or a partly unfrozen
    backbone) gets ``sum(g)`` on every row, as without DoRA; checked against the formula through
    ``functional_call``."""
    model, x = tiny_vit(), images()
    ref_model = copy.deepcopy(model)
    cfg = DoRAConfig(r=4, alpha=8, targets=["q", "v"])
    pm = vpeft.get_peft_model(model, [cfg])
    perturb(pm)
    probe = torch.randn(ref_model(x).shape, generator=torch.Generator().manual_seed(3))
    biases = {}
    for path, _ in dora_adapters(pm):
        b = pm.base_model.get_parameter(f"{path}.bias")
        b.requires_grad_(True)
        biases[f"{path}.bias"] = b
    (pm(x) * probe).sum().backward()

    weights, ref_biases = {}, {}
    for path, a in dora_adapters(pm):
        w = ref_model.get_parameter(f"{path}.weight").detach()
        rows, pos = [], 0
        for name, (lo, hi) in a.slices.items():
            v = w[lo:hi] + cfg.scaling * (a.lora_B[name].detach() @ a.lora_A[name].detach())
            rows += [w[pos:lo], a.magnitude[name].detach()[:, None] * v / v.norm(dim=1, keepdim=True)]
            pos = hi
        rows.append(w[pos:])
        weights[f"{path}.weight"] = torch.cat(rows)
        ref_biases[f"{path}.bias"] = ref_model.get_parameter(f"{path}.bias").detach().clone().requires_grad_(True)
    (ref_forward("timm", ref_model, {**weights, **ref_biases}, x) * probe).sum().backward()
    for k, b in biases.items():
        ref = ref_biases[k].grad
        torch.testing.assert_close(b.grad, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


class _EncodeImage(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, x):
        return self.m.encode_image(x)


def ref_forward(backbone: str, model, weights: dict, x: torch.Tensor) -> torch.Tensor:
    """The untouched backbone's own forward with ``weights`` substituted."""
    if backbone == "timm":
        return functional_call(model, weights, (x,), strict=False)
    return functional_call(_EncodeImage(model), {f"m.{k}": v for k, v in weights.items()}, (x,), strict=False)


def test_dropout_only_on_the_lora_branch():
    """With B = 0 the LoRA branch vanishes, so dropout must not change the output (the base output is rescaled
    undropped)."""
    model, x = tiny_vit(), images()
    with torch.no_grad():
        y0 = model(x)
    pm = vpeft.get_peft_model(model, [DoRAConfig(dropout=0.5)]).train()
    with torch.no_grad():
        assert rel_err(pm(x), y0) < 1e-5


# --- merge / unmerge --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", BACKBONES)
def test_merge_is_exact_and_unmerge_restores_weights(backbone):
    make, fwd, targets = BACKBONES[backbone]
    model, x = make(), images()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    pm = vpeft.get_peft_model(model, [DoRAConfig(r=4, alpha=8, targets=targets)])
    perturb(pm)
    (path, a), *_ = dora_adapters(pm)
    with torch.no_grad():
        (a.magnitude[next(iter(a.slices))])[0] = 0.0  # a dead channel: m / n = 0 cannot be inverted
        y = fwd(pm, x)
        pm.merge()
        y_merged = fwd(pm, x)
    assert rel_err(y_merged, y) < 1e-5
    for path, a in dora_adapters(pm):  # bias unchanged, rows outside the adapted slices unchanged
        wname = weight_name(pm, path)
        bname = wname.replace("weight", "bias")
        torch.testing.assert_close(pm.base_model.get_parameter(bname), original[bname], rtol=0, atol=0)
        covered = torch.zeros(original[wname].shape[0], dtype=torch.bool)
        for lo, hi in a.slices.values():
            covered[lo:hi] = True
        assert torch.equal(pm.base_model.get_parameter(wname)[~covered], original[wname][~covered])
    keys_merged = set(pm.adapter_state_dict())

    pm.unmerge()
    for k, v in pm.unload().state_dict().items():
        assert (v - original[k]).abs().max() <= 1e-6 * max(original[k].abs().max().item(), 1.0), k
    assert all(".dora." in k for k in keys_merged)


def test_merge_and_unload_gives_plain_model_with_the_adapted_function():
    model, x = tiny_vit(), images()
    pm = vpeft.get_peft_model(model, [DoRAConfig(targets=["q", "k", "v", "attn_out"])])
    perturb(pm)
    with torch.no_grad():
        y = pm(x)
        plain = pm.merge_and_unload()
        assert not any(isinstance(m, vpeft.AdapterLayer) for m in plain.modules())
        assert rel_err(plain(x), y) < 1e-5


def test_adapter_save_load_roundtrip(tmp_path):
    model, x = tiny_vit(), images()
    pm = vpeft.get_peft_model(model, [DoRAConfig()])
    perturb(pm)
    with torch.no_grad():
        y = pm(x)
    pm.save_adapter(str(tmp_path / "dora"))
    pm2 = vpeft.PeftModel.from_pretrained(tiny_vit(), str(tmp_path / "dora"))
    with torch.no_grad():
        torch.testing.assert_close(pm2(x), y)


# --- memory: what autograd saves ------------------------------------------------------------------------------------


def saved_bytes(fn, exclude=frozenset()) -> int:
    """Bytes of the distinct storages autograd saves while ``fn()`` runs (the result is kept alive meanwhile),
    leaving out the storages whose data pointers are in ``exclude`` (parameters: resident anyway)."""
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in exclude:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    total = sum(seen.values())
    del out
    return total


def _layer_saved(backbone: str, cfg, batch: int, x_requires_grad: bool):
    """Saved bytes of one forward of block 0's adapted layer, that adapter's slices, and the layer's output
    width."""
    make = BACKBONES[backbone][0]
    pm = vpeft.get_peft_model(make(), [cfg])
    path, layer = next((p, lay) for p, lay in pm.adapter_layers().items() if ".0." in p)
    x = torch.randn(batch, 17, 64, requires_grad=x_requires_grad)
    if backbone == "timm":
        call = lambda: layer(x)  # noqa: E731
    else:  # nn.MultiheadAttention (batch_first) called the way open_clip's residual block calls it
        call = lambda: layer(x, x, x, need_weights=False)[0]  # noqa: E731
    adapter = getattr(layer, layer.adapter_keys[0])
    out_width = pm.base_model.get_parameter(weight_name(pm, path)).shape[0]
    params = frozenset(p.untyped_storage().data_ptr() for p in pm.parameters())
    return saved_bytes(call, params), dict(adapter.slices), out_width


@pytest.mark.parametrize("backbone,targets", [("timm", ["q"]), ("timm", ["q", "v"]), ("timm", ["mlp_in"]),
                                              ("timm", ["q", "k", "v"]), ("open_clip", ["q", "v"])])
@pytest.mark.parametrize("x_requires_grad", [True, False])
def test_saves_only_what_lora_saves_plus_per_channel_vectors(backbone, targets, x_requires_grad):
    """DoRA - LoRA saved activation bytes (parameters excluded: resident anyway) <= one float32 per-channel vector
    (1 / n) per adapted slice, and independent of the batch: the output-sized term of the magnitude's gradient is
    recomputed in backward, not saved. Nothing weight-sized either (weights are parameters)."""
    batch = 2
    diffs = {}
    for b in (batch, 2 * batch):
        lora, _, _ = _layer_saved(backbone, vpeft.LoraConfig(r=4, targets=targets), b, x_requires_grad)
        dora, slices, _ = _layer_saved(backbone, DoRAConfig(r=4, targets=targets), b, x_requires_grad)
        diffs[b] = dora - lora
    vec_bytes = sum((hi - lo) * 4 for lo, hi in slices.values())
    assert 0 <= diffs[batch] <= vec_bytes
    assert diffs[2 * batch] == diffs[batch]
