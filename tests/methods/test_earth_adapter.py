"""Earth-Adapter numerics: the frequency split against explicit DFT projection matrices (and on pure low / high
frequency inputs), the whole forward against a hand-written reference of the formula hooked onto an untouched timm ViT
(class + register tokens, a non-square grid) and open_clip image tower, prefix tokens passing through, frequency
experts only on ``frequency_layers``, the parameter formula (tiny and ViT-B/16), identity with ``zero_init``, merge
refused, and bad configs / the text tower refused before any mutation."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_clip, make_timm, randomize_adapters, rel_err

import vpeft
from vpeft.methods.earth_adapter import EarthAdapterConfig, frequency_split
from vpeft.methods.layers import AdapterLayer

IMG = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


# --- an independent frequency split: real DFT projection matrices ----------------------------------------------------


def low_pass_matrix(n: int, r: int) -> torch.Tensor:
    """``P[j, k] = 1/n sum_{f in band} cos(2 pi f (j - k) / n)`` over one representative per DFT bin with |f| <= r:
    the real projection of a length-``n`` signal onto its frequencies ``|f| <= r``."""
    j = torch.arange(n, dtype=torch.float64)
    d = j[:, None] - j[None, :]
    band = [f for f in range(-((n - 1) // 2), n // 2 + 1) if abs(f) <= r]
    return sum(torch.cos(2 * math.pi * f * d / n) for f in band) / n


def ref_low(grid: torch.Tensor, rh: int, rw: int) -> torch.Tensor:
    """Low-pass of ``(B, H, W, C)`` features applied as ``P_H X P_W^T`` per channel, in float64."""
    ph, pw = low_pass_matrix(grid.shape[1], rh), low_pass_matrix(grid.shape[2], rw)
    return torch.einsum("ij,kl,bjlc->bikc", ph, pw, grid.double())


@pytest.mark.parametrize("h, w, ratio, rh, rw", [
    (4, 4, 0.3, 0, 0),   # floor(0.6) = 0: the mean alone (the tiny models' grid at the default ratio)
    (4, 4, 0.5, 1, 1),
    (6, 5, 0.7, 2, 1),   # non-square, odd width
    (8, 8, 1.0, 4, 4),   # every bin low, Nyquist included
    (32, 32, 0.3, 4, 4),  # the reference's DINOv2 grid: 9 bins per axis
])
def test_frequency_split_matches_dft_projection(h, w, ratio, rh, rw):
    x = torch.randn(2, h, w, 3, generator=torch.Generator().manual_seed(0))
    low, high = frequency_split(x, ratio)
    expect = ref_low(x, rh, rw)
    torch.testing.assert_close(low.double(), expect, rtol=0, atol=1e-5)
    torch.testing.assert_close((low + high).double(), x.double(), rtol=0, atol=1e-6)
    if ratio == 1.0:
        assert high.abs().max() < 1e-5


def test_pure_frequencies_land_in_their_band():
    h, w = 8, 6
    i = torch.arange(h, dtype=torch.float32)[:, None, None]
    k = torch.arange(w, dtype=torch.float32)[None, :, None]
    amp = torch.tensor([1.0, -2.0, 0.5])
    smooth = (3.0 + torch.cos(2 * math.pi * i / h) + torch.sin(2 * math.pi * k / w)) * amp  # |f| <= 1 on both axes
    low, high = frequency_split(smooth[None], 0.5)  # keeps |f| <= 2 (h) and |f| <= 1 (w)
    torch.testing.assert_close(low[0], smooth, rtol=0, atol=1e-5)
    assert high.abs().max() < 1e-5
    checker = (-1.0) ** (i + k) * amp  # the Nyquist frequency on both axes
    low, high = frequency_split(checker[None], 0.5)
    assert low.abs().max() < 1e-5
    torch.testing.assert_close(high[0], checker, rtol=0, atol=1e-5)
    low, _ = frequency_split(checker[None].to(torch.bfloat16), 0.5)  # half precision goes through float32
    assert low.dtype == torch.bfloat16 and low.abs().max() < 1e-2


# --- the whole forward against a hand-written reference ---------------------------------------------------------------


def reference_hook(params: dict, prefix: str, num_prefix: int, grid: tuple[int, int], ratio: float, experts):
    """A forward hook implementing T' = T + s * sum_e softmax(W_r T + b_r)_e A_e(T_e) on a block's output."""
    h, w = grid
    r = (math.floor(ratio * h / 2 + 1e-9), math.floor(ratio * w / 2 + 1e-9))

    def p(name):
        return params[f"{prefix}.{name}"].double()

    def hook(module, args, y):
        y64 = y.double()
        t = y64[:, num_prefix:]
        low = ref_low(t.reshape(t.shape[0], h, w, -1), *r).reshape(t.shape)
        inputs = {"spatial": t, "low": low, "high": t - low}
        outs = [torch.relu(inputs[e] @ p(f"experts.{e}.down.weight").T + p(f"experts.{e}.down.bias"))
                @ p(f"experts.{e}.up.weight").T + p(f"experts.{e}.up.bias") for e in experts]
        if len(experts) > 1:
            logits = t @ p("router.weight").T + p("router.bias")
            wts = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
            mix = sum(wts[..., i:i + 1] * o for i, o in enumerate(outs))
        else:
            mix = outs[0]
        out = torch.cat([y64[:, :num_prefix], t + p("scale") * mix], dim=1)
        return out.to(y.dtype)

    return hook


CASES = {
    # name: (builder, run, block path template, blocks of the fresh model, grid)
    "timm": (lambda: make_timm(), lambda m, x: m(x), "blocks.{i}", lambda m: m.blocks, (4, 4)),
    "timm_registers_nonsquare": (lambda: make_timm(reg_tokens=2, img_size=(32, 48)), lambda m, x: m(x), "blocks.{i}",
                                 lambda m: m.blocks, (4, 6)),
    "clip_visual": (make_clip, lambda m, x: m.encode_image(x), "visual.transformer.resblocks.{i}",
                    lambda m: m.visual.transformer.resblocks, (4, 4)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("freq_layers", [None, [-1]])
def test_forward_matches_reference(case, freq_layers):
    build, run, path, blocks, grid = CASES[case]
    x = IMG if grid == (4, 4) else torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(3))
    towers = ["visual"] if case == "clip_visual" else None
    cfg = EarthAdapterConfig(dim=8, cutoff_ratio=0.5, frequency_layers=freq_layers, towers=towers)
    pm = vpeft.get_peft_model(build(), cfg)
    randomize_adapters(pm, std=0.2)
    params = pm.adapter_state_dict()
    with torch.no_grad():
        y = run(pm, x)

    ref_model = build()
    num_prefix = getattr(ref_model, "num_prefix_tokens", 1)
    assert num_prefix == (3 if "registers" in case else 1)
    depth = len(blocks(ref_model))
    for i, blk in enumerate(blocks(ref_model)):
        experts = ["spatial", "low", "high"] if freq_layers is None or i == depth - 1 else ["spatial"]
        blk.register_forward_hook(reference_hook(params, f"{path.format(i=i)}.earth_adapter", num_prefix, grid, 0.5,
                                                 experts))
    with torch.no_grad():
        y_ref = run(ref_model, x)
        y_base = run(build(), x)
    assert rel_err(y, y_ref) < 1e-5
    assert rel_err(y, y_base) > 1e-2  # the adapters matter


def test_prefix_tokens_pass_through_and_layout_kept():
    pm = vpeft.get_peft_model(make_timm(reg_tokens=2), EarthAdapterConfig())
    randomize_adapters(pm)
    blk = pm.base_model.blocks[0]
    t = torch.randn(2, 3 + 16, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y = blk(t)
        with pm.disabled():
            y0 = blk(t)
    assert y.shape == y0.shape
    assert torch.equal(y[:, :3], y0[:, :3])
    assert (y[:, 3:] - y0[:, 3:]).abs().min() > 0  # every patch token changes
    with pytest.raises(ValueError, match="neither the tower's"):  # 15 patch tokens: no grid
        blk(t[:, :-1])


# --- parameters, init, merge ------------------------------------------------------------------------------------------


def formula(c: int, r: int, experts: int, blocks: int, spatial_only: int = 0) -> int:
    mix = experts * (2 * c * r + r + c) + (experts * (c + 1) if experts > 1 else 0) + 1
    return blocks * mix + spatial_only * (2 * c * r + r + c + 1)


def test_parameter_count_matches_formula():
    pm = vpeft.get_peft_model(make_timm(), EarthAdapterConfig(dim=16))
    assert pm.num_parameters(trainable_only=True) == formula(64, 16, 3, 2)
    pm = vpeft.get_peft_model(make_clip(), EarthAdapterConfig(dim=4, experts=["low", "high"], towers=["visual"]))
    assert pm.num_parameters(trainable_only=True) == formula(64, 4, 2, 2)
    pm = vpeft.get_peft_model(make_timm(), EarthAdapterConfig(dim=8, frequency_layers=[1]))
    assert pm.num_parameters(trainable_only=True) == formula(64, 8, 3, 1, spatial_only=1)
    adapters = {p: a for p, layer in pm.adapter_layers().items() for _, a in layer.adapters()}
    spatial_only = vpeft.get_peft_model(make_timm(), EarthAdapterConfig(dim=8, frequency_layers=[]))
    assert spatial_only.num_parameters(trainable_only=True) == formula(64, 8, 3, 0, spatial_only=2)
    assert adapters["blocks.0"].router is None and list(adapters["blocks.0"].experts) == ["spatial"]
    assert list(adapters["blocks.1"].experts) == ["spatial", "low", "high"]
    with torch.device("meta"):  # ViT-B/16 without allocating it
        import timm

        vit_b = timm.create_model("vit_base_patch16_224")
        n = vpeft.get_peft_model(vit_b, EarthAdapterConfig()).num_parameters(trainable_only=True)
    assert n == formula(768, 16, 3, 12) == 940_656


def test_zero_init_is_identity_and_paper_init_is_not():
    y_base = make_timm()(IMG)
    pm = vpeft.get_peft_model(make_timm(), EarthAdapterConfig(zero_init=True))
    with torch.no_grad():
        assert torch.equal(pm(IMG), y_base)
    pm = vpeft.get_peft_model(make_timm(), EarthAdapterConfig())
    with torch.no_grad():
        assert not torch.equal(pm(IMG), y_base)
    scales = [a.scale.item() for layer in pm.adapter_layers().values() for _, a in layer.adapters()]
    assert scales == pytest.approx([0.1, 0.1])


def test_merge_refused():
    pm = vpeft.get_peft_model(make_timm(), EarthAdapterConfig())
    with pytest.raises(ValueError, match="not mergeable"):
        pm.merge()
    assert not pm.merged


# --- config -----------------------------------------------------------------------------------------------------------


def test_config_defaults_and_roundtrip():
    cfg = EarthAdapterConfig()
    assert (cfg.dim, cfg.cutoff_ratio, cfg.experts, cfg.frequency_layers, cfg.scale, cfg.zero_init) == \
        (16, 0.3, ["spatial", "low", "high"], None, 0.1, False)
    assert "earth_adapter" in vpeft.list_methods()
    cfg = EarthAdapterConfig(dim=8, experts=["spatial", "high"], frequency_layers=[-1], layers=[0, 1])
    assert vpeft.PeftConfig.from_dict(cfg.to_dict()) == cfg


BAD = [
    (dict(dim=0), "dim"), (dict(dim=True), "dim"), (dict(dim=2.0), "dim"),
    (dict(cutoff_ratio=0.0), "cutoff_ratio"), (dict(cutoff_ratio=1.5), "cutoff_ratio"),
    (dict(cutoff_ratio="0.3"), "cutoff_ratio"),
    (dict(experts=[]), "experts"), (dict(experts=["spatial", "mid"]), "experts"),
    (dict(experts=["low", "low"]), "experts"), (dict(experts="low"), "experts"),
    (dict(frequency_layers=[1], experts=["low", "high"]), "frequency_layers"),
    (dict(frequency_layers=[1], experts=["spatial"]), "frequency_layers"),
    (dict(frequency_layers=1), "frequency_layers"),
    (dict(scale=float("nan")), "scale"), (dict(zero_init=1), "zero_init"),
    (dict(targets=["mlp"]), "targets"),
    (dict(frequency_layers=[2]), "out of range"),
    (dict(layers=[0], frequency_layers=[1]), "gets no adapter"),
    (dict(towers=["text"]), "text tower"),
]


@pytest.mark.parametrize("kw, match", BAD, ids=[f"{i}-{m}" for i, (_, m) in enumerate(BAD)])
def test_bad_config_refused_before_mutation(kw, match):
    model = make_clip() if kw.get("towers") == ["text"] else make_timm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((ValueError, TypeError), match=match):
        vpeft.get_peft_model(model, EarthAdapterConfig(**kw))
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_towers_without_a_patch_grid_are_refused_before_mutation():
    """Point-cloud tokens (FPS groups) have no 2-D grid even when their count is a square."""
    model = vpeft.create_backbone("point_mae:base", num_group=16, group_size=16, embed_dim=64, depth=2, num_heads=4,
                                  num_classes=5, drop_path_rate=0.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="without a patch grid"):
        vpeft.get_peft_model(model, EarthAdapterConfig())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
