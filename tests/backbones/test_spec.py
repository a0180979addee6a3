"""``get_spec``: semantic sites resolve to the right module paths, kinds and q/k/v slices on tiny timm and open_clip
backbones (both packed-attention layouts), and LoRA through vpeft's re-implemented attention equals LoRA merged by
hand into the original weights."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _backbone_helpers import (
    CLIP,
    CLIP_CUSTOM,
    CLIP_CUSTOM_TEXT,
    CLIP_NORMFORMER,
    CLIP_QK_NORM,
    TIMM_ARCH,
    TIMM_KW,
    WIDTH,
    images,
    make_clip,
    make_timm,
    randomize_,
    tokens,
)

import vpeft

D = WIDTH
SLICES = {"q": (0, D), "k": (D, 2 * D), "v": (2 * D, 3 * D)}


def _paths(sites) -> list[str]:
    return [s.path for s in sites]


def _check_block_sites(model, spec, tower: str, prefix: str, attn_kind: str, names: dict[str, str]) -> None:
    """Every per-block site of ``tower`` resolves on both blocks to ``prefix + <block path> + names[site]``."""
    q = f"{tower}." if tower else ""
    for i in range(2):
        assert model.get_submodule(f"{prefix}{i}") is model.get_submodule(prefix.rstrip("."))[i]
    for site, rel in names.items():
        sites = spec.resolve(model, q + site)
        assert [s.layer for s in sites] == [0, 1]
        assert {s.tower for s in sites} == {tower}
        assert _paths(sites) == [f"{prefix}{i}{rel}" for i in range(2)], site
        kinds = {s.kind for s in sites}
        if site == "block":
            assert kinds == {"block"}
        elif site.startswith("norm"):
            assert kinds == {"norm"} and all(isinstance(model.get_submodule(p), nn.LayerNorm) for p in _paths(sites))
        elif site == "mlp":  # the whole MLP module: its input is the norm2 output, its output what the residual adds
            assert kinds == {"other"} and all(model.get_submodule(p) is model.get_submodule(p.rsplit(".", 1)[0]).mlp
                                              for p in _paths(sites))
        elif site in ("q", "k", "v", "qkv"):
            assert kinds == {attn_kind}
            assert {s.out_slice for s in sites} == {SLICES.get(site)}
        else:
            assert kinds == {"linear"} and all(isinstance(model.get_submodule(p), nn.Linear) for p in _paths(sites))


# --- timm ------------------------------------------------------------------------------------------------------------


def test_timm_vit_spec():
    model = make_timm(num_classes=5)
    spec = vpeft.get_spec(model)
    assert spec.family == "timm_vit" and list(spec.towers) == [""]
    tower = spec.towers[""]
    assert (tower.depth, tower.width, tower.num_heads, tower.num_prefix_tokens) == (2, 64, 4, 1)
    _check_block_sites(model, spec, "", "blocks.", "linear", {
        "block": "", "norm1": ".norm1", "q": ".attn.qkv", "k": ".attn.qkv", "v": ".attn.qkv", "qkv": ".attn.qkv",
        "attn_out": ".attn.proj", "norm2": ".norm2", "mlp": ".mlp", "mlp_in": ".mlp.fc1", "mlp_out": ".mlp.fc2"})
    (emb,), (fin,), (head,) = (spec.resolve(model, n) for n in ("embed", "final_norm", "head"))
    assert (emb.path, emb.kind, emb.layer) == ("patch_embed.proj", "conv", None)
    assert (fin.path, fin.kind) == ("norm", "norm")
    assert (head.path, head.kind) == ("head", "linear")
    assert all(s.host is None for n in ("q", "attn_out") for s in spec.resolve(model, n))


def test_timm_qk_slices_are_what_timm_attends_with():
    """The q and k slices of the fused qkv output are the tensors timm's attention feeds to q_norm / k_norm."""
    model = make_timm(qk_norm=True)
    spec = vpeft.get_spec(model)
    attn = model.blocks[1].attn
    seen = {}
    hooks = [attn.q_norm.register_forward_hook(lambda m, i, o: seen.__setitem__("q", i[0])),
             attn.k_norm.register_forward_hook(lambda m, i, o: seen.__setitem__("k", i[0])),
             model.blocks[1].norm1.register_forward_hook(lambda m, i, o: seen.__setitem__("x", o))]
    model(images())
    for h in hooks:
        h.remove()
    for name in ("q", "k"):
        (site,) = spec.resolve(model, name, layers=[1])
        a, b = site.out_slice
        y = F.linear(seen["x"], attn.qkv.weight[a:b], attn.qkv.bias[a:b])
        torch.testing.assert_close(seen[name], y.unflatten(-1, (4, 16)).transpose(1, 2), rtol=0, atol=1e-6)


def test_timm_spec_registered_without_create_backbone():
    import timm

    model = timm.create_model(TIMM_ARCH, **TIMM_KW)  # built by timm directly: get_spec must still know it
    assert vpeft.get_spec(model).family == "timm_vit"


@pytest.mark.parametrize("call, pieces", [
    (lambda spec, m: spec.resolve(m, "qq"), ["'qq'", "available sites", "mlp_in", "final_norm"]),
    (lambda spec, m: spec.resolve(m, "text.q"), ["'text'", "towers"]),
    (lambda spec, m: spec.resolve(m, "q", towers=["visual"]), ["'visual'", "towers"]),
    (lambda spec, m: spec.resolve(m, "q", layers=[2]), ["2", "0..1", "-2..-1"]),
    (lambda spec, m: spec.resolve(m, "v", layers=[-3]), ["-3", "0..1", "-2..-1"]),
], ids=["site", "tower", "towers-arg", "layer", "negative-layer"])
def test_timm_resolve_errors(call, pieces):
    model = make_timm()
    with pytest.raises(ValueError) as err:
        call(vpeft.get_spec(model), model)
    for p in pieces:
        assert p in str(err.value), (p, str(err.value))


def test_resolve_layers_subset():
    model = make_timm()
    spec = vpeft.get_spec(model)
    assert _paths(spec.resolve(model, "mlp_in", layers=[-1])) == ["blocks.1.mlp.fc1"]
    assert _paths(spec.resolve(model, "q", layers=[1, 0, -1])) == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]


# --- open_clip -------------------------------------------------------------------------------------------------------

OC_BLOCK = {"block": "", "norm1": ".ln_1", "q": ".attn", "k": ".attn", "v": ".attn", "qkv": ".attn",
            "attn_out": ".attn.out_proj", "norm2": ".ln_2", "mlp": ".mlp", "mlp_in": ".mlp.c_fc",
            "mlp_out": ".mlp.c_proj"}


@pytest.mark.parametrize("arch", [CLIP, CLIP_QK_NORM, CLIP_CUSTOM, CLIP_CUSTOM_TEXT, CLIP_NORMFORMER])
def test_open_clip_spec(arch):
    from open_clip.transformer import Attention

    model = make_clip(arch)
    text_prefix = "text." if arch == CLIP_CUSTOM_TEXT else ""
    attn_type = nn.MultiheadAttention if arch in (CLIP, CLIP_CUSTOM_TEXT) else Attention
    assert isinstance(model.visual.transformer.resblocks[0].attn, attn_type)
    assert isinstance(model.get_submodule(f"{text_prefix}transformer.resblocks.1.attn"), attn_type)

    spec = vpeft.get_spec(model)
    assert spec.family == "open_clip" and set(spec.towers) == {"visual", "text"}
    assert spec.default_towers == ("visual",)
    vis, txt = spec.towers["visual"], spec.towers["text"]
    assert (vis.depth, vis.width, vis.num_heads, vis.num_prefix_tokens, vis.causal) == (2, 64, 4, 1, False)
    assert (txt.depth, txt.width, txt.num_heads, txt.num_prefix_tokens, txt.causal) == (2, 64, 4, 0, True)
    _check_block_sites(model, spec, "visual", "visual.transformer.resblocks.", "packed_attn", OC_BLOCK)
    _check_block_sites(model, spec, "text", f"{text_prefix}transformer.resblocks.", "packed_attn", OC_BLOCK)

    # Unqualified names mean the image tower; "text.q" the text tower; towers= both.
    assert _paths(spec.resolve(model, "q")) == [f"visual.transformer.resblocks.{i}.attn" for i in range(2)]
    assert [s.tower for s in spec.resolve(model, "q", towers=["visual", "text"])] == ["visual"] * 2 + ["text"] * 2
    for tower, prefix in (("visual", "visual."), ("text", text_prefix)):
        host = [s.host for s in spec.resolve(model, f"{tower}.attn_out")]
        assert host == [f"{prefix}transformer.resblocks.{i}.attn" for i in range(2)]
    globals_ = {"embed": ("visual.conv1", "conv"), "pre_norm": ("visual.ln_pre", "norm"),
                "final_norm": ("visual.ln_post", "norm"), "text.embed": (f"{text_prefix}token_embedding", "embed"),
                "text.final_norm": (f"{text_prefix}ln_final", "norm")}
    for name, (path, kind) in globals_.items():
        (site,) = spec.resolve(model, name)
        assert (site.path, site.kind, site.layer) == (path, kind, None), name
        model.get_submodule(path)


def test_open_clip_custom_attention_slices():
    """q/k slices of the raw in_proj_weight are what open_clip's Attention normalises with ln_q / ln_k."""
    model = make_clip(CLIP_QK_NORM)
    spec = vpeft.get_spec(model)
    attn = model.visual.transformer.resblocks[0].attn
    seen = {}
    hooks = [attn.ln_q.register_forward_hook(lambda m, i, o: seen.__setitem__("q", i[0])),
             attn.ln_k.register_forward_hook(lambda m, i, o: seen.__setitem__("k", i[0])),
             model.visual.transformer.resblocks[0].ln_1.register_forward_hook(
                 lambda m, i, o: seen.__setitem__("x", o))]
    model.encode_image(images())
    for h in hooks:
        h.remove()
    for name in ("q", "k"):
        (site,) = spec.resolve(model, name, layers=[0])
        a, b = site.out_slice
        y = F.linear(seen["x"], attn.in_proj_weight[a:b], attn.in_proj_bias[a:b])
        torch.testing.assert_close(seen[name], y.unflatten(-1, (4, 16)).transpose(1, 2), rtol=0, atol=1e-6)


def test_open_clip_visual_tower_alone():
    model = make_clip(CLIP).visual
    spec = vpeft.get_spec(model)
    assert spec.family == "open_clip_visual" and list(spec.towers) == [""]
    _check_block_sites(model, spec, "", "transformer.resblocks.", "packed_attn", OC_BLOCK)
    assert _paths(spec.resolve(model, "final_norm")) == ["ln_post"]
    assert _paths(spec.resolve(model, "embed")) == ["conv1"]
    with pytest.raises(ValueError, match="has no tower 'text'"):
        spec.resolve(model, "text.q")


@pytest.mark.parametrize("name, kw, pieces", [
    ("audio.q", {}, ["'audio'", "['text', 'visual']"]),
    ("q", {"towers": ["audio"]}, ["'audio'", "visual", "text"]),
    ("head", {}, ["'head'", "available sites", "visual.q", "text.final_norm"]),
    ("text.pre_norm", {}, ["'text.pre_norm'", "available sites", "visual.pre_norm"]),
    ("text.q", {"layers": [2]}, ["2", "0..1"]),
], ids=["tower", "towers-arg", "site", "text-site", "layer"])
def test_open_clip_resolve_errors(name, kw, pieces):
    model = make_clip(CLIP)
    with pytest.raises(ValueError) as err:
        vpeft.get_spec(model).resolve(model, name, **kw)
    for p in pieces:
        assert p in str(err.value), (p, str(err.value))


def test_unsupported_model_is_a_type_error():
    with pytest.raises(TypeError, match="no backbone spec for model class torch.nn.modules.linear.Linear"):
        vpeft.get_spec(nn.Linear(2, 2))


# --- LoRA through the spec equals LoRA merged by hand ----------------------------------------------------------------

R, ALPHA = 4, 8.0  # scaling alpha / r = 2


def _merge_by_hand(original: nn.Module, pm) -> tuple[nn.Module, int]:
    """A deep copy of the untouched backbone with ``(alpha / r) * B @ A`` added into the rows of the q and v
    projections (first and last thirds of ``in_proj_weight`` / fused ``qkv.weight``) and into ``out_proj.weight``."""
    ref = copy.deepcopy(original)
    n = 0
    with torch.no_grad():
        for path, layer in pm.adapter_layers().items():
            for _, adapter in layer.adapters():
                for name in adapter.lora_A:
                    delta = (ALPHA / R) * adapter.lora_B[name] @ adapter.lora_A[name]
                    target = ref.get_submodule(path)
                    if name == "w":
                        target.weight += delta
                    else:
                        a, b = SLICES[name]
                        w = target.in_proj_weight if hasattr(target, "in_proj_weight") else target.weight
                        w[a:b] += delta
                    n += 1
    return ref, n


BOTH_TOWERS = ["q", "v", "attn_out", "text.q", "text.v", "text.attn_out"]
CASES = {  # name: (backbone, LoRA targets, updates expected: towers x layers x sites)
    "timm": (lambda: make_timm(), ["q", "v", "attn_out"], 1 * 2 * 3),
    "clip-mha": (lambda: make_clip(CLIP), BOTH_TOWERS, 2 * 2 * 3),
    "clip-custom-attention": (lambda: make_clip(CLIP_CUSTOM), BOTH_TOWERS, 2 * 2 * 3),
    "clip-custom-qknorm": (lambda: make_clip(CLIP_QK_NORM), BOTH_TOWERS, 2 * 2 * 3),
    "clip-custom-normformer": (lambda: make_clip(CLIP_NORMFORMER), BOTH_TOWERS, 2 * 2 * 3),
    "customtextclip-mha": (lambda: make_clip(CLIP_CUSTOM_TEXT), BOTH_TOWERS, 2 * 2 * 3),
}


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("case", list(CASES))
def test_lora_equals_weights_merged_by_hand(case, mode):
    build, targets, n_expected = CASES[case]
    # Frozen like the backbone inside a PeftModel: PyTorch picks kernels by requires_grad even under no_grad
    # (nn.MultiheadAttention's fast path; matmul folding for the transposed text-tower input), so a trainable copy
    # of the same weights differs from a frozen one by ~1e-7 and "disabled equals base" holds against a frozen base.
    original = randomize_(build()).requires_grad_(False)  # random norms, biases, head scales: all exercised
    pm = vpeft.get_peft_model(copy.deepcopy(original), vpeft.LoraConfig(r=R, alpha=ALPHA, targets=targets))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    ref, n = _merge_by_hand(original, pm)
    assert n == n_expected  # one update per (tower, layer, site)
    for m in (pm, ref, original):
        m.train(mode == "train")
    x = images()
    runs = [lambda m: m(x)] if case == "timm" else [lambda m: m.encode_image(x), lambda m: m.encode_text(tokens())]
    for run in runs:
        expected = run(ref)
        got = run(pm)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, run(original), atol=1e-3)  # the update is not a no-op
        with pm.disabled():
            assert torch.equal(run(pm), run(original))
