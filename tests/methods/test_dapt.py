"""DAPT numerics: the forward against a hand-written rewrite of the paper's equations (explicit attention, MLP,
Dynamic Adapter with its per-token scale, accumulating internal prompts, TFTS, the point-cloud head) on the tiny
Point-MAE and the tiny timm ViT; the official initialisation; parameter counts against the formula (full size on the
meta device); save/load; bad configs, text towers and SAM's NHWC encoder refused before any change to the model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import clouds, images, make_clip, make_point, make_timm, rel_err, tokens

import vpeft
import vpeft.backbones.point_mae  # noqa: F401  (registers point_mae until vpeft.backbones imports it)
from vpeft.backbones.point_mae import PointTransformer
from vpeft.methods.dapt import DAPTConfig, DynamicAdapter, dapt_num_parameters
from vpeft.methods.layers import AdapterLayer

SAM_TINY = dict(img_size=64, embed_dim=64, depth=2, num_heads=4, window_size=2, global_attn_indexes=(1,))


def randomize(pm, seed: int = 1) -> None:
    """Random values for every adapter tensor, the head's BatchNorm statistics included (variances positive)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, t in pm.adapter_state_dict().items():
            if t.is_floating_point():
                r = torch.randn(t.shape, generator=g)
                t.copy_(0.5 + r.abs() if k.endswith("running_var") else 0.3 * r)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- plain reference of the paper's equations (no vpeft code) --------------------------------------------------------


class Ref:
    """One DAPT forward written out from the adapter tensors ``sd`` (canonical keys) and a frozen backbone."""

    def __init__(self, sd: dict, layers: set[int], depth: int, tfts: bool, adapter_norm: bool, head: bool):
        self.sd, self.layers, self.depth, self.tfts, self.adapter_norm, self.head = sd, layers, depth, tfts, \
            adapter_norm, head
        self.gates: list[torch.Tensor] = []  # the dynamic scales of each adapted block (to check they vary)

    def tf(self, y: torch.Tensor, prefix: str, on: bool = True) -> torch.Tensor:
        """TFTS: y * gamma + beta over the channels (last dim)."""
        if not (self.tfts and on):
            return y
        return y * self.sd[f"{prefix}.scale"] + self.sd[f"{prefix}.shift"]

    def block(self, blk, i: int, x: torch.Tensor, prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ``i`` on ``[cls, prompts, patches]``; returns ``(cls + patches out, prompts for block i + 1)``."""
        sd, on = self.sd, i in self.layers
        b, t = x.shape[0], prompts.shape[1]
        seq = torch.cat([x[:, :1], prompts, x[:, 1:]], dim=1)
        n, c = seq.shape[1], seq.shape[2]
        heads = blk.attn.num_heads
        # attention, written out
        h = self.tf(F.layer_norm(seq, (c,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps), f"blocks.{i}.norm1.dapt",
                    on)
        qkv = h @ blk.attn.qkv.weight.T + (blk.attn.qkv.bias if blk.attn.qkv.bias is not None else 0.0)
        qkv = self.tf(qkv, f"blocks.{i}.attn.qkv.dapt", on)
        q, k, v = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(c // heads), dim=-1)
        a = (att @ v).transpose(1, 2).reshape(b, n, c) @ blk.attn.proj.weight.T + blk.attn.proj.bias
        seq = seq + self.tf(a, f"blocks.{i}.attn.proj.dapt", on)
        # MLP and the Dynamic Adapter on the same (TFTS'd) norm2 output
        z = self.tf(F.layer_norm(seq, (c,), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps), f"blocks.{i}.norm2.dapt",
                    on)
        hid = self.tf(z @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias, f"blocks.{i}.mlp.fc1.dapt", on)
        mlp = self.tf(F.gelu(hid) @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias, f"blocks.{i}.mlp.fc2.dapt", on)
        new = []
        if on:
            p = f"blocks.{i}.mlp.dapt"
            zz = F.layer_norm(z, (c,), sd[f"{p}.norm.weight"], sd[f"{p}.norm.bias"], 1e-5) if self.adapter_norm else z
            s = torch.relu(zz @ sd[f"{p}.scale.weight"].T + sd[f"{p}.scale.bias"])  # B N 1: one scale per token
            up = F.gelu(zz @ sd[f"{p}.down.weight"].T + sd[f"{p}.down.bias"]) @ sd[f"{p}.up.weight"].T \
                + sd[f"{p}.up.bias"]
            adapter = s * up
            self.gates.append(s)
            out = seq + mlp + adapter
            if i < self.depth - 1 or self.head:  # the last block's prompt only feeds the DAPT head
                prompt = F.gelu(adapter).mean(dim=1, keepdim=True)
                new.append(prompt * sd[f"{p}.prompt_scale"] + sd[f"{p}.prompt_shift"] if self.tfts else prompt)
        else:
            out = seq + mlp
        new.append(out[:, 1:1 + t])
        return torch.cat([out[:, :1], out[:, 1 + t:]], dim=1), torch.cat(new, dim=1)

    def blocks(self, blocks, x: torch.Tensor, pos=None) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = x.new_zeros(x.shape[0], 0, x.shape[2])
        for i, blk in enumerate(blocks):
            x, prompts = self.block(blk, i, x if pos is None else x + pos, prompts)
        return x, prompts

    def final(self, norm, x: torch.Tensor) -> torch.Tensor:
        return self.tf(F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps), "norm.dapt")


def bn_eval(x, sd, p):
    return (x - sd[f"{p}.running_mean"]) / torch.sqrt(sd[f"{p}.running_var"] + 1e-5) * sd[f"{p}.weight"] + \
        sd[f"{p}.bias"]


def head_ref(f, sd):
    p = "head.dapt.head"
    h = torch.relu(bn_eval(f @ sd[f"{p}.0.weight"].T + sd[f"{p}.0.bias"], sd, f"{p}.1"))
    h = torch.relu(bn_eval(h @ sd[f"{p}.4.weight"].T + sd[f"{p}.4.bias"], sd, f"{p}.5"))
    return h @ sd[f"{p}.8.weight"].T + sd[f"{p}.8.bias"]


def open_gates(pm, bias: float = 1.0) -> None:
    """The tiny random backbones give near-identical tokens, whose random-init scales can all fall below zero (no
    adapter output at all): shift the scale bias up so every adapter contributes (the gate is tested on its own)."""
    with torch.no_grad():
        for layer in pm.adapter_layers().values():
            a = getattr(layer, "dapt", None)
            if isinstance(a, DynamicAdapter):
                a.scale.bias.fill_(bias)


def embed_tfts_hook(conv, sd, prefix):
    """TFTS on the patch-embedding conv output (channels on dim 1), as a hook on an untouched backbone."""
    s, b = sd[f"{prefix}.scale"], sd[f"{prefix}.shift"]
    shape = lambda y: [1, -1] + [1] * (y.dim() - 2)  # noqa: E731
    conv.register_forward_hook(lambda m, i, y: y * s.view(shape(y)) + b.view(shape(y)))


CASES = {
    "all-blocks": dict(),
    "block-1-only": dict(layers=[1]),
    "no-tfts-no-adapter-norm": dict(tfts=False, adapter_norm=False),
}


@pytest.mark.parametrize("kw", list(CASES.values()), ids=list(CASES))
def test_point_forward_matches_the_paper_equations(kw):
    pm = vpeft.get_peft_model(make_point(), DAPTConfig(rank=8, **kw))
    randomize(pm)
    open_gates(pm)
    sd = {k: v.clone() for k, v in pm.adapter_state_dict().items()}
    x = clouds()
    ref_model = make_point().requires_grad_(False)
    tfts = kw.get("tfts", True)
    if tfts:
        embed_tfts_hook(ref_model.encoder.second_conv[3], sd, "encoder.second_conv.3.dapt")
    ref = Ref(sd, set(kw.get("layers", [0, 1])), 2, tfts, kw.get("adapter_norm", True), head=True)
    with torch.no_grad():
        y = pm(x)
        tok, pos = ref_model.prepare_tokens(x)
        out, prompts = ref.blocks(ref_model.blocks, tok, pos)
        assert prompts.shape[1] == len(ref.layers)  # one prompt per adapted block reaches the head
        assert rel_err(pm.runtime.ctx.get(("dapt", "", "prompts", 2)), prompts) < 1e-5
        xn, pn = ref.final(ref_model.norm, out), ref.final(ref_model.norm, prompts)
        expect = head_ref(torch.cat([xn[:, 0], pn.mean(dim=1), xn[:, 1:].amax(dim=1)], dim=-1), sd)
        base = make_point().requires_grad_(False)(x)
        with pm.disabled():
            y_off = pm(x)
    assert y.shape == (2, 5)
    assert rel_err(y, expect) < 1e-5
    assert rel_err(y, base) > 1e-2
    assert len(ref.gates) == len(ref.layers) and all(bool((g > 0).any()) for g in ref.gates)
    assert torch.equal(y_off, base)


def test_timm_forward_matches_the_paper_equations():
    """On a timm ViT the backbone's pooling and head stay; the prompts act through attention (the last block makes
    none: nothing would read it)."""
    pm = vpeft.get_peft_model(make_timm(), DAPTConfig(rank=8))
    randomize(pm)
    open_gates(pm)
    sd = {k: v.clone() for k, v in pm.adapter_state_dict().items()}
    assert "blocks.1.mlp.dapt.prompt_scale" not in sd and "blocks.0.mlp.dapt.prompt_scale" in sd
    assert not any(k.startswith("head.") for k in sd)
    x = images()
    ref_model = make_timm().requires_grad_(False)
    embed_tfts_hook(ref_model.patch_embed.proj, sd, "patch_embed.proj.dapt")
    ref = Ref(sd, {0, 1}, 2, tfts=True, adapter_norm=True, head=False)
    with torch.no_grad():
        y = pm(x)
        tok = ref_model.norm_pre(ref_model._pos_embed(ref_model.patch_embed(x)))
        out, prompts = ref.blocks(ref_model.blocks, tok)
        expect = ref_model.forward_head(ref.final(ref_model.norm, out))
    assert prompts.shape[1] == 1  # block 0's prompt, carried through block 1
    assert rel_err(y, expect) < 1e-5
    # The tiny ViT's near-uniform attention lets a prompt move the logits only slightly: check the prompt's output
    # after the last block (kept in the forward context for a head to read) directly.
    assert rel_err(pm.runtime.ctx.get(("dapt", "", "prompts", 2)), prompts) < 1e-5
    assert len(ref.gates) == 2 and all(bool((g > 0).any()) for g in ref.gates)


def test_one_block_against_the_equations_with_a_live_gate():
    """Block 0 of the tiny ViT on varied tokens: the per-token ReLU scale is zero on some tokens and positive on
    others, the block output keeps the layout and the prompt it makes equals the written-out one."""
    pm = vpeft.get_peft_model(make_timm(), DAPTConfig(rank=8))
    randomize(pm, seed=4)
    with torch.no_grad():  # a zero-mean scale pre-activation: the ReLU gates about half the tokens off
        a = pm.adapter_layers()["blocks.0.mlp"].dapt
        a.scale.bias.zero_()
        a.norm.bias.zero_()
    sd = {k: v.clone() for k, v in pm.adapter_state_dict().items()}
    x = 2.0 * torch.randn(3, 17, 64, generator=torch.Generator().manual_seed(5))
    ref = Ref(sd, {0, 1}, 2, tfts=True, adapter_norm=True, head=False)
    pm.runtime.ctx.reset()
    with torch.no_grad():
        y = pm.base_model.blocks[0](x)
        expect, prompts = ref.block(make_timm().blocks[0], 0, x, x.new_zeros(3, 0, 64))
    assert y.shape == x.shape and prompts.shape == (3, 1, 64)
    assert rel_err(y, expect) < 1e-5
    assert rel_err(pm.runtime.ctx.get(("dapt", "", "prompts", 1)), prompts) < 1e-5
    (gate,) = ref.gates
    assert 0.2 < (gate > 0).float().mean() < 0.8, "the dynamic scale must gate some tokens off and others on"


def test_official_initialisation():
    pm = vpeft.get_peft_model(make_point(), DAPTConfig())
    a = pm.adapter_layers()["blocks.0.mlp"].dapt
    assert isinstance(a, DynamicAdapter)
    assert tuple(a.down.weight.shape) == (64, 64) and tuple(a.scale.weight.shape) == (1, 64)
    bound = 1 / math.sqrt(64)  # Kaiming-uniform with a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    for w in (a.down.weight, a.scale.weight):
        assert w.abs().max() <= bound and w.std() > bound / 3
    for t in (a.down.bias, a.scale.bias, a.up.weight, a.up.bias, a.norm.bias):
        assert torch.count_nonzero(t) == 0
    assert torch.equal(a.norm.weight, torch.ones(64))
    # TFTS: scale ~ N(1, 0.02), shift ~ N(0, 0.02) everywhere (norm sites, projections, prompts, embed, final norm)
    sd = pm.adapter_state_dict()
    scales = torch.cat([v for k, v in sd.items() if k.endswith(".scale") or k.endswith("prompt_scale")])
    shifts = torch.cat([v for k, v in sd.items() if k.endswith(".shift") or k.endswith("prompt_shift")])
    assert scales.numel() == shifts.numel() == 2 * (7 * 64 + 256) + 2 * 64 + 2 * 64  # blocks, prompts, embed + norm
    assert abs(scales.mean() - 1) < 0.005 and abs(scales.std() - 0.02) < 0.003
    assert abs(shifts.mean()) < 0.005 and abs(shifts.std() - 0.02) < 0.003
    # the adapter output is exactly zero at init (zero up-projection): the MLP site returns the MLP's output
    mlp = pm.adapter_layers()["blocks.0.mlp"]
    h = torch.randn(2, 17, 64)
    with torch.no_grad():
        assert torch.equal(mlp(h), mlp.base_layer(h))


@pytest.mark.parametrize("factory, make_x", [(make_point, clouds), (make_timm, images)], ids=["point", "timm"])
def test_init_equals_frozen_without_prompts_and_with_identity_tfts(factory, make_x):
    x = make_x()
    with torch.no_grad():
        y0 = factory().requires_grad_(False)(x)
    for kw in (dict(tfts=False), dict(tfts_init_std=0.0)):
        pm = vpeft.get_peft_model(factory(), DAPTConfig(internal_prompt=False, **kw))
        with torch.no_grad():
            assert torch.equal(pm(x), y0), kw
    # The paper's init does not start from the frozen function: TFTS is near (not at) the identity and the prompts
    # (TFTS of a zero adapter output) already join the attention.
    pm = vpeft.get_peft_model(factory(), DAPTConfig(tfts=False, head=False))
    with torch.no_grad():
        assert not torch.equal(pm(x), y0)


def test_parameter_count_formula():
    cases = [(make_point, DAPTConfig(), dict(num_classes=5)),
             (make_point, DAPTConfig(head=False, rank=4), dict(rank=4)),
             (make_point, DAPTConfig(tfts=False, adapter_norm=False, internal_prompt=False),
              dict(tfts=False, adapter_norm=False, internal_prompt=False)),
             (make_timm, DAPTConfig(), dict())]
    for factory, cfg, kw in cases:
        pm = vpeft.get_peft_model(factory(), cfg)
        assert pm.num_parameters(trainable_only=True) == dapt_num_parameters(64, 2, **kw), cfg
    # hand-computed: C = 64, H = 256, r = 64, 2 blocks, point head on 5 classes
    block = (2 * 64 * 64 + 64 + 2 * 64 + 1 + 2 * 64) + 2 * 64 + 14 * 64 + 2 * 256
    head = 3 * 64 * 256 + 256 + 2 * 256 + 256 * 256 + 256 + 2 * 256 + 256 * 5 + 5
    assert dapt_num_parameters(64, 2, num_classes=5) == 2 * block + 2 * (64 + 64) + head


def test_full_size_parameter_counts():
    # Point-MAE base (C = 384, 12 blocks), ScanObjectNN's 15 classes, with the cls token and position trained as the
    # official optimiser does: the paper's 1.1M.
    model = PointTransformer(num_classes=15).to("meta")
    pm = vpeft.get_peft_model(model, DAPTConfig(), trainable_extra=["cls_token", "cls_pos"])
    assert pm.num_parameters(trainable_only=True) == 721_164 + 365_839 + 768 == 1_087_771
    assert dapt_num_parameters(384, 12, num_classes=15) == 1_087_003
    model = PointTransformer(num_classes=40).to("meta")
    assert vpeft.get_peft_model(model, DAPTConfig()).num_parameters(trainable_only=True) == 1_093_428
    with torch.device("meta"):
        vit_b = vpeft.create_backbone("timm:vit_base_patch16_224", pretrained=False)
    assert vpeft.get_peft_model(vit_b, DAPTConfig()).num_parameters(trainable_only=True) == 1_440_012 == \
        dapt_num_parameters(768, 12)


def test_save_load_roundtrip(tmp_path):
    pm = vpeft.get_peft_model(make_point(), DAPTConfig(rank=8))
    randomize(pm)
    x = clouds()
    with torch.no_grad():
        y = pm(x)
    pm.save_adapter(str(tmp_path))
    pm2 = vpeft.PeftModel.from_pretrained(make_point(), str(tmp_path))
    assert pm2.configs[0] == DAPTConfig(rank=8)
    assert set(pm2.adapter_state_dict()) == set(pm.adapter_state_dict())
    assert "head.dapt.head.1.running_var" in pm2.adapter_state_dict()
    with torch.no_grad():
        assert torch.equal(pm2(x), y)


def test_head_needs_the_prompts_of_the_same_call():
    pm = vpeft.get_peft_model(make_point(), DAPTConfig())
    x = clouds()
    with torch.no_grad():
        feats = pm.forward_features(x)
        assert feats.shape == (2, 17, 64)  # the backbone's layout: the prompts never leave the blocks
        with pytest.raises(RuntimeError, match="same top-level call"):
            pm.forward_head(feats)


def test_text_tower_with_dynamic_adapter_only():
    pm = vpeft.get_peft_model(make_clip(), DAPTConfig(towers=["text"], internal_prompt=False, rank=4))
    randomize(pm)
    t = tokens()
    with torch.no_grad():
        y = pm.encode_text(t)
        assert rel_err(y, make_clip().requires_grad_(False).encode_text(t)) > 1e-3
    assert not any(".block" in k or "prompt" in k for k in pm.adapter_state_dict())


def assert_refused(model, cfg, exc, match):
    before = snapshot(model)
    with pytest.raises(exc, match=match):
        vpeft.get_peft_model(model, cfg)
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    after = snapshot(model)
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())


BAD = [
    (dict(rank=0), ValueError, "rank"),
    (dict(rank=2.5), ValueError, "rank"),
    (dict(dropout=1.0), ValueError, "dropout"),
    (dict(head_dropout=-0.1), ValueError, "head_dropout"),
    (dict(head_hidden=True), ValueError, "head_hidden"),
    (dict(tfts="yes"), TypeError, "tfts"),
    (dict(head=1), TypeError, "head"),
    (dict(tfts_init_std=-0.02), ValueError, "tfts_init_std"),
    (dict(tfts_init_std=float("nan")), ValueError, "tfts_init_std"),
    (dict(head=True, internal_prompt=False), ValueError, "internal_prompt"),
    (dict(targets=["mlp"]), ValueError, "targets must be None"),
    (dict(layers=[2]), ValueError, "out of range"),
    (dict(towers=["visual"]), ValueError, "unknown tower"),
]


@pytest.mark.parametrize("kw, exc, match", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_configs_refused_before_mutation(kw, exc, match):
    assert_refused(make_point(), DAPTConfig(**kw), exc, match)


def test_unsupported_towers_refused_before_mutation():
    assert_refused(make_clip(), DAPTConfig(towers=["text"]), ValueError, "causal text tower")
    assert_refused(make_timm(), DAPTConfig(head=True), ValueError, "point-cloud backbone")
    assert_refused(_headless_point(), DAPTConfig(head=True), ValueError, "point-cloud backbone with a classifier")


def _headless_point():
    torch.manual_seed(0)
    return vpeft.create_backbone("point_mae:base", num_group=16, group_size=16, embed_dim=64, depth=2, num_heads=4,
                                 num_classes=0, drop_path_rate=0.0).eval()


def test_sam_nhwc_encoder_refused_then_adapter_only():
    torch.manual_seed(0)
    sam = vpeft.create_backbone("sam:vit_b", **SAM_TINY).eval()
    assert_refused(sam, DAPTConfig(), ValueError, "NHWC")
    # Without prompts the Dynamic Adapter and TFTS act per token, so the windowed encoder is fine.
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        y0 = sam.image_encoder(x)
    pm = vpeft.get_peft_model(sam, DAPTConfig(internal_prompt=False, tfts=False, rank=4))
    with torch.no_grad():
        assert torch.equal(pm.base_model.image_encoder(x), y0)  # zero up-projection: the frozen encoder at init
        randomize(pm)
        assert rel_err(pm.base_model.image_encoder(x), y0) > 1e-3


@pytest.mark.parametrize("order", ["dapt-first", "vpt-first"])
@pytest.mark.parametrize("factory, make_x", [(make_point, clouds), (make_timm, images)], ids=["point", "timm"])
def test_stacks_with_vpt_prompts(factory, make_x, order):
    """Both methods insert tokens after the prefix and remove their own again, in either order."""
    cfgs = [DAPTConfig(rank=4), vpeft.VPTConfig(num_tokens=3)]
    pm = vpeft.get_peft_model(factory(), cfgs if order == "dapt-first" else cfgs[::-1])
    randomize(pm)
    x = make_x()
    with torch.no_grad():
        y = pm(x)
        assert pm.runtime.ctx.get(("dapt", "", "prompts", 2)).shape[1] == (2 if factory is make_point else 1)
        feats = pm.forward_features(x)
        with pm.disabled():
            y_off = pm(x)
        base = factory().requires_grad_(False)
        assert feats.shape == base.forward_features(x).shape
        assert torch.equal(y_off, base(x)) and y.shape == y_off.shape
