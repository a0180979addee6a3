"""Comp-LoRA numerics: the update is orthogonal to the frozen weight's principal singular subspaces (checked against
an independent numpy SVD), inputs along the principal directions pass unchanged, parameter formula, fixed bases that
neither train nor enter adapter files, merge exactness and an exact save/load round trip."""

import copy

import numpy as np
import pytest
import torch
from conftest import make_clip as tiny_clip
from conftest import make_timm as tiny_vit
from conftest import randomize_adapters, rel_err

import vpeft
import vpeft.backbones.timm_vit  # noqa: F401  (registers the timm ViT spec)
from vpeft.methods.comp_lora import CompLoraConfig
from vpeft.methods.layers import AdapterLayer

timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """LAPACK's threaded SVD of these 64 x 64 weights is slower than a single thread (and much slower on a busy
    machine); the tests time the library, not the thread pool."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def top_k_np(w, k):
    """Independent reference: top-k left/right singular vectors from numpy's float64 SVD."""
    u, _, vt = np.linalg.svd(np.asarray(w, dtype=np.float64))
    return u[:, :k], vt[:k].T


IMG = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
TXT = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(6))


# --- the defining property: the update avoids the principal subspaces ----------------------------------------------

@pytest.mark.parametrize("k", [0.5, 10])
def test_update_orthogonal_to_principal_subspace_timm(k):
    model = tiny_vit()
    d = model.embed_dim
    w0 = model.blocks[0].attn.qkv.weight.detach().clone()
    pm = vpeft.get_peft_model(model, CompLoraConfig(r=2, k=k, dropout=0.0))
    randomize_adapters(pm)
    layer = pm.adapter_layers()["blocks.0.attn.qkv"]
    # delta W read off the forward pass: feed the identity (one basis vector per row), subtract the base output
    eye = torch.eye(d)
    with torch.no_grad():
        delta = (layer(eye) - layer.base_layer(eye)).t().double().numpy()  # (3d, d)
    k_abs = round(k * d) if isinstance(k, float) else k
    ad = layer.comp_lora
    for i, name in enumerate("qkv"):
        dw = delta[i * d:(i + 1) * d]
        u_k, v_k = top_k_np(w0[i * d:(i + 1) * d], k_abs)
        norm = np.linalg.norm(dw)
        assert norm > 1e-3
        assert np.linalg.norm(u_k.T @ dw) / norm < 1e-5  # nothing reaches the principal output directions
        assert np.linalg.norm(dw @ v_k) / norm < 1e-5  # principal input directions are ignored
        # the same A, B without the projections would hit the principal subspace: the check discriminates
        raw = (ad.lora_B[name] @ ad.lora_A[name]).detach().double().numpy()
        assert np.linalg.norm(u_k.T @ raw) / np.linalg.norm(raw) > 0.1


def test_update_orthogonal_on_packed_open_clip_slices():
    model = tiny_clip()
    w = model.visual.transformer.width
    attn = model.transformer.resblocks[1].attn  # text tower, packed in_proj_weight
    w0 = attn.in_proj_weight.detach().clone()
    pm = vpeft.get_peft_model(model, CompLoraConfig(r=2, k=16, towers=["visual", "text"]))
    randomize_adapters(pm)
    with torch.no_grad():
        pm.merge()
    delta = (attn.in_proj_weight.detach() - w0).double().numpy()
    for i in range(3):
        dw = delta[i * w:(i + 1) * w]
        u_k, v_k = top_k_np(w0[i * w:(i + 1) * w], 16)
        assert np.linalg.norm(dw) > 1e-3
        assert np.linalg.norm(u_k.T @ dw) / np.linalg.norm(dw) < 1e-5
        assert np.linalg.norm(dw @ v_k) / np.linalg.norm(dw) < 1e-5


def test_principal_inputs_pass_unchanged():
    model = tiny_vit()
    d = model.embed_dim
    w_q = model.blocks[1].attn.qkv.weight[:d].detach().clone()
    pm = vpeft.get_peft_model(model, CompLoraConfig(r=4, k=24, targets=["q"], dropout=0.0))
    randomize_adapters(pm)
    layer = pm.adapter_layers()["blocks.1.attn.qkv"]
    _, v_k = top_k_np(w_q, 24)
    coeffs = np.random.default_rng(0).standard_normal((5, 24))
    x_principal = torch.from_numpy(coeffs @ v_k.T).float()  # inputs inside span(V_k)
    x_random = torch.randn(5, d)
    with torch.no_grad():
        y, y0 = layer(x_principal), layer.base_layer(x_principal)
        assert rel_err(y, y0) < 1e-5
        assert rel_err(layer(x_random), layer.base_layer(x_random)) > 1e-3


# --- parameters, buffers, files ---------------------------------------------------------------------------------------

def test_trainable_parameters_match_lora_formula():
    model = tiny_vit()
    d, depth = model.embed_dim, len(model.blocks)
    hidden = model.blocks[0].mlp.fc1.out_features
    r = 3
    pm = vpeft.get_peft_model(model, CompLoraConfig(r=r, targets=["q", "k", "v", "mlp_in"]))
    assert pm.num_parameters(True) == depth * (3 * r * (d + d) + r * (d + hidden))


def test_trainable_parameters_open_clip_both_towers():
    model = tiny_clip()
    r = 2
    pm = vpeft.get_peft_model(model, CompLoraConfig(r=r, towers=["visual", "text"]))
    expected = sum(len(t.resblocks) * 3 * r * (t.width + t.width) for t in (model.visual.transformer,
                                                                           model.transformer))
    assert pm.num_parameters(True) == expected


def test_bases_are_fixed_and_not_saved(tmp_path):
    model = tiny_vit()
    d, depth = model.embed_dim, len(model.blocks)
    pm = vpeft.get_peft_model(model, CompLoraConfig(r=2, k=8))
    ad = pm.adapter_layers()["blocks.0.attn.qkv"].comp_lora
    u_k, v_k = ad.bases("q")
    assert u_k.shape == (d, 8) and v_k.shape == (d, 8)
    assert not u_k.requires_grad and all(p is not u_k for p in pm.parameters())
    keys = pm.adapter_state_dict()
    assert len(keys) == depth * 3 * 2 and all(".lora_A." in k or ".lora_B." in k for k in keys)
    before = {n: b.clone() for n, b in pm.named_buffers() if "basis" in n}
    assert len(before) == depth * 3 * 2
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=1.0)
    randomize_adapters(pm)
    pm(IMG).square().mean().backward()
    opt.step()
    assert all(torch.equal(b, before[n]) for n, b in pm.named_buffers() if "basis" in n)
    pm.save_adapter(str(tmp_path))
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "adapter_model.safetensors"))) == set(keys)


def test_save_load_round_trip_is_exact(tmp_path):
    model = tiny_clip()
    fresh = copy.deepcopy(model)
    pm = vpeft.get_peft_model(model, CompLoraConfig(r=2, k=0.25, towers=["visual", "text"]))
    randomize_adapters(pm)
    pm.save_adapter(str(tmp_path))
    pm2 = vpeft.PeftModel.from_pretrained(fresh, str(tmp_path)).eval()
    assert pm2.configs[0] == pm.configs[0]
    bufs2 = dict(pm2.named_buffers())
    for name, buf in pm.named_buffers():
        if "basis" in name:
            assert torch.equal(bufs2[name], buf)  # recomputed from the same frozen weights, bit for bit
    with torch.no_grad():
        assert torch.equal(pm2.encode_image(IMG), pm.encode_image(IMG))
        assert torch.equal(pm2.encode_text(TXT), pm.encode_text(TXT))


# --- merge ------------------------------------------------------------------------------------------------------------

def test_merge_exact_timm():
    model = tiny_vit()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    pm = vpeft.get_peft_model(model, CompLoraConfig(targets=["q", "k", "v", "mlp_out"]))
    randomize_adapters(pm)
    with torch.no_grad():
        y = pm(IMG)
        with pm.disabled():
            assert rel_err(pm(IMG), y) > 1e-3
        pm.merge()
        assert rel_err(pm(IMG), y) < 1e-5
        pm.unmerge()
        for k, v in pm.unload().state_dict().items():
            torch.testing.assert_close(v, w0[k], rtol=0, atol=1e-6)


def test_merge_and_unload_open_clip():
    model = tiny_clip()
    pm = vpeft.get_peft_model(model, CompLoraConfig(towers=["visual", "text"]))
    randomize_adapters(pm)
    with torch.no_grad():
        yi, yt = pm.encode_image(IMG), pm.encode_text(TXT)
        plain = pm.merge_and_unload()
        assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
        assert rel_err(plain.encode_image(IMG), yi) < 1e-5
        assert rel_err(plain.encode_text(TXT), yt) < 1e-5


def test_buffers_follow_dtype():
    pm = vpeft.get_peft_model(tiny_vit(), CompLoraConfig(k=4)).to(torch.float64)
    randomize_adapters(pm)
    ad = pm.adapter_layers()["blocks.0.attn.qkv"].comp_lora
    assert all(b.dtype == torch.float64 for b in ad.bases("v"))
    assert pm(IMG.double()).dtype == torch.float64


# --- config checks ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [0.5, 12])
def test_config_json_round_trip_keeps_k_kind(k):
    cfg = CompLoraConfig(r=2, k=k, targets=["q", "v"])
    back = vpeft.PeftConfig.from_dict(cfg.to_dict())
    assert back == cfg and type(back.k) is type(k)


@pytest.mark.parametrize("kwargs,exc", [(dict(k=0), ValueError), (dict(k=1.0), ValueError), (dict(k=True), TypeError),
                                        (dict(k="half"), TypeError), (dict(r=0), ValueError),
                                        (dict(dropout=-0.1), ValueError)])
def test_config_validation(kwargs, exc):
    with pytest.raises(exc):
        vpeft.get_peft_model(tiny_vit(), CompLoraConfig(**kwargs))


def test_subspace_too_large_is_refused_before_mutation():
    model = tiny_vit()
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv.*k=63.*k \+ r <= 64"):
        vpeft.get_peft_model(model, CompLoraConfig(r=2, k=63))
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
