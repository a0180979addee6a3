"""SAM (``create_backbone("sam:vit_b")``): official checkpoints, parity with the official ``segment_anything`` model,
the backbone spec, and LoRA on the image encoder.

Official checkpoints are emulated by randomly initialised official models (``segment_anything``'s own modules with
the hyper-parameters of its ``build_sam.py``, at a small image size) saved in the official format and loaded through
vpeft's real loader; expectations come from the official model (its ``Sam.forward`` on list-of-dict inputs), from its
``sam_model_registry`` (full-size key sets, on the meta device) and from LoRA merged into the weights by hand.
"""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
import torch.nn as nn

import vpeft
import vpeft.backbones.sam  # noqa: F401  (registers the "sam" family until vpeft.backbones imports it)
from vpeft.methods.layers import AdapterLayer

#: A tiny encoder: 64x64 images in 16x16 patches (a 4x4 grid), 2 blocks of width 64, block 0 in 2x2 windows (four
#: windows, so window partitioning really happens), block 1 global.
TINY = dict(embed_dim=64, depth=2, num_heads=4, window_size=2, global_attn_indexes=(1,))
#: build_sam_vit_b's encoder settings.
VIT_B = dict(embed_dim=768, depth=12, num_heads=12, window_size=14, global_attn_indexes=(2, 5, 8, 11))
IMG = 64


def official_sam(img_size: int, embed_dim: int, depth: int, num_heads: int, window_size: int,
                 global_attn_indexes: tuple[int, ...], seed: int = 0) -> nn.Module:
    """segment_anything's ``Sam`` built as ``build_sam.py``'s ``_build_sam`` builds it, at ``img_size``, with every
    tensor of its state dict drawn at random (the official init zeroes the relative positions and biases)."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = img_size // 16
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=depth, embed_dim=embed_dim, img_size=img_size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=num_heads, patch_size=16, qkv_bias=True,
            use_rel_pos=True, global_attn_indexes=list(global_attn_indexes), window_size=window_size, out_chans=256),
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(grid, grid),
                                     input_image_size=(img_size, img_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in sam.state_dict().items():
            r = torch.randn(t.shape, generator=g)
            if t.dim() == 1 and name.endswith("weight"):  # norm scales around 1
                t.copy_(1.0 + 0.1 * r)
            elif t.dim() == 1:
                t.copy_(0.1 * r)
            else:
                t.copy_(r / t[0].numel() ** 0.5)
    return sam


def images(n: int = 2, h: int = IMG, w: int = 48, seed: int = 1) -> torch.Tensor:
    """RGB on the 0..255 scale, narrower than the encoder input so that padding is exercised."""
    return 255.0 * torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


PROMPTS = {
    "none": {},
    "points": {"points": (torch.tensor([[[10.0, 20.0], [30.0, 5.0]], [[40.0, 40.0], [3.0, 60.0]]]),
                          torch.tensor([[1, 0], [1, 1]]))},
    "boxes": {"boxes": torch.tensor([[5.0, 6.0, 40.0, 50.0], [0.0, 10.0, 30.0, 47.0]])},
    "masks": {"masks": torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))},
}
PROMPTS["all"] = {**PROMPTS["points"], **PROMPTS["boxes"], **PROMPTS["masks"]}


def official_forward(sam: nn.Module, x: torch.Tensor, prompts: dict, multimask: bool):
    """The official ``Sam.forward`` on its list-of-dicts input, one record per image; low-res logits and IoU."""
    records = []
    for i in range(x.shape[0]):
        rec = {"image": x[i], "original_size": tuple(x.shape[-2:])}
        if "points" in prompts:
            rec["point_coords"], rec["point_labels"] = (t[i:i + 1] for t in prompts["points"])
        if "boxes" in prompts:
            rec["boxes"] = prompts["boxes"][i:i + 1]
        if "masks" in prompts:
            rec["mask_inputs"] = prompts["masks"][i:i + 1]
        records.append(rec)
    out = sam(records, multimask_output=multimask)
    return torch.cat([o["low_res_logits"] for o in out]), torch.cat([o["iou_predictions"] for o in out])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def to_vpeft_key(k: str) -> str:
    """Official key -> vpeft key, written out independently of vpeft (timm names the MLP Linears fc1/fc2)."""
    if not k.startswith("image_encoder."):
        return k
    return k.replace(".mlp.lin1.", ".mlp.fc1.").replace(".mlp.lin2.", ".mlp.fc2.")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for this module: SAM's decoder runs hundreds of tiny ops per forward, and on a shared
    two-core machine a second OpenMP thread makes each op wait for a time slice (measured: 63 s instead of 8 s
    for this file)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """(official tiny SAM, its .pth path, vpeft SAM loaded from that file)."""
    official = official_sam(IMG, **TINY)
    path = str(tmp_path_factory.mktemp("sam") / "sam_tiny.pth")
    torch.save(official.state_dict(), path)
    model = vpeft.create_backbone("sam:vit_b", pretrained=path, img_size=IMG, **TINY)
    return official, path, model


def make_tiny(path: str) -> nn.Module:
    return vpeft.create_backbone("sam:vit_b", pretrained=path, img_size=IMG, **TINY).requires_grad_(False)


# --- official checkpoints and parity ---------------------------------------------------------------------------------


def test_official_vit_b_checkpoint_matches_official(tmp_path):
    """SAM ViT-B (all 12 blocks, official widths; 64 px so it runs in seconds) saved in the official format loads
    strictly, with every tensor in place, and reproduces the official embeddings and masks."""
    official = official_sam(IMG, **VIT_B)
    path = str(tmp_path / "sam_vit_b_01ec64.pth")
    torch.save(official.state_dict(), path)
    model = vpeft.create_backbone("sam:vit_b", pretrained=path, img_size=IMG)
    assert model.vpeft_backbone_id == "sam:vit_b" and not model.training
    ref = {to_vpeft_key(k): v for k, v in official.state_dict().items()}
    got = model.state_dict()
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    x, prompts = images(1), {"boxes": PROMPTS["boxes"]["boxes"][:1]}
    seen = {}
    hook = official.image_encoder.register_forward_hook(lambda m, i, o: seen.update(emb=o))
    with torch.no_grad():
        masks_ref, iou_ref = official_forward(official, x, prompts, True)
        emb = model.image_embeddings(x)
        out = model.decode(emb, multimask_output=True, **prompts)
    hook.remove()
    assert emb.shape == (1, 256, 4, 4)
    assert rel(emb, seen["emb"]) < 1e-4
    assert out.low_res_masks.shape == (1, 3, 16, 16) and out.iou_predictions.shape == (1, 3)
    assert rel(out.low_res_masks, masks_ref) < 1e-4
    assert rel(out.iou_predictions, iou_ref) < 1e-4


@pytest.mark.parametrize("multimask", [False, True], ids=["single", "multi"])
@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_masks_match_official(tiny_pair, prompt, multimask):
    """Batched forward (two images, one prompt set each, or none) equals the official per-image forward."""
    official, _, model = tiny_pair
    x = images()
    with torch.no_grad():
        emb_ref = official.image_encoder(torch.stack([official.preprocess(xi) for xi in x]))
        assert rel(model.image_embeddings(x), emb_ref) < 1e-4
        out = model(x, multimask_output=multimask, **PROMPTS[prompt])
        masks_ref, iou_ref = official_forward(official, x, PROMPTS[prompt], multimask)
    c = 3 if multimask else 1
    assert out.low_res_masks.shape == (2, c, 16, 16) and out.iou_predictions.shape == (2, c)
    assert rel(out.low_res_masks, masks_ref) < 1e-4
    assert rel(out.iou_predictions, iou_ref) < 1e-4


def test_official_state_dict_roundtrip(tiny_pair):
    """``official_state_dict`` restores the official keys: it loads strictly into a fresh official model."""
    official, _, model = tiny_pair
    fresh = official_sam(IMG, **TINY, seed=7)
    fresh.load_state_dict(model.official_state_dict(), strict=True)
    for k, v in official.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
def test_full_size_official_checkpoints_load(tmp_path, name):
    """The full-size official models of ``sam_model_registry`` (1024 px; on the meta device: shapes only) go through
    the real loader with no missing, unexpected or mis-shaped key."""
    from segment_anything import sam_model_registry

    with torch.device("meta"):
        official = sam_model_registry[name]()
    path = str(tmp_path / f"sam_{name}.pth")
    torch.save(official.state_dict(), path)
    with torch.device("meta"):
        model = vpeft.create_backbone(f"sam:{name}", pretrained=path)
    want = {to_vpeft_key(k): tuple(v.shape) for k, v in official.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == want
    assert model.img_size == 1024 and tuple(model.prompt_encoder.image_embedding_size) == (64, 64)
    assert all(b.norm1.eps == 1e-6 for b in model.image_encoder.blocks)  # the official LayerNorm eps


def test_checkpoint_key_errors_name_the_keys(tiny_pair, tmp_path):
    official, _, _ = tiny_pair
    sd = dict(official.state_dict())
    del sd["image_encoder.blocks.0.mlp.lin1.weight"]
    del sd["mask_decoder.iou_token.weight"]
    sd["mask_decoder.extra.weight"] = torch.zeros(2)
    bad = str(tmp_path / "bad.pth")
    torch.save(sd, bad)
    with pytest.raises(ValueError) as err:
        vpeft.create_backbone("sam:vit_b", pretrained=bad, img_size=IMG, **TINY)
    msg = str(err.value)
    for piece in ("2 missing keys", "image_encoder.blocks.0.mlp.lin1.weight", "mask_decoder.iou_token.weight",
                  "1 unexpected keys", "mask_decoder.extra.weight"):
        assert piece in msg, (piece, msg)
    # An official file built for 64 px does not fit a 128 px model: the positional embeddings differ.
    good = str(tmp_path / "good.pth")
    torch.save(official.state_dict(), good)
    with pytest.raises(ValueError, match=r"image_encoder.pos_embed: \(1, 4, 4, 64\) in the file, \(1, 8, 8, 64\)"):
        vpeft.create_backbone("sam:vit_b", pretrained=good, img_size=128, **TINY)


def test_resample_pos_embed_loads_another_input_size_like_samed(tiny_pair, tmp_path):
    """``resample_pos_embed=True`` (SAMed's loader): a 64-px checkpoint loads into a 128-px model with the absolute
    positional embedding and the global block's relative-position tables resized bilinearly, every other tensor
    exact; the windowed block's tables (window-sized) are unchanged; other shape differences still fail."""
    import torch.nn.functional as F

    official, _, _ = tiny_pair
    sd = official.state_dict()
    path = str(tmp_path / "sam64.pth")
    torch.save(sd, path)
    model = vpeft.create_backbone("sam:vit_b", pretrained=path, img_size=128, resample_pos_embed=True, **TINY)
    got = model.official_state_dict()
    pos = sd["image_encoder.pos_embed"]  # (1, 4, 4, C) -> (1, 8, 8, C)
    want_pos = F.interpolate(pos.permute(0, 3, 1, 2), (8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(got["image_encoder.pos_embed"], want_pos.permute(0, 2, 3, 1), rtol=0, atol=0)
    for k, v in sd.items():
        if k == "image_encoder.pos_embed":
            continue
        if ".rel_pos_" in k and got[k].shape != v.shape:  # the global block: (2 * 4 - 1) -> (2 * 8 - 1) rows
            assert v.shape[0] == 7 and got[k].shape == (15, v.shape[1]), k
            want = F.interpolate(v[None, None], (15, v.shape[1]), mode="bilinear", align_corners=False)[0, 0]
            torch.testing.assert_close(got[k], want, rtol=0, atol=0)
        else:
            assert torch.equal(got[k], v), k
    with torch.no_grad():
        out = model(torch.rand(1, 3, 128, 128) * 255)
    assert out.low_res_masks.shape == (1, 1, 32, 32)
    with pytest.raises(ValueError, match="resample_pos_embed=True"):
        vpeft.create_backbone("sam:vit_b", pretrained=path, img_size=128, **TINY)
    with pytest.raises(ValueError, match="shape mismatches"):  # a wider encoder is not a size change
        vpeft.create_backbone("sam:vit_b", pretrained=path, img_size=128, resample_pos_embed=True,
                              **{**TINY, "embed_dim": 32})
    with pytest.raises(ValueError, match="needs a checkpoint path"):
        vpeft.create_backbone("sam:vit_b", img_size=128, resample_pos_embed=True, **TINY)


@pytest.mark.parametrize("fmt", ["wrapped", "ddp", "safetensors", "timm-encoder-only"])
def test_other_checkpoint_containers(tiny_pair, tmp_path, fmt):
    """A training script's {"model": ...} wrapper, DDP "module." prefixes and safetensors load the same tensors; an
    encoder-only timm file is refused with a pointer to the timm family."""
    from safetensors.torch import save_file

    official, _, model = tiny_pair
    sd = official.state_dict()
    if fmt == "wrapped":
        path = str(tmp_path / "w.pth")
        torch.save({"model": sd}, path)
    elif fmt == "ddp":
        path = str(tmp_path / "ddp.pth")
        torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    elif fmt == "safetensors":
        path = str(tmp_path / "sam.safetensors")
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    else:
        path = str(tmp_path / "timm.pth")
        torch.save(model.image_encoder.state_dict(), path)
        with pytest.raises(ValueError, match="no image_encoder.* key.*timm:samvit_base_patch16"):
            vpeft.create_backbone("sam:vit_b", pretrained=path, img_size=IMG, **TINY)
        return
    loaded = vpeft.create_backbone("sam:vit_b", pretrained=path, img_size=IMG, **TINY)
    ref = model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())


@pytest.mark.parametrize("kwargs, exc, pieces", [
    ({"name": "vit_x"}, ValueError, ["'vit_x'", "vit_b", "vit_h"]),
    ({"pretrained": True}, ValueError, ["sam_vit_b_01ec64.pth", "mask decoder", "samvit_base_patch16.sa1b"]),
    ({"pretrained": 3}, TypeError, ["pretrained"]),
    ({"pretrained": "/no/such/sam.pth"}, ValueError, ["does not exist"]),
    ({"num_classes": 10}, ValueError, ["num_classes", "fixed"]),
], ids=["name", "hub", "pretrained-type", "missing-file", "reserved-kwarg"])
def test_creation_errors(kwargs, exc, pieces):
    kwargs = dict(kwargs)
    name = kwargs.pop("name", "vit_b")
    with pytest.raises(exc) as err:
        vpeft.create_backbone(f"sam:{name}", **kwargs)
    for p in pieces:
        assert p in str(err.value), (p, str(err.value))


def test_prompt_and_image_errors(tiny_pair):
    _, _, model = tiny_pair
    x = images()
    with pytest.raises(ValueError, match="one prompt set per image"):
        model(x, boxes=PROMPTS["boxes"]["boxes"][:1])
    with pytest.raises(ValueError, match=r"masks must be \(B, 1, 16, 16\)"):
        model(x, masks=torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="resize_longest_side"):
        model(images(h=80, w=40))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.zeros(2, 1, 64, 64))


def test_pre_and_post_processing_match_official(tiny_pair):
    from segment_anything.utils.transforms import ResizeLongestSide

    official, _, model = tiny_pair
    x = images(h=50, w=37)
    torch.testing.assert_close(model.preprocess(x), torch.stack([official.preprocess(xi) for xi in x]),
                               rtol=0, atol=0)
    original = (120, 90)
    big = 255.0 * torch.rand(1, 3, *original, generator=torch.Generator().manual_seed(4))
    resized = model.resize_longest_side(big)
    assert resized.shape[-2:] == (64, 48)  # longest side 120 -> 64, 90 * 64 / 120 = 48
    coords = torch.tensor([[[10.0, 100.0], [89.0, 0.0]]])
    t = ResizeLongestSide(IMG)
    torch.testing.assert_close(model.transform_coords(coords, original), t.apply_coords_torch(coords, original))
    boxes = torch.tensor([[3.0, 4.0, 80.0, 110.0]])
    torch.testing.assert_close(model.transform_boxes(boxes, original), t.apply_boxes_torch(boxes, original))
    logits = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model.postprocess_masks(logits, (64, 48), original),
                               official.postprocess_masks(logits, (64, 48), original), rtol=0, atol=0)


# --- spec ------------------------------------------------------------------------------------------------------------


def test_sam_spec(tiny_pair):
    _, _, model = tiny_pair
    spec = vpeft.get_spec(model)
    assert spec.family == "sam" and list(spec.towers) == ["image_encoder", "mask_decoder"]
    assert spec.default_towers == ("image_encoder",)
    tower = spec.towers["image_encoder"]
    assert (tower.depth, tower.width, tower.num_heads, tower.layout, tower.num_prefix_tokens) == (2, 64, 4, "NHWC", 0)
    expect = {"block": ("", "block"), "norm1": (".norm1", "norm"), "qkv": (".attn.qkv", "linear"),
              "q": (".attn.qkv", "linear"), "k": (".attn.qkv", "linear"), "v": (".attn.qkv", "linear"),
              "attn_out": (".attn.proj", "linear"), "norm2": (".norm2", "norm"), "mlp": (".mlp", "other"),
              "mlp_in": (".mlp.fc1", "linear"), "mlp_out": (".mlp.fc2", "linear")}
    slices = {"q": (0, 64), "k": (64, 128), "v": (128, 192)}
    for site, (rel_path, kind) in expect.items():
        for qualified in (site, f"image_encoder.{site}"):
            sites = spec.resolve(model, qualified)
            assert [s.path for s in sites] == [f"image_encoder.blocks.{i}{rel_path}" for i in range(2)], site
            assert {s.kind for s in sites} == {kind} and {s.out_slice for s in sites} == {slices.get(site)}
    (emb,) = spec.resolve(model, "embed")
    assert (emb.path, emb.kind) == ("image_encoder.patch_embed.proj", "conv")
    for name in ("final_norm", "head", "mask_decoder.block", "prompt_encoder.q"):
        with pytest.raises(ValueError):
            spec.resolve(model, name)


def test_qkv_slices_are_what_attention_uses(tiny_pair):
    """The q/k/v output slices of the fused Linear are SAM attention's q, k, v: attention recomputed from them (with
    the decomposed relative-position bias written out here) equals the block's attention output."""
    _, _, model = tiny_pair
    spec = vpeft.get_spec(model)
    attn = model.image_encoder.blocks[1].attn  # the global block: a 4x4 grid, no windows
    seen = {}
    hook = attn.register_forward_hook(lambda m, i, o: seen.update(x=i[0], y=o))
    with torch.no_grad():
        model.image_embeddings(images())
    hook.remove()
    x, y = seen["x"], seen["y"]  # (B, 4, 4, C)
    b, h, w, c = x.shape
    heads = {}
    for name in ("q", "k", "v"):
        (site,) = spec.resolve(model, name, layers=[1])
        a, z = site.out_slice
        t = torch.nn.functional.linear(x.reshape(b, h * w, c), attn.qkv.weight[a:z], attn.qkv.bias[a:z])
        heads[name] = t.view(b, h * w, 4, 16).transpose(1, 2)  # (B, heads, HW, d)
    q, k, v = heads["q"], heads["k"], heads["v"]
    logits = q @ k.transpose(-1, -2) / 4.0  # sqrt(head_dim 16)
    idx = torch.arange(h)[:, None] - torch.arange(h)[None, :] + h - 1  # relative offsets, as in SAM/ViTDet
    rh, rw = attn.rel_pos_h[idx], attn.rel_pos_w[idx]  # (H, H, d), (W, W, d)
    qg = q.reshape(b, 4, h, w, 16)
    bias = torch.einsum("bnhwd,hkd->bnhwk", qg, rh)[..., :, None] + torch.einsum("bnhwd,wkd->bnhwk", qg, rw)[
        ..., None, :]
    logits = logits + bias.reshape(b, 4, h * w, h * w)
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, h * w, c)
    out = attn.proj(out).view(b, h, w, c)
    torch.testing.assert_close(out, y, rtol=1e-5, atol=1e-5)


def test_timm_samvit_spec():
    import timm

    enc = timm.create_model("samvit_base_patch16", img_size=IMG, num_classes=5, **TINY)
    spec = vpeft.get_spec(enc)
    assert spec.family == "timm_samvit" and spec.towers[""].layout == "NHWC"
    assert [s.path for s in spec.resolve(enc, "q")] == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert spec.resolve(enc, "head")[0].path == "head.fc"


def test_vpt_refused_before_mutation(tiny_pair):
    _, path, _ = tiny_pair
    model = make_tiny(path).requires_grad_(True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="VPT needs image-token blocks in NLC layout.*NHWC"):
        vpeft.get_peft_model(model, vpeft.VPTConfig())
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# --- LoRA ------------------------------------------------------------------------------------------------------------


def test_lora_vit_b_parameter_count():
    """LoRA r=4 on q and v of SAM ViT-B's image encoder: 12 blocks x 2 slices x (768 x 4 + 4 x 768)."""
    with torch.device("meta"):
        model = vpeft.create_backbone("sam:vit_b")
    pm = vpeft.get_peft_model(model, vpeft.LoraConfig(r=4, targets=["q", "v"]))
    assert pm.num_parameters(trainable_only=True) == 12 * 2 * (768 * 4 + 4 * 768) == 147_456
    assert all(".attn.qkv.lora." in k for k in pm.adapter_state_dict())


R, ALPHA = 4, 8.0
TARGETS = ["q", "v", "attn_out", "mlp_in"]


def _lora(path: str):
    model = make_tiny(path)
    pm = vpeft.get_peft_model(model, vpeft.LoraConfig(r=R, alpha=ALPHA, targets=TARGETS))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return pm


def _merged_by_hand(path: str, pm) -> nn.Module:
    """The untouched model with ``(alpha / r) B A`` added to the q and v rows of the fused qkv weight, and to the
    attn_out and mlp_in weights."""
    ref = make_tiny(path)
    rows = {"q": slice(0, 64), "v": slice(128, 192)}
    with torch.no_grad():
        for site_path, layer in pm.adapter_layers().items():
            (_, adapter), = layer.adapters()
            w = ref.get_submodule(site_path).weight
            for name in adapter.lora_A:
                w[rows.get(name, slice(None))] += (ALPHA / R) * adapter.lora_B[name] @ adapter.lora_A[name]
    return ref


def test_lora_on_sam(tiny_pair, tmp_path):
    """LoRA equals the weights merged by hand; disabled equals the base bit for bit; merge is exact and unloads to
    the original keys; the adapter saves and loads into a fresh model; unload restores every value."""
    _, path, _ = tiny_pair
    x, prompts = images(), PROMPTS["boxes"]
    base = make_tiny(path)
    pm = _lora(path)
    assert len(pm.adapter_layers()) == 2 * 3  # per block: qkv (q and v), proj, fc1
    with torch.no_grad():
        y_base = base(x, **prompts).low_res_masks
        y = pm(x, **prompts).low_res_masks
        y_ref = _merged_by_hand(path, pm)(x, **prompts).low_res_masks
        assert rel(y, y_ref) < 1e-5 and rel(y, y_base) > 1e-3
        with pm.disabled():
            assert torch.equal(pm(x, **prompts).low_res_masks, y_base)

        pm.save_adapter(str(tmp_path / "sam-lora"))
        pm2 = vpeft.PeftModel.from_pretrained(make_tiny(path), str(tmp_path / "sam-lora"))
        assert torch.equal(pm2(x, **prompts).low_res_masks, y)

        pm.merge()
        assert rel(pm(x, **prompts).low_res_masks, y) < 1e-5
        pm.unmerge()
        merged = pm.merge_and_unload()
        assert list(merged.state_dict()) == list(base.state_dict())
        assert rel(merged(x, **prompts).low_res_masks, y) < 1e-5

        restored = pm2.unload()
        assert all(torch.equal(v, base.state_dict()[k]) for k, v in restored.state_dict().items())
        assert torch.equal(restored(x, **prompts).low_res_masks, y_base)


def test_lora_with_trainable_mask_decoder(tiny_pair, tmp_path):
    """``trainable_extra=["mask_decoder"]``: LoRA and the decoder train; the image encoder's weights and the prompt
    encoder stay; the decoder is saved with the adapter and restored into a fresh model."""
    _, path, _ = tiny_pair
    model = make_tiny(path)
    before = copy.deepcopy(model.state_dict())
    pm = vpeft.get_peft_model(model, vpeft.LoraConfig(r=R), trainable_extra=["mask_decoder"])
    n_dec = sum(p.numel() for p in model.mask_decoder.parameters())
    assert pm.num_parameters(trainable_only=True) == n_dec + 2 * 2 * R * (64 + 64)
    pm.train()
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    x = images()
    out = pm(x, **PROMPTS["points"])
    (out.low_res_masks.square().mean() + out.iou_predictions.square().mean()).backward()
    opt.step()
    pm.eval()
    after = pm.base_model.state_dict()
    from vpeft.methods.peft_model import canonical_name

    after = {canonical_name(k): v for k, v in after.items() if ".lora." not in k}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("mask_decoder.") for k in changed)
    sd = pm.adapter_state_dict()
    assert {k for k in sd if k.startswith("mask_decoder.")} == {f"mask_decoder.{k}" for k, _ in
                                                                 model.mask_decoder.named_parameters()}
    with torch.no_grad():
        y = pm(x, **PROMPTS["points"]).low_res_masks
    pm.save_adapter(str(tmp_path / "sam-lora-dec"))
    pm2 = vpeft.PeftModel.from_pretrained(make_tiny(path), str(tmp_path / "sam-lora-dec"))
    with torch.no_grad():
        assert torch.equal(pm2(x, **PROMPTS["points"]).low_res_masks, y)


def test_lora_grad_checkpointing_same_grads(tiny_pair):
    _, path, _ = tiny_pair
    pm = _lora(path)
    pm.train()
    x = images()

    def grads(ckpt: bool) -> dict[str, torch.Tensor]:
        pm.set_grad_checkpointing(ckpt)
        pm.zero_grad()
        pm(x).low_res_masks.square().mean().backward()
        return {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}

    g0, g1 = grads(False), grads(True)
    assert g0.keys() == g1.keys() and g0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("cfg", [vpeft.SSFConfig(), vpeft.BitFitConfig(), vpeft.DiffFitConfig(), vpeft.LNTuneConfig()],
                         ids=["ssf", "bitfit", "difffit", "ln_tune"])
def test_affine_methods_default_placement_skips_sites_sam_lacks(cfg):
    """SAM's encoder has no final_norm (its neck normalises channel-first maps): the paper-default placements of the
    affine methods leave it out instead of failing, start at the base model and merge exactly."""
    model = vpeft.create_backbone("sam:vit_b", img_size=IMG, **TINY).eval()
    x = torch.rand(1, 3, IMG, IMG) * 255
    with torch.no_grad():
        base = model(x).low_res_masks
    pm = vpeft.get_peft_model(model, cfg)
    paths = list(pm.adapter_layers())
    assert paths and not any("neck" in p for p in paths)
    with torch.no_grad():
        got = pm(x).low_res_masks
        plain = pm.merge_and_unload()(x).low_res_masks
    if isinstance(cfg, vpeft.SSFConfig):  # SSF starts at N(1, 0.02) / N(0, 0.02), not exactly at the base
        assert not torch.equal(got, base)
    else:
        torch.testing.assert_close(got, base, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, got, rtol=1e-5, atol=1e-5 * got.abs().max().item())
