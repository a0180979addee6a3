"""PeftModel behaviour: the issue's reference counts, adapter files, and bad input (raised before any mutation)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import make_clip, make_timm
from test_conformance import assert_same_state, perturb, rel_err, snapshot

import vpeft
from vpeft.methods.layers import AdapterLayer


@pytest.fixture(scope="module")
def vit_b_meta():
    # Parameter counting needs shapes only: build ViT-B/16 on the meta device (no memory, ~2 s).
    with torch.device("meta"):
        return vpeft.create_backbone("timm:vit_base_patch16_224", num_classes=0)


@pytest.mark.parametrize("cfg, expected", [
    (vpeft.LoraConfig(r=8, targets=["q", "v"]), 12 * 2 * 8 * (768 + 768)),
    (vpeft.VPTConfig(num_tokens=50, deep=True), 12 * 50 * 768),
    (vpeft.VPTConfig(num_tokens=50, deep=False), 50 * 768),
    # SSF docstring formula 2 * (L * (3d + d + h + d + d + d) + d + d) with L=12, d=768, h=3072.
    (vpeft.SSFConfig(), 2 * (12 * (3 * 768 + 768 + 3072 + 768 + 768 + 768) + 768 + 768)),
    # BitFit: L * (3d + d + h + d + 2d) + 2d; LN-Tune: 2 * (2L + 1) * d.
    (vpeft.BitFitConfig(), 12 * (3 * 768 + 768 + 3072 + 768 + 2 * 768) + 2 * 768),
    (vpeft.LNTuneConfig(), 2 * (2 * 12 + 1) * 768),
], ids=["lora_qv", "vpt_deep", "vpt_shallow", "ssf", "bitfit", "ln_tune"])
def test_vit_b_trainable_counts(vit_b_meta, cfg, expected):
    pm = vpeft.get_peft_model(vit_b_meta, cfg)
    try:
        assert pm.num_parameters(trainable_only=True) == expected
    finally:
        pm.unload()


def test_reference_counts_are_the_issue_numbers():
    # The numbers the foundation issue asks for, written out.
    assert 12 * 2 * 8 * (768 + 768) == 294_912
    assert 12 * 50 * 768 == 460_800 and 50 * 768 == 38_400
    assert 2 * (12 * (3 * 768 + 768 + 3072 + 768 + 768 + 768) + 768 + 768) == 205_824  # paper: ~0.2M


def test_print_trainable_parameters(capsys):
    pm = vpeft.get_peft_model(make_timm(), vpeft.LoraConfig(r=2), trainable_extra=["head"])
    line = pm.print_trainable_parameters()
    lora = 2 * 2 * 2 * (64 + 64)
    head = 64 * 5 + 5
    total = sum(p.numel() for p in make_timm().parameters()) + lora
    assert line == f"trainable: {lora + head:,} / {total:,} ({100 * (lora + head) / total:.2f}%)"
    assert capsys.readouterr().out.strip() == line


def test_head_trains_and_is_saved(tmp_path):
    pm = vpeft.get_peft_model(make_timm(), vpeft.SSFConfig(), trainable_extra=["head"])
    sd = pm.adapter_state_dict()
    assert "head.weight" in sd and "head.bias" in sd
    assert pm.base_model.head.weight.requires_grad
    assert not pm.base_model.blocks[0].mlp.fc1.weight.requires_grad
    with torch.no_grad():
        pm.base_model.head.weight.add_(1.0)
    x = torch.randn(2, 3, 32, 32)
    pm.save_adapter(str(tmp_path))
    pm2 = vpeft.PeftModel.from_pretrained(make_timm(), str(tmp_path))
    with torch.no_grad():
        assert torch.equal(pm2(x), pm(x))


def test_linear_probe_without_methods():
    pm = vpeft.get_peft_model(make_timm(), [], trainable_extra=["head"])
    assert pm.num_parameters(True) == 64 * 5 + 5


def test_clip_lora_touches_only_q_and_v_slices():
    model = make_clip()
    w0 = model.visual.transformer.resblocks[0].attn.in_proj_weight.detach().clone()
    pm = vpeft.get_peft_model(model, vpeft.LoraConfig(r=4, targets=["q", "v"]))
    perturb(pm)
    pm.merge()
    w1 = pm.base_model.visual.transformer.resblocks[0].attn.in_proj_weight
    d = 64
    assert not torch.equal(w1[:d], w0[:d]) and not torch.equal(w1[2 * d:], w0[2 * d:])
    assert torch.equal(w1[d:2 * d], w0[d:2 * d]), "the k slice must not change"
    # Text tower untouched: LoRA went on the default (image) tower only.
    assert pm.base_model.transformer.resblocks[0].attn.in_proj_weight.requires_grad is False
    assert not any(isinstance(m, AdapterLayer) for m in pm.base_model.transformer.modules())


@pytest.mark.slow
def test_clip_vit_b16_lora_merge_and_slices():
    torch.manual_seed(0)
    model = vpeft.create_backbone("open_clip:ViT-B-16").eval()
    attn = model.visual.transformer.resblocks[3].attn
    w0 = attn.in_proj_weight.detach().clone()
    pm = vpeft.get_peft_model(model, vpeft.LoraConfig(r=8, targets=["q", "v"]))
    assert pm.num_parameters(True) == 12 * 2 * 8 * (768 + 768)
    perturb(pm)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        y = pm.encode_image(x)
        pm.merge()
        y_m = pm.encode_image(x)
    assert rel_err(y_m, y) < 1e-5
    w1 = pm.base_model.visual.transformer.resblocks[3].attn.in_proj_weight
    assert torch.equal(w1[768:1536], w0[768:1536])
    assert not torch.equal(w1[:768], w0[:768]) and not torch.equal(w1[1536:], w0[1536:])


@pytest.mark.slow
def test_vit_b_adapter_file_is_small_and_exact(tmp_path):
    torch.manual_seed(0)
    model = vpeft.create_backbone("timm:vit_base_patch16_224", num_classes=0).eval()
    pm = vpeft.get_peft_model(model, vpeft.LoraConfig(r=8, targets=["q", "v"]))
    perturb(pm)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        y = pm(x)
    pm.save_adapter(str(tmp_path))
    size = os.path.getsize(tmp_path / "adapter_model.safetensors")
    assert 294_912 * 4 <= size < 294_912 * 4 + 64_000  # ~1.2 MB of fp32 adapter tensors plus a small header
    torch.manual_seed(0)
    fresh = vpeft.create_backbone("timm:vit_base_patch16_224", num_classes=0).eval()
    pm2 = vpeft.PeftModel.from_pretrained(fresh, str(tmp_path))
    with torch.no_grad():
        assert torch.equal(pm2(x), y)


# --- bad input: a clear error, the model untouched ----------------------------------------------------------------


def _untouched(model, before):
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert_same_state(before, snapshot(model))
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("configs, exc, match", [
    ([object()], TypeError, "expected a vpeft PeftConfig"),
    ([vpeft.LoraConfig(targets=["q", "nope"])], ValueError, r"site 'nope' does not exist.*available sites"),
    ([vpeft.LoraConfig(targets=["text.q"])], ValueError, "has no tower 'text'"),
    ([vpeft.LoraConfig(targets=["pre_norm"])], ValueError, "site 'pre_norm' does not exist"),
    ([vpeft.LoraConfig(r=65, targets=["q"])], ValueError, "rank r=65 is larger than the layer"),
    ([vpeft.LoraConfig(r=0)], ValueError, "r must be a positive int"),
    ([vpeft.LoraConfig(layers=[7])], ValueError, "layer index 7 out of range"),
    ([vpeft.LoraConfig(targets=["norm1"])], ValueError, "cannot attach to site 'norm1'"),
    ([vpeft.SSFConfig(targets=["q"])], ValueError, "target 'qkv' instead"),
    ([vpeft.SSFConfig(), vpeft.LoraConfig(targets=["bad"])], ValueError, "site 'bad'"),
])
def test_bad_config_raises_before_mutation(configs, exc, match):
    model = make_timm()
    before = snapshot(model)
    with pytest.raises(exc, match=match):
        vpeft.get_peft_model(model, configs)
    _untouched(model, before)


def test_unknown_method_name():
    with pytest.raises(ValueError, match=r"unknown PEFT method 'nope'; registered methods: \[.*'lora'"):
        vpeft.PeftConfig.from_dict({"method": "nope"})
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['rank_typo'\]"):
        vpeft.PeftConfig.from_dict({"method": "lora", "rank_typo": 3})


def test_unsupported_backbone_and_double_wrap():
    with pytest.raises(TypeError, match="no backbone spec for model class"):
        vpeft.get_peft_model(torch.nn.Linear(3, 3), vpeft.LoraConfig())
    pm = vpeft.get_peft_model(make_timm(), vpeft.LoraConfig())
    with pytest.raises(TypeError, match="already a PeftModel"):
        vpeft.get_peft_model(pm, vpeft.LoraConfig())
    with pytest.raises(ValueError, match="already holds vpeft adapter wrappers"):
        vpeft.get_peft_model(pm.base_model, vpeft.LoraConfig())


def test_config_json_roundtrip():
    for cfg in [vpeft.LoraConfig(r=3, alpha=6.0, targets=["q", "mlp_in"], layers=[0]), vpeft.VPTConfig(deep=False),
                vpeft.SSFConfig(towers=["text"])]:
        assert vpeft.PeftConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.fixture
def saved(tmp_path):
    pm = vpeft.get_peft_model(make_timm(), [vpeft.LoraConfig(r=2), vpeft.SSFConfig()])
    perturb(pm)
    pm.save_adapter(str(tmp_path))
    return tmp_path


def _load_fails(directory, match, model=None):
    model = model if model is not None else make_timm()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        vpeft.PeftModel.from_pretrained(model, str(directory))
    _untouched(model, before)


def test_load_fingerprint_mismatch(saved):
    _load_fails(saved, "saved from another backbone", make_timm(num_classes=7))
    _load_fails(saved, "saved from another backbone", make_clip())


def test_load_corrupt_or_truncated(saved):
    path = saved / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _load_fails(saved, "corrupt or truncated")
    path.write_bytes(b"\x00" * 16)
    _load_fails(saved, "corrupt or truncated")
    (saved / "adapter_model.safetensors").unlink()
    _load_fails(saved, "lacks adapter_model.safetensors")


def test_load_bad_config_json(saved):
    (saved / "vpeft_config.json").write_text("{not json")
    _load_fails(saved, "not valid JSON")


def _rewrite(saved, edit):
    from safetensors.torch import load_file, save_file

    path = str(saved / "adapter_model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    meta = json.loads((saved / "vpeft_config.json").read_text())
    meta["num_tensors"] = len(tensors)
    (saved / "vpeft_config.json").write_text(json.dumps(meta))


def test_load_missing_key(saved):
    _rewrite(saved, lambda t: t.pop(sorted(t)[0]))
    _load_fails(saved, r"adapter keys do not match this model: missing \['blocks")


def test_load_unexpected_key(saved):
    _rewrite(saved, lambda t: t.__setitem__("blocks.0.attn.qkv.lora.lora_A.k", torch.zeros(2, 64)))
    _load_fails(saved, r"unexpected \['blocks.0.attn.qkv.lora.lora_A.k'\]")


def test_load_wrong_shape(saved):
    _rewrite(saved, lambda t: t.__setitem__("blocks.0.attn.qkv.lora.lora_A.q", torch.zeros(3, 64)))
    _load_fails(saved, "shapes do not match")


def test_unloaded_model_refuses_more_work():
    pm = vpeft.get_peft_model(make_timm(), vpeft.LoraConfig())
    pm.unload()
    with pytest.raises(ValueError, match="was unloaded"):
        pm.merge()
