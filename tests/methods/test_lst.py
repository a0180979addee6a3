"""LST numerics: no backbone activation is saved, no backbone gradient, the magnitude-pruned initialisation against an
independent index computation (and r=1 reproducing the backbone block), the gate and the fusion against a hand
computation, causality on text towers, the parameter formula (tiny and ViT-B/16), training, config errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_clip, make_timm, rel_err

import vpeft
from vpeft.methods._side import tap_key
from vpeft.methods.layers import AdapterLayer, unwrap
from vpeft.methods.lst import LSTConfig

IMG = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def _tokens(seed: int = 4) -> torch.Tensor:
    t = torch.randint(1, 98, (2, 16), generator=torch.Generator().manual_seed(seed))
    t[:, 12] = 99
    return t


def lst_model(model=None, **kw):
    model = make_timm() if model is None else model
    return vpeft.get_peft_model(model, LSTConfig(**kw), trainable_extra=["head"])


# --- memory: nothing inside the backbone is kept for backward ---------------------------------------------------------

def saved_storages(net, run):
    """Run ``run()`` (a training forward); return the storages autograd saved (data_ptr -> (shape, bytes)) that are not
    parameters, every tensor produced *inside* a backbone block (outputs of the block's submodules, kept alive so that
    their addresses cannot be reused by later allocations) and ``run()``'s result."""
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    saved: dict[int, tuple[tuple[int, ...], int]] = {}
    internal: dict[int, torch.Tensor] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = (tuple(t.shape), s.nbytes())
        return t

    def keep(_m, _i, out):
        for o in out if isinstance(out, tuple) else (out,):
            if isinstance(o, torch.Tensor):
                internal[o.untyped_storage().data_ptr()] = o

    base = net.base_model
    hooks = [m.register_forward_hook(keep) for blk in base.blocks for m in unwrap(blk).modules()
             if m is not unwrap(blk)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    for h in hooks:
        h.remove()
    return saved, internal, out


@pytest.mark.parametrize("kw", [dict(), dict(checkpoint=False), dict(r=2, layers=[1])])
def test_no_backbone_activation_is_saved(kw):
    pm = lst_model(**kw)
    pm.train()
    saved, internal, _ = saved_storages(pm, lambda: pm(IMG).square().mean())
    # nothing computed inside a backbone block is held for backward
    assert not set(saved) & set(internal)
    # the only (B, L, D)-shaped storages held are the taps (block 0's input, the laddered blocks' outputs)
    ctx = pm.ctx
    taps = {ctx.get(tap_key("lst", 0, "in")).untyped_storage().data_ptr()}
    taps |= {ctx.get(tap_key("lst", i, "out")).untyped_storage().data_ptr() for i in (kw.get("layers") or [0, 1])}
    wide = {p for p, (shape, _) in saved.items() if shape == (2, 17, 64)}
    assert wide <= taps
    # far below LoRA, whose backward runs through the backbone
    lora = vpeft.get_peft_model(make_timm(), vpeft.LoraConfig(r=8), trainable_extra=["head"])
    lora.train()
    lora_saved, _, _ = saved_storages(lora, lambda: lora(IMG).square().mean())
    ratio = sum(n for _, n in saved.values()) / sum(n for _, n in lora_saved.values())
    assert ratio < (0.5 if kw.get("checkpoint", True) else 0.8), ratio


def test_backward_leaves_backbone_without_gradients():
    pm = lst_model()
    pm.train()
    pm(IMG).logsumexp(-1).mean().backward()
    for name, p in pm.base_model.named_parameters():
        if name.startswith("head."):
            assert p.grad is not None
        else:
            assert p.grad is None, name
    assert all(p.grad is not None for p in pm.shared.parameters())


def test_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (True, False):
        torch.manual_seed(0)
        pm = lst_model(checkpoint=ckpt)
        pm.train()
        pm(IMG).square().mean().backward()
        grads.append({n: p.grad for n, p in pm.shared.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7, msg=n)


# --- the pruned initialisation ----------------------------------------------------------------------------------------

def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _topk_sorted(score: np.ndarray, k: int) -> np.ndarray:
    # highest scores first, lower index first among ties, then back in index order
    order = sorted(range(len(score)), key=lambda i: (-score[i], i))
    return np.array(sorted(order[:k]))


def test_magnitude_pruned_init_equals_backbone_slices():
    model = make_timm(depth=3)
    r = 4
    D, H, hd, M = 64, 4, 16, 256
    blocks = [unwrap(b) for b in model.blocks]
    w = {i: dict(qkv=_np(b.attn.qkv.weight), qkv_b=_np(b.attn.qkv.bias), proj=_np(b.attn.proj.weight),
                 proj_b=_np(b.attn.proj.bias), fc1=_np(b.mlp.fc1.weight), fc1_b=_np(b.mlp.fc1.bias),
                 fc2=_np(b.mlp.fc2.weight), fc2_b=_np(b.mlp.fc2.bias), n1=_np(b.norm1.weight), n2b=_np(b.norm2.bias))
         for i, b in enumerate(blocks)}
    final_w = _np(model.norm.weight)
    # residual channels: L1 mass of every weight that reads (columns) or writes (rows) the channel, over all blocks
    chan = np.zeros(D)
    for c in range(D):
        for b in w.values():
            chan[c] += np.abs(b["qkv"][:, c]).sum() + np.abs(b["proj"][c, :]).sum()
            chan[c] += np.abs(b["fc1"][:, c]).sum() + np.abs(b["fc2"][c, :]).sum()
    S = _topk_sorted(chan, D // r)

    pm = lst_model(model, r=r)
    side = pm.shared["lst"]
    assert side.blocks["0"].qkv.weight.shape == (3 * D // r, D // r)
    for i, b in w.items():
        dims = []
        for h in range(H):
            sc = [sum(np.abs(b["qkv"][p * D + h * hd + j, S]).sum() for p in range(3))
                  + np.abs(b["proj"][S, h * hd + j]).sum() for j in range(hd)]
            dims += [h * hd + j for j in _topk_sorted(np.array(sc), hd // r)]
        dims = np.array(dims)
        rows = np.concatenate([dims, D + dims, 2 * D + dims])
        hid = _topk_sorted(np.array([np.abs(b["fc1"][m, S]).sum() + np.abs(b["fc2"][S, m]).sum() for m in range(M)]),
                           M // r)
        blk = side.blocks[str(i)]
        np.testing.assert_array_equal(_np(blk.qkv.weight), b["qkv"][np.ix_(rows, S)])
        np.testing.assert_array_equal(_np(blk.qkv.bias), b["qkv_b"][rows])
        np.testing.assert_array_equal(_np(blk.proj.weight), b["proj"][np.ix_(S, dims)])
        np.testing.assert_array_equal(_np(blk.proj.bias), b["proj_b"][S])
        np.testing.assert_array_equal(_np(blk.fc1.weight), b["fc1"][np.ix_(hid, S)])
        np.testing.assert_array_equal(_np(blk.fc1.bias), b["fc1_b"][hid])
        np.testing.assert_array_equal(_np(blk.fc2.weight), b["fc2"][np.ix_(S, hid)])
        np.testing.assert_array_equal(_np(blk.fc2.bias), b["fc2_b"][S])
        np.testing.assert_array_equal(_np(blk.norm1.weight), b["n1"][S])
        np.testing.assert_array_equal(_np(blk.norm2.bias), b["n2b"][S])
    np.testing.assert_array_equal(_np(side.norm.weight), final_w[S])
    # the random initialisation does not copy backbone weights
    rnd = lst_model(make_timm(depth=3), r=r, init="random").shared["lst"]
    assert not torch.equal(rnd.blocks["0"].qkv.weight, side.blocks["0"].qkv.weight)


@pytest.mark.parametrize("case", ["timm", "clip_visual", "clip_text"])
def test_r1_side_block_reproduces_the_backbone_block(case):
    """With r=1 nothing is pruned: side block i is backbone block i (channels in order), on both attention layouts,
    causal on the text tower."""
    if case == "timm":
        model, towers, width = make_timm(), None, 64
        blk = lambda m: unwrap(m.blocks[1])  # noqa: E731
        mask = None
    else:
        model, towers, width = make_clip(), ["visual" if case == "clip_visual" else "text"], 64
        blk = (lambda m: unwrap(m.visual.transformer.resblocks[1])) if case == "clip_visual" else \
            (lambda m: unwrap(m.transformer.resblocks[1]))  # noqa: E731
        mask = model.attn_mask if case == "clip_text" else None
    backbone_block = blk(model)
    pm = vpeft.get_peft_model(model, LSTConfig(r=1, towers=towers))
    side = pm.shared["lst"].blocks["1"]
    x = torch.randn(2, 16, width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = backbone_block(x) if mask is None else backbone_block(x, attn_mask=mask)
        assert rel_err(side(x), ref) < 1e-5


# --- gate and fusion against a hand computation -----------------------------------------------------------------------

def test_gates_and_fusion_match_hand_computation():
    pm = lst_model(r=2, gate_alpha=0.0)
    side = pm.shared["lst"]
    assert torch.equal(side.gates(), torch.full((2,), 0.5))  # alpha = 0 -> mu = sigmoid(0) = 1/2
    with torch.no_grad():
        side.alpha.copy_(torch.tensor([0.05, -0.1]))
    pm.eval()
    with torch.no_grad():
        feats = pm.forward_features(IMG)
        base = unwrap(pm.base_model)
        # the taps are the plain backbone's tensors
        e = base.norm_pre(base._pos_embed(base.patch_embed(IMG)))
        h0 = unwrap(base.blocks[0])(e)
        h1 = unwrap(base.blocks[1])(h0)
        ctx = pm.ctx
        assert torch.equal(ctx.get(tap_key("lst", 0, "in")), e)
        assert torch.equal(ctx.get(tap_key("lst", 1, "out")), h1)
        T = 0.1
        mu = [1 / (1 + math.exp(-0.05 / T)), 1 / (1 + math.exp(0.1 / T))]
        s = e @ side.down0.weight.t() + side.down0.bias
        for j, h in enumerate((h0, h1)):
            d = h @ side.downs[str(j)].weight.t() + side.downs[str(j)].bias
            s = side.blocks[str(j)](mu[j] * d + (1 - mu[j]) * s)
        n = side.norm
        s = (s - s.mean(-1, keepdim=True)) / torch.sqrt(s.var(-1, unbiased=False, keepdim=True) + n.eps)
        expected = (s * n.weight + n.bias) @ side.up.weight.t() + side.up.bias
    assert feats.shape == (2, 17, 64)
    assert rel_err(feats, expected) < 1e-5
    # the head consumes the fused features: logits = head(class token of the fused features)
    with torch.no_grad():
        assert rel_err(pm(IMG), base.head(expected[:, 0])) < 1e-5


def test_intermediates_stay_the_backbones_until_the_last_block():
    """``forward_intermediates(norm=True)`` applies the final norm to every block's output: only the last block's
    (a complete pass) is fused."""
    pm = lst_model(r=2)
    pm.eval()
    base = make_timm().requires_grad_(False)
    with torch.no_grad():
        _, inter = pm.forward_intermediates(IMG, norm=True)
        _, ref = base.forward_intermediates(IMG, norm=True)
        feats = pm.forward_features(IMG)
    assert torch.equal(inter[0], ref[0])
    assert not torch.allclose(inter[1], ref[1])
    assert torch.equal(inter[1].flatten(2).transpose(1, 2), feats[:, 1:])


def test_text_tower_side_network_is_causal():
    pm = vpeft.get_peft_model(make_clip(), LSTConfig(r=2, towers=["text"]))
    captured = []
    fusion = pm.adapter_layers()["ln_final"]
    fusion.register_forward_hook(lambda m, i, o: captured.append(o))
    t1 = _tokens()
    t2 = t1.clone()
    t2[:, 7:] = (t2[:, 7:] + 5) % 98 + 1
    with torch.no_grad():
        pm.encode_text(t1)
        pm.encode_text(t2)
    a, b = captured
    assert torch.equal(a[:, :7], b[:, :7])
    assert not torch.equal(a[:, 7:], b[:, 7:])


# --- parameter count --------------------------------------------------------------------------------------------------

def lst_params(D: int, H: int, hd: int, M: int, n: int, r: int) -> int:
    """The docstring's formula (every projection with a bias, no layer scale)."""
    d, a, m = D // r, H * hd // r, M // r
    block = 2 * (2 * d) + (d * 3 * a + 3 * a) + (a * d + d) + (d * m + m) + (m * d + d)
    return (D * d + d) + (d * D + D) + 2 * d + n * ((D * d + d) + 1 + block)


@pytest.mark.parametrize("r,layers", [(2, None), (4, None), (2, [1]), (8, [0])])
def test_trainable_parameters_match_formula_tiny(r, layers):
    pm = vpeft.get_peft_model(make_timm(), LSTConfig(r=r, layers=layers))
    assert pm.num_parameters(True) == lst_params(64, 4, 16, 256, len(layers or [0, 1]), r)


def test_trainable_parameters_vit_b16():
    model = vpeft.create_backbone("timm:vit_base_patch16_224")
    pm = vpeft.get_peft_model(model, LSTConfig())
    assert lst_params(768, 12, 64, 3072, 12, 8) == 2_376_492
    assert pm.num_parameters(True) == 2_376_492


# --- training ---------------------------------------------------------------------------------------------------------

def test_training_reduces_loss_on_a_separable_task():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(8, 3, 32, 32, generator=g)
    y = torch.arange(8) % 2
    x[y == 1, :, :16] += 1.0  # class 1: brighter top half
    pm = vpeft.get_peft_model(make_timm(num_classes=2), LSTConfig(r=4), trainable_extra=["head"])
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(12):
        loss = F.cross_entropy(pm(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# --- config errors ----------------------------------------------------------------------------------------------------

BAD = [
    (dict(r=0), "LSTConfig.r"),
    (dict(r=True), "LSTConfig.r"),
    (dict(r=3), r"r=3 must divide .* valid r: \[1, 2, 4, 8, 16\]"),
    (dict(gate_T=0.0), "LSTConfig.gate_T"),
    (dict(gate_T="hot"), "LSTConfig.gate_T"),
    (dict(gate_alpha=None), "LSTConfig.gate_alpha"),
    (dict(init="fisher"), "LSTConfig.init must be one of"),
    (dict(dropout=1.0), "LSTConfig.dropout"),
    (dict(checkpoint="yes"), "LSTConfig.checkpoint"),
    (dict(targets=["q"]), "LSTConfig.targets must be None"),
    (dict(layers=[]), "LSTConfig.layers"),
    (dict(layers=[2]), "out of range"),
    (dict(towers=["visual"]), "no tower 'visual'"),
]


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, before):
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("kw,match", BAD, ids=[m.split(" ")[0] + str(i) for i, (_, m) in enumerate(BAD)])
def test_config_errors_raise_before_mutation(kw, match):
    model = make_timm()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        vpeft.get_peft_model(model, [vpeft.LoraConfig(r=2), LSTConfig(**kw)])
    _assert_untouched(model, before)


@pytest.mark.parametrize("make,kw,match", [
    (lambda: make_clip(), dict(towers=["visual", "text"]), "exactly one tower"),
    (lambda: make_timm(global_pool="avg"), dict(), "after pooling"),
])
def test_unsupported_towers_raise_before_mutation(make, kw, match):
    model = make()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        vpeft.get_peft_model(model, LSTConfig(**kw))
    _assert_untouched(model, before)
