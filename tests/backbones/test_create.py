"""``create_backbone``: official checkpoint formats, emulated by saving randomly initialised tiny models in each
format and loading them through the real loaders; QuickGELU for OpenAI weights; readable errors.

Expectations come from the saved model itself (bit-identical outputs), from open_clip's and timm's own modules
built independently of vpeft, or from hand-written format converters.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from _backbone_helpers import (
    CLIP,
    CLIP_QK_NORM,
    TIMM_ARCH,
    TIMM_KW,
    images,
    make_clip,
    make_timm,
    randomize_,
    register_clips,
    tokens,
)
from safetensors.torch import save_file

import vpeft

OPENAI_SCALARS = {"input_resolution": torch.tensor(32), "context_length": torch.tensor(16),
                  "vocab_size": torch.tensor(100)}


def _save(obj: dict, path) -> str:
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in obj.items()}, path)
    else:
        torch.save(obj, path)
    return path


def _assert_same_weights(a: nn.Module, b: nn.Module, skip: tuple[str, ...] = ()) -> None:
    """Same keys and bit-identical values, ignoring keys that start with one of ``skip``."""
    sa = {k: v for k, v in a.state_dict().items() if not k.startswith(skip)}
    sb = {k: v for k, v in b.state_dict().items() if not k.startswith(skip)}
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# --- timm ------------------------------------------------------------------------------------------------------------


def _timm_files(tmp_path, model: nn.Module) -> dict[str, str]:
    sd = model.state_dict()
    return {
        "pth": _save(sd, tmp_path / "model.pth"),  # timm's own torch.save format (.pth/.bin)
        "safetensors": _save(sd, tmp_path / "model.safetensors"),  # timm's hub format
        "deit": _save({"model": sd}, tmp_path / "deit.pth"),  # facebookresearch/deit release: {"model": ...}
        "ddp": _save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "ddp.pth"),
    }


@pytest.mark.parametrize("arch, fmt", [(TIMM_ARCH, "pth"), (TIMM_ARCH, "safetensors"), (TIMM_ARCH, "ddp"),
                                       ("deit_tiny_patch16_224", "deit")])
def test_timm_checkpoint_loads_bit_identical(tmp_path, arch, fmt):
    ref = randomize_(make_timm(arch=arch, num_classes=5))
    path = _timm_files(tmp_path, ref)[fmt]
    x = images()
    # No num_classes: the classifier follows the file (timm's configs say 1000 classes; the file holds 5).
    for kw in ({}, {"num_classes": 5}):
        model = vpeft.create_backbone(f"timm:{arch}", pretrained=path, **TIMM_KW, **kw).eval()
        assert model.vpeft_backbone_id == f"timm:{arch}"
        assert model.num_classes == 5
        _assert_same_weights(model, ref)
        assert torch.equal(model(x), ref(x))


@pytest.mark.parametrize("num_classes", [7, 0])
@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_timm_other_num_classes_drops_head(tmp_path, fmt, num_classes):
    ref = randomize_(make_timm(num_classes=5))
    path = _timm_files(tmp_path, ref)[fmt]
    model = vpeft.create_backbone(f"timm:{TIMM_ARCH}", pretrained=path, num_classes=num_classes, **TIMM_KW).eval()
    x = images()
    _assert_same_weights(model, ref, skip=("head.",))
    feats = ref.forward_features(x)
    assert torch.equal(model.forward_features(x), feats)
    assert torch.equal(model.forward_head(model.forward_features(x), pre_logits=True),
                       ref.forward_head(feats, pre_logits=True))
    if num_classes == 0:
        assert isinstance(model.head, nn.Identity)
        assert torch.equal(model(x), ref.forward_head(feats, pre_logits=True))
    else:
        assert model.head.weight.shape == (num_classes, 64)
        assert model(x).shape == (2, num_classes)


def test_timm_headless_checkpoint(tmp_path):
    ref = randomize_(make_timm(num_classes=0))
    path = _save(ref.state_dict(), tmp_path / "headless.pth")
    x = images()
    model = vpeft.create_backbone(f"timm:{TIMM_ARCH}", pretrained=path, **TIMM_KW).eval()
    assert model.num_classes == 0 and isinstance(model.head, nn.Identity)
    assert torch.equal(model(x), ref(x))
    model = vpeft.create_backbone(f"timm:{TIMM_ARCH}", pretrained=path, num_classes=3, **TIMM_KW).eval()
    assert model(x).shape == (2, 3)
    assert torch.equal(model.forward_head(model.forward_features(x), pre_logits=True), ref(x))


@pytest.mark.parametrize("num_classes", [5, 7])
def test_timm_partial_checkpoint_is_refused(tmp_path, num_classes):
    """timm loads non-strictly when it drops a classifier (num_classes 7 here): without vpeft's key check a file
    missing a whole block would leave that block silently random."""
    sd = {k: v for k, v in randomize_(make_timm(num_classes=5)).state_dict().items() if not k.startswith("blocks.1.")}
    path = _save(sd, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"does not fit timm 'vit_tiny_patch16_224'.*12 missing keys \['blocks\.1\."):
        vpeft.create_backbone(f"timm:{TIMM_ARCH}", pretrained=path, num_classes=num_classes, **TIMM_KW)


def test_timm_checkpoint_of_another_arch_is_refused(tmp_path):
    path = _save(make_clip(CLIP).state_dict(), tmp_path / "open_clip.bin")  # converted by timm's OpenAI-CLIP filter
    with pytest.raises(ValueError, match=r"missing keys \['patch_embed.proj.bias'\], 2 unexpected keys \['norm_pre"):
        vpeft.create_backbone(f"timm:{TIMM_ARCH}", pretrained=path, num_classes=7, **TIMM_KW)
    path = _save(make_timm(embed_dim=32, num_heads=2).state_dict(), tmp_path / "narrow.pth")
    with pytest.raises(ValueError, match=r"shape mismatches \['cls_token: \(1, 1, 32\) in the file, \(1, 1, 64\)"):
        vpeft.create_backbone(f"timm:{TIMM_ARCH}", pretrained=path, num_classes=0, **TIMM_KW)


def test_timm_adapts_resolution_and_input_channels(tmp_path):
    """What timm adapts on load (position embeddings to another image size, the patch conv to other input
    channels) still loads, with the rest of the weights bit-identical."""
    ref = randomize_(make_timm(num_classes=5))
    path = _save(ref.state_dict(), tmp_path / "model.pth")
    big = vpeft.create_backbone(f"timm:{TIMM_ARCH}", pretrained=path, **{**TIMM_KW, "img_size": 48}).eval()
    assert big.pos_embed.shape == (1, 1 + 36, 64)
    _assert_same_weights(big, ref, skip=("pos_embed",))
    gray = vpeft.create_backbone(f"timm:{TIMM_ARCH}", pretrained=path, in_chans=1, **TIMM_KW).eval()
    torch.testing.assert_close(gray.patch_embed.proj.weight[:, 0], ref.patch_embed.proj.weight.sum(1))
    _assert_same_weights(gray, ref, skip=("patch_embed.proj.weight",))


def _to_augreg_npz(model: nn.Module, path) -> str:
    """Write a timm ViT in the layout of Google's AugReg ``.npz`` release (JAX/Flax names, kernels in-by-out)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    d, h = model.embed_dim, model.blocks[0].attn.num_heads
    w = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),  # OIHW -> HWIO
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T,
        "head/bias": sd["head.bias"],
    }
    for i in range(len(model.blocks)):
        p, b = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        for ln, norm in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            w[f"{p}{ln}/scale"], w[f"{p}{ln}/bias"] = sd[f"{b}{norm}.weight"], sd[f"{b}{norm}.bias"]
        qkv_w, qkv_b = sd[f"{b}attn.qkv.weight"], sd[f"{b}attn.qkv.bias"]
        for j, n in enumerate(("query", "key", "value")):
            w[f"{p}MultiHeadDotProductAttention_1/{n}/kernel"] = qkv_w[j * d:(j + 1) * d].T.reshape(d, h, d // h)
            w[f"{p}MultiHeadDotProductAttention_1/{n}/bias"] = qkv_b[j * d:(j + 1) * d].reshape(h, d // h)
        w[f"{p}MultiHeadDotProductAttention_1/out/kernel"] = (
            sd[f"{b}attn.proj.weight"].reshape(d, h, d // h).transpose(1, 2, 0))
        w[f"{p}MultiHeadDotProductAttention_1/out/bias"] = sd[f"{b}attn.proj.bias"]
        for r in range(2):
            w[f"{p}MlpBlock_3/Dense_{r}/kernel"] = sd[f"{b}mlp.fc{r + 1}.weight"].T
            w[f"{p}MlpBlock_3/Dense_{r}/bias"] = sd[f"{b}mlp.fc{r + 1}.bias"]
    np.savez(path, **w)
    return os.fspath(path)


def test_timm_augreg_npz(tmp_path):
    ref = randomize_(make_timm(num_classes=5))
    path = _to_augreg_npz(ref, tmp_path / "Ti_16-i21k.npz")
    x = images()
    model = vpeft.create_backbone(f"timm:{TIMM_ARCH}", pretrained=path, **TIMM_KW).eval()
    assert model.num_classes == 5
    _assert_same_weights(model, ref)
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=1e-6)  # the npz loader re-lays kernels out
    other = vpeft.create_backbone(f"timm:{TIMM_ARCH}", pretrained=path, num_classes=3, **TIMM_KW).eval()
    torch.testing.assert_close(other.forward_features(x), ref.forward_features(x), rtol=0, atol=1e-6)


def test_timm_openai_clip_format(tmp_path):
    """An OpenAI-CLIP-format state dict (here: open_clip's CLIP, which keeps OpenAI's key names) loads into timm's
    ``vit_*_clip_quickgelu_*`` through timm's filter; the projection becomes the head. Cross-code-path check
    against open_clip's own image encoder."""
    ref = randomize_(make_clip(CLIP, force_quick_gelu=True))
    path = _save({**ref.state_dict(), **OPENAI_SCALARS}, tmp_path / "openai_clip.pt")
    x = images()
    expected = ref.encode_image(x)
    model = vpeft.create_backbone("timm:vit_base_patch16_clip_quickgelu_224", pretrained=path, **TIMM_KW).eval()
    assert model.num_classes == 32  # the file's projection width, although timm's config says 512
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    # "timm:vit_base_patch16_clip_224" defaults to a 1000-class tag; the head still follows the file.
    gelu = vpeft.create_backbone("timm:vit_base_patch16_clip_224", pretrained=path, **TIMM_KW).eval()
    assert gelu.num_classes == 32 and torch.equal(gelu.head.weight, model.head.weight)
    other = vpeft.create_backbone("timm:vit_base_patch16_clip_quickgelu_224", pretrained=path, num_classes=3,
                                  **TIMM_KW).eval()
    torch.testing.assert_close(other.forward_head(other.forward_features(x), pre_logits=True),
                               model.forward_head(model.forward_features(x), pre_logits=True), rtol=0, atol=0)


# --- open_clip -------------------------------------------------------------------------------------------------------


def _assert_same_clip_outputs(model: nn.Module, ref: nn.Module) -> None:
    x, t = images(), tokens()
    assert torch.equal(model.encode_image(x), ref.encode_image(x))
    assert torch.equal(model.encode_text(t), ref.encode_text(t))
    assert torch.equal(model.logit_scale, ref.logit_scale)


@pytest.mark.parametrize("fmt", ["bin", "safetensors", "train"])
@pytest.mark.parametrize("arch", [CLIP, CLIP_QK_NORM])
def test_open_clip_checkpoint_loads_bit_identical(tmp_path, arch, fmt):
    ref = randomize_(make_clip(arch))
    sd = ref.state_dict()
    if fmt == "bin":  # open_clip_pytorch_model.bin on the hub
        path = _save(sd, tmp_path / "open_clip_pytorch_model.bin")
    elif fmt == "safetensors":  # open_clip_model.safetensors on the hub
        path = _save(sd, tmp_path / "open_clip_model.safetensors")
    else:  # open_clip's training script: epoch_N.pt with a DDP-prefixed state dict
        path = _save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in sd.items()},
                      "optimizer": {"state": {}, "param_groups": []}}, tmp_path / "epoch_3.pt")
    model = vpeft.create_backbone(f"open_clip:{arch}", pretrained=path).eval()
    assert model.vpeft_backbone_id == f"open_clip:{arch}"
    _assert_same_weights(model, ref)
    _assert_same_clip_outputs(model, ref)


def _gelu_types(model: nn.Module) -> set[type]:
    return {type(b.mlp.gelu) for t in (model.visual.transformer, model.transformer) for b in t.resblocks}


@pytest.mark.parametrize("tag", ["openai", "OpenAI"])
def test_openai_state_dict_forces_quick_gelu(tmp_path, tag):
    """OpenAI's weights (fp16, plus the scalar entries of a TorchScript-derived state dict) from a local file:
    the ``openai`` tag must switch to QuickGELU as open_clip does when it downloads them (DESIGN section 10)."""
    from open_clip.transformer import QuickGELU

    ref = randomize_(make_clip(CLIP, force_quick_gelu=True))
    sd = {k: v.half() for k, v in ref.state_dict().items()}
    path = _save({**sd, **OPENAI_SCALARS}, tmp_path / "ViT-tiny.pt")
    ref.load_state_dict({k: v.float() for k, v in sd.items()})  # the fp16 rounding the file applies

    model = vpeft.create_backbone(f"open_clip:{CLIP}/{tag}", pretrained=path).eval()
    assert _gelu_types(model) == {QuickGELU}
    _assert_same_clip_outputs(model, ref)

    plain = vpeft.create_backbone(f"open_clip:{CLIP}", pretrained=path).eval()  # no tag: the config's GELU
    assert _gelu_types(plain) == {nn.GELU}
    _assert_same_weights(plain, ref)
    assert not torch.allclose(plain.encode_image(images()), ref.encode_image(images()), atol=1e-4)

    assert _gelu_types(vpeft.create_backbone(f"open_clip:{CLIP}/openai")) == {QuickGELU}  # random init too


def test_quick_gelu_decision_for_registered_tags():
    """Real architectures are not built here (ViT-B is slow); the decision that feeds force_quick_gelu is checked."""
    from vpeft.backbones.open_clip import _quick_gelu_for

    assert _quick_gelu_for("ViT-B-16", "openai")
    assert _quick_gelu_for("ViT-B-32", "laion400m_e31")  # open_clip trained these with QuickGELU too
    assert not _quick_gelu_for("ViT-B-16", "laion2b_s34b_b88k")
    assert not _quick_gelu_for("ViT-B-16-quickgelu", "openai")  # the config already has it
    assert not _quick_gelu_for("ViT-B-16", None)


def test_open_clip_checkpoint_of_another_arch(tmp_path):
    path = _save(randomize_(make_clip(CLIP_QK_NORM)).state_dict(), tmp_path / "qknorm.bin")
    with pytest.raises(ValueError, match=r"does not fit open_clip 'vpeft-bb-tiny'.*unexpected keys.*ln_q"):
        vpeft.create_backbone(f"open_clip:{CLIP}", pretrained=path)
    sd = make_clip(CLIP).state_dict()
    sd["visual.conv1.weight"] = sd["visual.conv1.weight"][:32]
    with pytest.raises(ValueError, match=r"(?s)could not be loaded into open_clip.*size mismatch for visual.conv1"):
        vpeft.create_backbone(f"open_clip:{CLIP}", pretrained=_save(sd, tmp_path / "bad.bin"))
    sd = make_clip(CLIP).state_dict()
    del sd["text_projection"]
    with pytest.raises(ValueError, match=r"1 missing keys \['text_projection'\]"):
        vpeft.create_backbone(f"open_clip:{CLIP}", pretrained=_save(sd, tmp_path / "missing.bin"))


# --- errors ----------------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize("family", ["timm", "open_clip"])
def test_torchscript_archive_is_refused_with_advice(tmp_path, family):
    """OpenAI's original CLIP ``.pt`` files are TorchScript archives, which weights_only loading cannot read."""
    path = os.fspath(tmp_path / "ViT-B-16.pt")
    torch.jit.script(nn.Linear(2, 2)).save(path)
    name = TIMM_ARCH if family == "timm" else f"{CLIP}/openai"
    register_clips()
    with pytest.raises(ValueError, match=r"TorchScript archive.*torch\.jit\.load\(path.*state_dict\(\)"):
        vpeft.create_backbone(f"{family}:{name}", pretrained=path)


MISSING, FOLDER = "<missing file>", "<folder>"
ERRORS = {
    # name: (backbone_id, pretrained, exception, pieces the message must name)
    "no-family": ("vit_tiny_patch16_224", False, ValueError,
                  ["'vit_tiny_patch16_224'", "<family>:<name>", "timm", "open_clip"]),
    "unknown-family": ("nope:vit", False, ValueError, ["'nope'", "'open_clip'", "'timm'"]),
    "id-not-str": (123, False, TypeError, ["int", "<family>:<name>", "timm"]),
    "timm-model": ("timm:vit_tiny_patch16", False, ValueError, ["'vit_tiny_patch16'", "vit_tiny_patch16_224"]),
    "timm-tag": ("timm:vit_tiny_patch16_224.in1k_typo", False, ValueError, ["'in1k_typo'", "augreg_in21k_ft_in1k"]),
    "open_clip-arch": ("open_clip:ViT-B-17", False, ValueError, ["'ViT-B-17'", "ViT-B-16"]),
    "open_clip-tag": ("open_clip:ViT-B-16/opnai", False, ValueError, ["'opnai'", "openai", "laion2b_s34b_b88k"]),
    "open_clip-true-no-tag": ("open_clip:ViT-B-16", True, ValueError,
                              ["needs a tag", "open_clip:ViT-B-16/openai", "laion2b_s34b_b88k"]),
    "timm-missing-file": (f"timm:{TIMM_ARCH}", MISSING, ValueError, [MISSING, "does not exist", "True, False"]),
    "open_clip-missing-file": (f"open_clip:{CLIP}", MISSING, ValueError, [MISSING, "does not exist", "True, False"]),
    "timm-folder": (f"timm:{TIMM_ARCH}", FOLDER, ValueError, [FOLDER, "is a directory", "True, False"]),
    "open_clip-folder": (f"open_clip:{CLIP}", FOLDER, ValueError, [FOLDER, "is a directory", "True, False"]),
    "timm-none": (f"timm:{TIMM_ARCH}", None, TypeError, ["NoneType", "True, False or a checkpoint path"]),
    "open_clip-int": (f"open_clip:{CLIP}", 1, TypeError, ["int", "True, False or a checkpoint path"]),
    "open_clip-bytes": (f"open_clip:{CLIP}", b"model.bin", TypeError, ["bytes", "True, False or a checkpoint path"]),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_name_the_bad_value_and_the_accepted_ones(tmp_path, case):
    register_clips()
    backbone_id, pretrained, exc, pieces = ERRORS[case]
    paths = {MISSING: os.fspath(tmp_path / "nope.pth"), FOLDER: os.fspath(tmp_path)}
    pretrained = paths.get(pretrained, pretrained) if isinstance(pretrained, str) else pretrained
    with pytest.raises(exc) as err:
        vpeft.create_backbone(backbone_id, pretrained=pretrained)
    for piece in pieces:
        assert paths.get(piece, piece) in str(err.value), (piece, str(err.value))


def test_list_backbones_and_id():
    assert {"timm", "open_clip"} <= set(vpeft.list_backbones())
    model = vpeft.create_backbone(f"timm:{TIMM_ARCH}", **TIMM_KW)
    assert model.vpeft_backbone_id == f"timm:{TIMM_ARCH}"
