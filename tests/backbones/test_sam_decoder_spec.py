"""The ``mask_decoder`` tower of the SAM spec: weight-delta methods on the attention projections of SAM's two-way mask
decoder (SAMed's "LoRA on the mask decoder" variant, hitachinsk/SAMed ``sam_lora_image_encoder_mask_decoder.py``).

Expectations are independent of vpeft's spec code: parameter counts from the official decoder's module shapes, and
outputs of the official decoder on a deep copy of the model whose ``q_proj``/``v_proj`` weights had
``(alpha / r) B A`` added by hand.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import vpeft
import vpeft.backbones.sam  # noqa: F401  (registers the "sam" family until vpeft.backbones imports it)
from vpeft.backbones import TowerSpec
from vpeft.methods.layers import AdapterLayer
from vpeft.methods.peft_model import canonical_name

#: A tiny encoder (64x64 images, a 4x4 token grid, 2 blocks of width 64); the decoder is the official full-size one.
TINY = dict(embed_dim=64, depth=2, num_heads=4, window_size=2, global_attn_indexes=(1,))
IMG = 64
R, ALPHA = 4, 8.0
ATTENTIONS = ["layers.0.self_attn", "layers.0.cross_attn_token_to_image", "layers.0.cross_attn_image_to_token",
              "layers.1.self_attn", "layers.1.cross_attn_token_to_image", "layers.1.cross_attn_image_to_token",
              "final_attn_token_to_image"]
DEC = [f"mask_decoder.transformer.{a}" for a in ATTENTIONS]
BOXES = torch.tensor([[5.0, 6.0, 40.0, 50.0], [0.0, 10.0, 30.0, 47.0]])
#: SAMed's trained decoder parts: everything of the decoder but its two-way transformer, and the prompt encoder.
SAMED_EXTRA = ["prompt_encoder", "mask_decoder.iou_token", "mask_decoder.mask_tokens", "mask_decoder.output_upscaling",
               "mask_decoder.output_hypernetworks_mlps", "mask_decoder.iou_prediction_head"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: SAM's decoder runs many tiny ops, which a second thread on a shared machine slows."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def base() -> nn.Module:
    """A random tiny SAM (never mutated: tests adapt deep copies)."""
    torch.manual_seed(0)
    return vpeft.backbones.sam.build_sam("vit_b", img_size=IMG, **TINY).eval().requires_grad_(False)


def images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return 255.0 * torch.rand(n, 3, IMG, 48, generator=torch.Generator().manual_seed(seed))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def lora_pm(base: nn.Module, targets=("mask_decoder.q", "mask_decoder.v"), **kw) -> vpeft.PeftModel:
    """LoRA on a copy of ``base`` with every A and B drawn at random (B non-zero, so the update is visible)."""
    pm = vpeft.get_peft_model(copy.deepcopy(base), vpeft.LoraConfig(r=R, alpha=ALPHA, targets=list(targets), **kw))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for t in pm.adapter_state_dict().values():
            t.copy_(0.1 * torch.randn(t.shape, generator=g))
    return pm


def run(model: nn.Module, **prompts) -> torch.Tensor:
    with torch.no_grad():
        out = model(images(), **prompts)
    return torch.cat([out.low_res_masks.flatten(1), out.iou_predictions], dim=1)


# --- spec ------------------------------------------------------------------------------------------------------------


def test_decoder_tower_sites(base):
    model = base
    spec = vpeft.get_spec(model)
    assert list(spec.towers) == ["image_encoder", "mask_decoder"] and spec.default_towers == ("image_encoder",)
    dec_names = [n for n in spec.available() if n.startswith("mask_decoder.")]
    assert dec_names == ["mask_decoder.q", "mask_decoder.k", "mask_decoder.v", "mask_decoder.attn_out"]
    tower = spec.towers["mask_decoder"]
    assert (tower.depth, tower.width, tower.num_heads, tower.attention, tower.block_site) == (7, 256, 8, "separate",
                                                                                                False)
    assert [tower.block_path(i) for i in range(7)] == DEC
    transformer = model.mask_decoder.transformer
    attns = [blk.get_submodule(a) for blk in transformer.layers for a in
             ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token")]
    attns.append(transformer.final_attn_token_to_image)
    for name, leaf in {"q": "q_proj", "k": "k_proj", "v": "v_proj", "attn_out": "out_proj"}.items():
        sites = spec.resolve(model, f"mask_decoder.{name}")
        assert [s.layer for s in sites] == list(range(7)) and {s.tower for s in sites} == {"mask_decoder"}
        assert [s.path for s in sites] == [f"{p}.{leaf}" for p in DEC]
        assert {(s.kind, s.out_slice, s.host) for s in sites} == {("linear", None, None)}
        assert all(model.get_submodule(s.path) is getattr(a, leaf) for s, a in zip(sites, attns))
    # Unqualified names keep meaning the image encoder.
    assert [s.path for s in spec.resolve(model, "q")] == [f"image_encoder.blocks.{i}.attn.qkv" for i in range(2)]
    (final,) = spec.resolve(model, "mask_decoder.v", layers=[-1])
    assert final.path == "mask_decoder.transformer.final_attn_token_to_image.v_proj" and final.layer == 6


@pytest.mark.parametrize("name", ["block", "qkv", "mlp_in", "mlp", "norm1", "embed"])
def test_sites_an_attention_tower_lacks_are_refused(base, name):
    with pytest.raises(ValueError, match=f"site 'mask_decoder.{name}' does not exist.*available sites:.*"
                                         r"'mask_decoder\.attn_out'"):
        vpeft.get_spec(base).resolve(base, f"mask_decoder.{name}")


@pytest.mark.parametrize("cfg", [
    vpeft.LoraConfig(r=R, targets=["mask_decoder.q", "mask_decoder.block"]),
    vpeft.LoraConfig(r=R, targets=["mask_decoder.qkv"]),
    vpeft.LoraConfig(r=R, targets=["mask_decoder.mlp_in"]),
    vpeft.VPTConfig(towers=["mask_decoder"]),
    vpeft.LSTConfig(towers=["mask_decoder"]),
    vpeft.AdaptFormerConfig(towers=["mask_decoder"]),
    vpeft.LoraConfig(r=R, targets=["mask_decoder.q"], layers=[7]),
], ids=["lora_block", "lora_qkv", "lora_mlp_in", "vpt", "lst", "adaptformer", "layer_7"])
def test_refused_before_the_model_changes(base, cfg):
    model = copy.deepcopy(base).requires_grad_(True)
    before = snapshot(model)
    with pytest.raises(ValueError, match="available sites|out of range"):
        vpeft.get_peft_model(model, cfg)
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_spec_reads_the_decoder_from_the_model(base):
    """A replaced decoder is the one described (SamSegmenter swaps it): a depth-1 two-way transformer gives four
    attention blocks; a decoder of another design gives no mask_decoder tower."""
    from segment_anything.modeling import MaskDecoder, TwoWayTransformer

    model = copy.deepcopy(base)
    model.mask_decoder = MaskDecoder(transformer_dim=256, transformer=TwoWayTransformer(
        depth=1, embedding_dim=256, mlp_dim=64, num_heads=4), num_multimask_outputs=3)
    spec = vpeft.get_spec(model)
    tower = spec.towers["mask_decoder"]
    assert (tower.depth, tower.num_heads) == (4, 4)
    assert [s.path for s in spec.resolve(model, "mask_decoder.q")] == [f"{p}.q_proj" for p in DEC[:3] + DEC[-1:]]
    model.mask_decoder = nn.Linear(2, 2)
    spec = vpeft.get_spec(model)
    assert list(spec.towers) == ["image_encoder"]
    with pytest.raises(ValueError, match="no tower 'mask_decoder'"):
        spec.resolve(model, "mask_decoder.q")


def test_tower_spec_checks():
    kw = dict(name="t", depth=2, width=8, num_heads=2, block_sites={"q": "q", "k": "k", "v": "v"})
    with pytest.raises(ValueError, match="attention must be one of"):
        TowerSpec(block="b.{i}", attention="split", **kw)
    with pytest.raises(ValueError, match="one path per block"):
        TowerSpec(block="", block_paths=("a",), attention="separate", **kw)
    with pytest.raises(ValueError, match="block=''"):
        TowerSpec(block="b.{i}", block_paths=("a", "b"), attention="separate", **kw)
    with pytest.raises(TypeError, match="tuple of str"):
        TowerSpec(block="", block_paths=["a", "b"], attention="separate", **kw)
    with pytest.raises(ValueError, match="no fused 'qkv'"):
        TowerSpec(block="b.{i}", attention="separate", **{**kw, "block_sites": {"qkv": "qkv"}})
    t = TowerSpec(block="", block_paths=("x.a", "y"), attention="separate", block_site=False, **kw)
    assert [t.block_path(0), t.block_path(1)] == ["x.a", "y"] and t.site_names() == ["q", "k", "v"]
    for bad in (2, -1, True):
        with pytest.raises(ValueError, match="out of range"):
            t.block_path(bad)
    fused = TowerSpec(block="b.{i}", **{**kw, "block_sites": {"attn": "attn", "qkv": "attn.qkv"}})
    assert fused.block_path(1) == "b.1" and fused.site_names() == ["block", "qkv", "q", "k", "v"]


# --- LoRA on the decoder ---------------------------------------------------------------------------------------------


def test_lora_parameter_count(base):
    """SAMed's decoder LoRA r=4 on q and v: r * (in + out) per projection, from the official module shapes; for
    SAM's decoder 2 x (self 2*4*(256+256) + two cross 2*4*(256+128)) + final 2*4*(256+128) = 23,552."""
    pm = vpeft.get_peft_model(copy.deepcopy(base), vpeft.LoraConfig(r=R, targets=["mask_decoder.q",
                                                                                  "mask_decoder.v"]))
    by_hand = sum(R * (lin.in_features + lin.out_features) for p in DEC
                  for lin in (base.get_submodule(p).q_proj, base.get_submodule(p).v_proj))
    assert pm.num_parameters(trainable_only=True) == by_hand == 2 * (4096 + 3072 + 3072) + 3072 == 23_552
    assert set(pm.adapter_layers()) == {f"{p}.{leaf}" for p in DEC for leaf in ("q_proj", "v_proj")}


def _merged_by_hand(base: nn.Module, pm: vpeft.PeftModel) -> nn.Module:
    """A deep copy of the base model with ``(alpha / r) B A`` added to each adapted projection's weight."""
    ref = copy.deepcopy(base)
    sd = pm.adapter_state_dict()
    paths = {k.split(".lora.")[0] for k in sd}
    with torch.no_grad():
        for p in paths:
            a, b = sd[f"{p}.lora.lora_A.w"], sd[f"{p}.lora.lora_B.w"]
            ref.get_submodule(p).weight += (ALPHA / R) * b @ a
    return ref


@pytest.mark.parametrize("prompts", [{}, {"boxes": BOXES}], ids=["prompt_free", "boxes"])
def test_lora_equals_weights_merged_by_hand(base, prompts):
    pm = lora_pm(base)
    ref = _merged_by_hand(base, pm)
    assert len({k.split(".lora.")[0] for k in pm.adapter_state_dict()}) == 14
    y, y_base = run(pm, **prompts), run(base, **prompts)
    assert rel(y, run(ref, **prompts)) < 1e-5 and rel(y, y_base) > 1e-3
    with pm.disabled():
        assert torch.equal(run(pm, **prompts), y_base)


def test_merge_unload_and_save_load(base, tmp_path):
    pm = lora_pm(base)
    y = run(pm, boxes=BOXES)
    pm.save_adapter(str(tmp_path / "dec-lora"))
    pm2 = vpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "dec-lora"))
    assert torch.equal(run(pm2, boxes=BOXES), y)
    merged = pm.merge_and_unload()
    assert list(merged.state_dict()) == list(base.state_dict())
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
    assert rel(run(merged, boxes=BOXES), y) < 1e-5
    restored = pm2.unload()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in restored.state_dict().items())


@pytest.mark.parametrize("layers, attn", [([6], "final_attn_token_to_image"), ([-1], "final_attn_token_to_image"),
                                          ([4], "layers.1.cross_attn_token_to_image")])
def test_layers_select_attention_modules(base, layers, attn):
    pm = lora_pm(base, layers=layers)
    p = f"mask_decoder.transformer.{attn}"
    assert set(pm.adapter_layers()) == {f"{p}.q_proj", f"{p}.v_proj"}
    assert pm.num_parameters(trainable_only=True) == 2 * R * (256 + base.get_submodule(p).internal_dim)


@pytest.mark.parametrize("cfg", [vpeft.DoRAConfig(r=2), vpeft.BlockLoraConfig(r=2), vpeft.CompLoraConfig(r=2),
                                 vpeft.NOLAConfig()], ids=["dora", "block_lora", "comp_lora", "nola"])
def test_other_weight_delta_methods_attach_and_merge(base, cfg):
    cfg.targets = ["mask_decoder.q", "mask_decoder.v", "mask_decoder.attn_out"]
    pm = vpeft.get_peft_model(copy.deepcopy(base), cfg)
    assert set(pm.adapter_layers()) == {f"{p}.{leaf}" for p in DEC for leaf in ("q_proj", "v_proj", "out_proj")}
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for t in pm.adapter_state_dict().values():
            if t.is_floating_point():
                t.add_(0.05 * torch.randn(t.shape, generator=g))
    y = run(pm)
    assert rel(y, run(base)) > 1e-4
    assert rel(run(pm.merge_and_unload()), y) < 1e-5


# --- SAMed's variant -------------------------------------------------------------------------------------------------


def test_samed_decoder_variant_trains_what_samed_trains(base):
    """Encoder LoRA on q, v + decoder LoRA on q, v + the decoder's non-transformer parts and the prompt encoder: the
    decoder transformer's own weights stay frozen through a training step; everything else listed trains."""
    model = copy.deepcopy(base)
    before = snapshot(model)
    pm = vpeft.get_peft_model(model, vpeft.LoraConfig(r=R, targets=["q", "v", "mask_decoder.q", "mask_decoder.v"]),
                              trainable_extra=SAMED_EXTRA)
    extra = {f"{e}.{n}" for e in SAMED_EXTRA for n, _ in base.get_submodule(e).named_parameters()}
    n_extra = sum(p.numel() for e in SAMED_EXTRA for p in base.get_submodule(e).parameters())
    n_enc = 2 * 2 * R * (64 + 64)  # 2 blocks x q, v x r * (in + out)
    assert pm.num_parameters(trainable_only=True) == n_enc + 23_552 + n_extra
    trainable = {canonical_name(n) for n, p in pm.base_model.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if ".lora." in n}
    assert trainable - lora == extra
    enc_sites = {f"image_encoder.blocks.{i}.attn.qkv" for i in range(2)}
    assert {n.split(".lora.")[0] for n in lora} == enc_sites | {f"{p}.{x}" for p in DEC for x in ("q_proj", "v_proj")}
    transformer = pm.base_model.mask_decoder.transformer
    assert not any(p.requires_grad for n, p in transformer.named_parameters() if ".lora." not in n)

    pm.train()
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    out = pm(images(), boxes=BOXES)
    (out.low_res_masks.square().mean() + out.iou_predictions.square().mean()).backward()
    opt.step()
    pm.eval()
    after = {canonical_name(k): v for k, v in pm.base_model.state_dict().items() if ".lora." not in k}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= extra
    assert not any(k.startswith("mask_decoder.transformer.") or k.startswith("image_encoder.") for k in changed)
    for e in SAMED_EXTRA[1:]:  # every listed decoder part received a gradient and moved
        assert any(k.startswith(e + ".") for k in changed), e
    dec_b = [p for n, p in pm.base_model.named_parameters()
             if canonical_name(n).startswith("mask_decoder.transformer") and "lora_B" in n]
    assert len(dec_b) == 14 and all(p.abs().sum() > 0 for p in dec_b)  # B starts at zero: it moved
