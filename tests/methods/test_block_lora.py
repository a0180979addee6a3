"""Block-LoRA numerics: parameter formula, the block-sum forward against a hand-written reference, the shared-block
structure of the update, equivalence with LoRA on a tiled down-projection, merge exactness and adapter I/O."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import make_clip as tiny_clip
from conftest import make_timm as tiny_vit
from conftest import randomize_adapters, rel_err

import vpeft
import vpeft.backbones.timm_vit  # noqa: F401  (registers the timm ViT spec)
from vpeft.methods.block_lora import BlockLoraConfig
from vpeft.methods.layers import AdapterLayer

timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")


IMG = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
TXT = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(6))


# --- parameter formula ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("r,n,targets", [(2, 8, None), (4, 4, ["q", "v"]), (1, 2, ["k"])])
def test_trainable_parameters_timm_qkv_slices(r, n, targets):
    model = tiny_vit()
    d, depth = model.embed_dim, len(model.blocks)
    pm = vpeft.get_peft_model(model, BlockLoraConfig(r=r, num_blocks=n, targets=targets))
    n_slices = 3 if targets is None else len(targets)
    # per slice: A_s (r x d/n) shared by the n input blocks + B (d x r)
    assert pm.num_parameters(True) == depth * n_slices * (r * d // n + d * r)


def test_trainable_parameters_timm_linear_sites():
    model = tiny_vit()
    d, depth = model.embed_dim, len(model.blocks)
    hidden = model.blocks[0].mlp.fc1.out_features
    pm = vpeft.get_peft_model(model, BlockLoraConfig(r=2, num_blocks=4, targets=["mlp_in", "mlp_out"]))
    per_layer = (2 * d // 4 + hidden * 2) + (2 * hidden // 4 + d * 2)
    assert pm.num_parameters(True) == depth * per_layer


def test_trainable_parameters_open_clip_both_towers():
    model = tiny_clip()
    r, n = 2, 8
    pm = vpeft.get_peft_model(model, BlockLoraConfig(r=r, num_blocks=n, towers=["visual", "text"]))
    expected = 0
    for tower in (model.visual.transformer, model.transformer):
        w = tower.width
        expected += len(tower.resblocks) * 3 * (r * w // n + w * r)
    assert pm.num_parameters(True) == expected
    keys = pm.adapter_state_dict()
    assert "visual.transformer.resblocks.0.attn.block_lora.lora_A.q" in keys
    assert keys["transformer.resblocks.1.attn.block_lora.lora_A.v"].shape == (r, model.transformer.width // n)


# --- forward semantics ------------------------------------------------------------------------------------------------

def test_forward_matches_hand_written_block_sum():
    model = tiny_vit()
    w0 = model.blocks[0].attn.qkv.weight.detach().clone()
    b0 = model.blocks[0].attn.qkv.bias.detach().clone()
    r, n, alpha = 2, 4, 3.0
    pm = vpeft.get_peft_model(model, BlockLoraConfig(r=r, num_blocks=n, alpha=alpha, dropout=0.0))
    randomize_adapters(pm)
    layer = pm.adapter_layers()["blocks.0.attn.qkv"]
    ad = layer.block_lora
    d = model.embed_dim
    x = torch.randn(3, 7, d)
    c = d // n
    xsum = sum(x[..., j * c:(j + 1) * c] for j in range(n))  # the n input blocks, added
    expected = F.linear(x, w0, b0).clone()
    for i, name in enumerate("qkv"):
        a_s, b = ad.lora_A[name], ad.lora_B[name]
        expected[..., i * d:(i + 1) * d] += (alpha / r) * (xsum @ a_s.t()) @ b.t()
    assert rel_err(layer(x), expected) < 1e-6


def test_update_is_block_matrix_with_shared_down_projection():
    model = tiny_vit()
    w0 = model.blocks[1].attn.qkv.weight.detach().clone()
    r, n = 2, 8
    pm = vpeft.get_peft_model(model, BlockLoraConfig(r=r, num_blocks=n))
    randomize_adapters(pm)
    pm.merge()
    delta = model.blocks[1].attn.qkv.weight.detach() - w0
    d = model.embed_dim
    blocks = delta.split(d // n, dim=1)  # the n input-column blocks
    assert len(blocks) == n and blocks[0].abs().max() > 0
    for blk in blocks[1:]:
        torch.testing.assert_close(blk, blocks[0], rtol=0, atol=1e-6)
    for i in range(3):  # each q/k/v slice is a rank-r update
        assert torch.linalg.matrix_rank(delta[i * d:(i + 1) * d].double(), atol=1e-5) == r


def test_equals_lora_with_tiled_down_projection():
    """Block-LoRA is LoRA whose A is [A_s, ..., A_s]: the core LoRA with that A must give the same outputs."""
    model = tiny_vit()
    ref = copy.deepcopy(model)
    r, n = 2, 4
    pm = vpeft.get_peft_model(model, BlockLoraConfig(r=r, num_blocks=n, alpha=1.0))
    randomize_adapters(pm)
    pm_ref = vpeft.get_peft_model(ref, vpeft.LoraConfig(r=r, alpha=1.0, targets=["q", "k", "v"]))
    with torch.no_grad():
        for path, layer in pm.adapter_layers().items():
            ours, lora = layer.block_lora, pm_ref.adapter_layers()[path].lora
            for name in "qkv":
                lora.lora_A[name].copy_(torch.cat([ours.lora_A[name]] * n, dim=1))
                lora.lora_B[name].copy_(ours.lora_B[name])
        y, y_ref = pm(IMG), pm_ref(IMG)
    assert rel_err(y, y_ref) < 1e-5
    with torch.no_grad(), pm.disabled():
        assert rel_err(pm(IMG), y) > 1e-3  # the adapter does change the output


def test_gradients_reach_adapters_only():
    model = tiny_vit()
    pm = vpeft.get_peft_model(model, BlockLoraConfig(dropout=0.0))
    randomize_adapters(pm)
    pm(IMG).square().mean().backward()
    ad = pm.adapter_layers()["blocks.0.attn.qkv"].block_lora
    for name in "qkv":
        assert ad.lora_A[name].grad is not None and ad.lora_A[name].grad.abs().sum() > 0
        assert ad.lora_B[name].grad is not None and ad.lora_B[name].grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if "block_lora" not in n)


# --- merge and adapter I/O --------------------------------------------------------------------------------------------

def test_merge_exact_timm():
    model = tiny_vit()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    pm = vpeft.get_peft_model(model, BlockLoraConfig(targets=["q", "k", "v", "mlp_in"]))
    randomize_adapters(pm)
    with torch.no_grad():
        y = pm(IMG)
        pm.merge()
        assert rel_err(pm(IMG), y) < 1e-5
        pm.unmerge()
        for k, v in pm.unload().state_dict().items():
            torch.testing.assert_close(v, w0[k], rtol=0, atol=1e-6)


def test_merge_and_unload_open_clip_both_towers():
    model = tiny_clip()
    pm = vpeft.get_peft_model(model, BlockLoraConfig(towers=["visual", "text"]))
    randomize_adapters(pm)
    with torch.no_grad():
        yi, yt = pm.encode_image(IMG), pm.encode_text(TXT)
        with pm.disabled():
            assert rel_err(pm.encode_image(IMG), yi) > 1e-3
        plain = pm.merge_and_unload()
        assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
        assert rel_err(plain.encode_image(IMG), yi) < 1e-5
        assert rel_err(plain.encode_text(TXT), yt) < 1e-5


def test_save_load_round_trip(tmp_path):
    model = tiny_clip()
    fresh = copy.deepcopy(model)
    pm = vpeft.get_peft_model(model, BlockLoraConfig(r=2, num_blocks=4, towers=["visual", "text"]))
    randomize_adapters(pm)
    pm.save_adapter(str(tmp_path))
    pm2 = vpeft.PeftModel.from_pretrained(fresh, str(tmp_path)).eval()
    assert pm2.configs[0] == pm.configs[0]
    with torch.no_grad():
        assert torch.equal(pm2.encode_image(IMG), pm.encode_image(IMG))
        assert torch.equal(pm2.encode_text(TXT), pm.encode_text(TXT))


# --- config checks ----------------------------------------------------------------------------------------------------

def test_config_json_round_trip():
    cfg = BlockLoraConfig(r=3, num_blocks=4, alpha=None, targets=["q", "v"])
    d = cfg.to_dict()
    assert d["method"] == "block_lora"
    assert vpeft.PeftConfig.from_dict(d) == cfg


@pytest.mark.parametrize("kwargs", [dict(num_blocks=0), dict(r=0), dict(dropout=1.0), dict(init_a="xavier"),
                                    dict(num_blocks=2.0)])
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        vpeft.get_peft_model(tiny_vit(), BlockLoraConfig(**kwargs))


def test_num_blocks_must_divide_width_and_model_is_untouched():
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"num_blocks=3 does not divide .*blocks\.0\.attn\.qkv"):
        vpeft.get_peft_model(model, BlockLoraConfig(num_blocks=3))
    with pytest.raises(ValueError, match="rank r=16"):  # the shared block is only 64 / 8 = 8 wide
        vpeft.get_peft_model(model, BlockLoraConfig(r=16, num_blocks=8))
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
