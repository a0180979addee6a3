"""NOLA numerics: LoRA factors as coefficient combinations of seeded random bases.

Checked against independent expectations: the update computed from the regenerated bases by an explicit sum, a plain
backbone with ``W + delta W`` written into its weights, the adapter file's exact key set and sizes, and parameter
counts from the formula ``k + l`` per adapted matrix."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import images, make_clip, make_timm, rel_err, tokens
from safetensors.torch import load_file, save_file

import vpeft
from vpeft.methods.layers import AdapterLayer
from vpeft.methods.nola import NOLAConfig
from vpeft.methods.peft_model import canonical_name

KA, KB = 48, 40  # small, unequal basis counts so that a swapped k / l would show


def run_clip(m, x):
    return torch.cat([m.encode_image(x), m.encode_text(tokens())])


CASES = {
    # name: (factory, forward, config kwargs) -- plain Linear sites on timm, packed q/v slices + out_proj on open_clip
    "timm": (make_timm, lambda m, x: m(x), dict(targets=["mlp_in", "mlp_out", "q", "v"])),
    "open_clip": (make_clip, run_clip, dict(targets=["q", "v", "attn_out", "mlp_in"], towers=["visual", "text"])),
}


def build(case: str, rng_seed: int = 0, **kw):
    factory, run, base_kw = CASES[case]
    cfg = NOLAConfig(r=2, num_basis_a=KA, num_basis_b=KB, **{**base_kw, **kw})
    model = factory(0)
    torch.manual_seed(rng_seed)  # the coefficient init draws from the global RNG; the bases must not
    return model, vpeft.get_peft_model(model, cfg), run


def perturb(pm, seed: int = 3) -> None:
    """beta starts at zero (delta W = 0): give every coefficient a random value so every term matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))


def adapters(pm):
    return [(path, a) for path, layer in pm.adapter_layers().items() for k, a in layer.adapters() if k == "nola"]


def weight_key(pm, path: str) -> str:
    return f"{path}.in_proj_weight" if hasattr(pm.base_model.get_submodule(path), "in_proj_weight") \
        else f"{path}.weight"


def expected_deltas(pm) -> dict[str, torch.Tensor]:
    """Weight key -> full-size delta, from the formula with an explicit sum over the bases held by the model."""
    bases = pm.shared["nola"]
    out = {}
    for path, a in adapters(pm):
        w = pm.base_model.get_submodule(path)
        w = w.in_proj_weight if hasattr(w, "in_proj_weight") else w.weight
        delta = torch.zeros(w.shape, dtype=torch.float64)
        basis_a = getattr(bases, f"basis_a_{w.shape[1]}").double()
        for name, (lo, hi) in a.slices.items():
            basis_b = getattr(bases, f"basis_b_{hi - lo}").double()
            A = sum(c * basis_a[i] for i, c in enumerate(a.nola_alpha[name].detach().double()))
            B = sum(c * basis_b[j] for j, c in enumerate(a.nola_beta[name].detach().double()))
            delta[lo:hi] = a.scaling * (B @ A)
        out[weight_key(pm, path)] = delta.float()
    return out


# --- config -------------------------------------------------------------------------------------------------------


def test_config_defaults_roundtrip_and_validation():
    cfg = NOLAConfig()
    assert (cfg.r, cfg.num_basis_a, cfg.num_basis_b, cfg.alpha, cfg.dropout, cfg.seed) == (4, 1024, 1024, 1.0, 0.0, 0)
    assert cfg.scaling == pytest.approx(0.25)
    assert "nola" in vpeft.list_methods()
    d = NOLAConfig(r=2, seed=7, targets=["q"]).to_dict()
    assert d["method"] == "nola" and vpeft.PeftConfig.from_dict(d) == NOLAConfig(r=2, seed=7, targets=["q"])
    for bad in (dict(r=0), dict(r=True), dict(num_basis_a=0), dict(num_basis_b=2.0), dict(dropout=1.0),
                dict(seed=-1), dict(seed=2 ** 63), dict(seed=1.5)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            NOLAConfig(**bad).validate()
    with pytest.raises(TypeError, match="alpha"):
        NOLAConfig(alpha="1").validate()


def test_vit_b16_parameter_count_from_formula():
    import timm

    import vpeft.backbones.timm_vit  # noqa: F401

    with torch.device("meta"):  # shapes only: no weights are allocated
        model = timm.create_model("vit_base_patch16_224")
    pm = vpeft.get_peft_model(model, NOLAConfig())
    assert pm.num_parameters(trainable_only=True) == 12 * 2 * (1024 + 1024) == 49_152
    # One basis set per distinct width: A bases for in in {768, 3072}, B bases for out in {3072, 768}.
    assert sum(b.numel() for n, b in pm.shared["nola"].named_buffers() if n != "seed") == 1024 * 4 * (768 + 3072) * 2


# --- parameters, init ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_trainable_parameters_are_the_coefficients(case):
    model, pm, _ = build(case)
    n_slices = sum(len(a.slices) for _, a in adapters(pm))
    trainable = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    assert pm.num_parameters(trainable_only=True) == n_slices * (KA + KB)
    assert all(".nola_alpha." in n or ".nola_beta." in n for n in trainable)
    assert not any(b.requires_grad for b in pm.shared.buffers())
    # timm: 2 blocks x (mlp_in, mlp_out, q, v); open_clip: 2 towers x 2 blocks x (q, v, attn_out, mlp_in).
    assert n_slices == (8 if case == "timm" else 16)


@pytest.mark.parametrize("case", list(CASES))
def test_starts_at_the_backbone(case):
    model, pm, run = build(case)
    x = images()
    with torch.no_grad():
        y = run(pm, x)
        with pm.disabled():
            y0 = run(pm, x)
    assert rel_err(y, y0) < 1e-6  # beta = 0, so B = 0 and delta W = 0
    for _, a in adapters(pm):
        for name in a.slices:
            assert torch.count_nonzero(a.nola_beta[name]) == 0 and a.nola_alpha[name].abs().sum() > 0


def test_only_beta_gets_gradient_at_init_then_both():
    _, pm, run = build("timm")
    pm.train()
    run(pm, images()).square().mean().backward()
    for _, a in adapters(pm):
        for name in a.slices:
            assert torch.count_nonzero(a.nola_alpha[name].grad) == 0  # dL/dalpha goes through B = 0
            assert a.nola_beta[name].grad.abs().sum() > 0


# --- forward and merge against the formula ------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_forward_equals_backbone_with_formula_delta(case):
    model, pm, run = build(case)
    perturb(pm)
    x = images()
    with torch.no_grad():
        y = run(pm, x)
    # A plain backbone (no vpeft code in its forward) whose weights get the independently computed delta.
    ref = CASES[case][0](0)
    sd = ref.state_dict()
    deltas = expected_deltas(pm)
    for k, d in deltas.items():
        sd[k] = sd[k] + d
    ref.load_state_dict(sd)
    ref.requires_grad_(False)
    with torch.no_grad():
        y_ref = run(ref, x)
    assert rel_err(y, y_ref) < 1e-5
    assert not torch.allclose(y, run(CASES[case][0](0), x), atol=1e-3)


@pytest.mark.parametrize("case", list(CASES))
def test_merge_exact_delta_and_unmerge_restores(case):
    model, pm, run = build(case)
    perturb(pm)
    x = images()
    plain = CASES[case][0](0).state_dict()  # the backbone's own keys and values
    before = {canonical_name(k): v.clone() for k, v in model.state_dict().items()}
    assert all(torch.equal(before[k], plain[k]) for k in plain)
    deltas = expected_deltas(pm)
    with torch.no_grad():
        y = run(pm, x)
        pm.merge()
        y_m = run(pm, x)
    assert rel_err(y_m, y) < 1e-5
    merged = {canonical_name(k): v for k, v in pm.base_model.state_dict().items()}
    for k, d in deltas.items():
        torch.testing.assert_close(merged[k] - before[k], d, atol=1e-6, rtol=1e-4)
    pm.unmerge()
    restored = pm.unload().state_dict()
    assert list(restored) == list(plain)
    for k, v in restored.items():
        torch.testing.assert_close(v, plain[k], atol=1e-6, rtol=0)


# --- adapter file: coefficients and seed only; bases regenerated ---------------------------------------------------


def test_adapter_file_holds_only_coefficients_and_seed(tmp_path):
    _, pm, _ = build("timm")
    pm.save_adapter(str(tmp_path))
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    expect = {"_shared.nola.seed"}
    for path, a in adapters(pm):
        for name in a.slices:
            expect |= {f"{path}.nola.nola_alpha.{name}", f"{path}.nola.nola_beta.{name}"}
    assert set(saved) == expect
    seeds = [v for k, v in saved.items() if k.endswith(".seed")]
    assert len(seeds) == 1 and seeds[0].dtype == torch.int64 and seeds[0].tolist() == [0]
    for k, v in saved.items():
        if not k.endswith(".seed"):
            assert v.dim() == 1 and v.numel() == (KA if ".nola_alpha." in k else KB), k
    n_values = sum(v.numel() for v in saved.values())
    assert n_values == 8 * (KA + KB) + 1
    # The whole file is the coefficients (4 bytes each), one int64 seed and a small JSON header: no basis fits.
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    header = 4096  # generous bound on safetensors' JSON header for these 17 tensors
    assert size < 4 * n_values + header
    assert header < 4 * KA * 2 * 64  # ... and even the smallest basis set (the A bases of width 64) would not fit
    meta = json.loads((tmp_path / "vpeft_config.json").read_text())
    assert meta["methods"][0]["seed"] == 0 and meta["methods"][0]["num_basis_a"] == KA


@pytest.mark.parametrize("case", list(CASES))
def test_reload_into_fresh_model_with_other_global_seed(case, tmp_path):
    model, pm, run = build(case)
    perturb(pm)
    x = images()
    with torch.no_grad():
        y = run(pm, x)
    pm.save_adapter(str(tmp_path))
    fresh = CASES[case][0](0)
    torch.manual_seed(12345)  # a different global RNG state while the bases are rebuilt
    torch.rand(17)
    pm2 = vpeft.PeftModel.from_pretrained(fresh, str(tmp_path))
    with torch.no_grad():
        assert torch.equal(run(pm2, x), y)
    b1, b2 = dict(pm.shared["nola"].named_buffers()), dict(pm2.shared["nola"].named_buffers())
    assert set(b1) == set(b2) and all(torch.equal(b1[k], b2[k]) for k in b1)


def test_bases_depend_only_on_seed_and_shape():
    _, pm_a, _ = build("timm", rng_seed=0)
    _, pm_b, _ = build("timm", rng_seed=99)  # other global RNG state: different alpha init, same bases
    ba, bb = pm_a.shared["nola"], pm_b.shared["nola"]
    names = [n for n, _ in ba.named_buffers() if n.startswith("basis_")]
    assert sorted(names) == ["basis_a_256", "basis_a_64", "basis_b_256", "basis_b_64"]
    for n in names:
        assert torch.equal(getattr(ba, n), getattr(bb, n))
    # Different shapes get different bases; shapes and value ranges as documented.
    a64, b64 = ba.basis_a_64, ba.basis_b_64
    assert a64.shape == (KA, 2, 64) and b64.shape == (KB, 64, 2)
    assert a64.abs().max() <= 1 / math.sqrt(64) and b64.abs().max() <= 1 / math.sqrt(2)
    assert abs(a64.mean().item()) < 0.01 and a64.var().item() == pytest.approx(1 / (3 * 64), rel=0.1)
    assert len({tuple(a64[i].flatten()[:4].tolist()) for i in range(KA)}) == KA  # all distinct
    # Another config seed gives other bases.
    _, pm_d, _ = build("timm", seed=5)
    assert not torch.equal(pm_d.shared["nola"].basis_a_64, a64)
    # Not saved: the shared module's state dict is the seed alone.
    assert list(ba.state_dict()) == ["seed"]


def test_seed_in_file_is_authoritative(tmp_path):
    """A file whose seed differs from the config's rebuilds the bases from the file's seed."""
    _, pm, run = build("timm")
    perturb(pm)
    pm.save_adapter(str(tmp_path))
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors["_shared.nola.seed"] = torch.tensor([5], dtype=torch.int64)
    save_file(tensors, str(path), metadata={"format": "pt"})
    pm2 = vpeft.PeftModel.from_pretrained(make_timm(0), str(tmp_path))
    # The same coefficients on bases built directly from seed 5 (config seed 5, no reload involved).
    _, pm3, _ = build("timm", seed=5)
    pm3.load_adapter_state_dict(tensors)
    x = images()
    with torch.no_grad():
        y2, y3, y = run(pm2, x), run(pm3, x), run(pm, x)
    assert torch.equal(y2, y3) and not torch.allclose(y2, y, atol=1e-4)
    assert torch.equal(pm2.shared["nola"].basis_b_64, pm3.shared["nola"].basis_b_64)


# --- refusals -----------------------------------------------------------------------------------------------------


def test_bad_config_refused_before_mutation():
    model = make_timm(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"rank r=65 .*blocks\.0\.attn\.qkv"):
        vpeft.get_peft_model(model, NOLAConfig(r=65, targets=["q"]))
    with pytest.raises(ValueError, match="norm1"):
        vpeft.get_peft_model(model, NOLAConfig(targets=["norm1"]))
    with pytest.raises(ValueError, match="seed"):
        vpeft.get_peft_model(model, NOLAConfig(seed=-3))
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())
