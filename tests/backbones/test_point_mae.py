"""Point-MAE / Point-BERT backbones: geometry ops against plain-Python references, official checkpoint formats
(key names written out from the official code, never derived from vpeft's model) loaded through
``create_backbone``, the forward against a functional re-write of the official fine-tuning model, timm's model
contract, and PEFT methods attached through the spec.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import vpeft
import vpeft.backbones.point_mae  # noqa: F401  (registers point_mae / point_bert until backbones/__init__ imports it)
from vpeft.backbones._point_ops import farthest_point_sample, gather_points, group_points, knn_indices
from vpeft.backbones.point_mae import PointTransformer, to_official_state_dict

# Tiny model: 256 points, 16 patches of 16 points, 2 blocks of width 64 with 4 heads.
TINY = dict(num_group=16, group_size=16, embed_dim=64, depth=2, num_heads=4)
N_POINTS = 256


def clouds(b: int = 2, n: int = N_POINTS, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, n, 3, generator=torch.Generator().manual_seed(seed))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


# --- plain-Python references ------------------------------------------------------------------------------------


def fps_reference(points: list, n: int, start: int = 0) -> list[int]:
    """Textbook farthest-point sampling over a list of (x, y, z); ties go to the lowest index."""
    chosen = [start]
    dist = [math.inf] * len(points)
    for _ in range(n - 1):
        cx, cy, cz = points[chosen[-1]]
        best, best_i = -1.0, -1
        for i, (x, y, z) in enumerate(points):
            dist[i] = min(dist[i], (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2)
            if dist[i] > best:
                best, best_i = dist[i], i
        chosen.append(best_i)
    return chosen


def knn_reference(points: list, query: tuple, k: int) -> list[int]:
    return sorted(range(len(points)), key=lambda i: sum((points[i][j] - query[j]) ** 2 for j in range(3)))[:k]


def group_reference(pts: torch.Tensor, num_group: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Official ``Group`` semantics (FPS from index 0, kNN, centring) written with the plain-Python references."""
    hoods, centers = [], []
    for cloud in pts:
        p = [tuple(map(float, row)) for row in cloud.double()]
        c_idx = fps_reference(p, num_group)
        centers.append(cloud[c_idx])
        hoods.append(torch.stack([cloud[knn_reference(p, p[c], group_size)] - cloud[c] for c in c_idx]))
    return torch.stack(hoods), torch.stack(centers)


# --- geometry ops -----------------------------------------------------------------------------------------------


def test_fps_matches_python_loop_reference():
    pts = clouds(3, 200)
    idx = farthest_point_sample(pts, 24)
    assert idx.shape == (3, 24) and idx.dtype == torch.long
    for b in range(3):
        assert idx[b].tolist() == fps_reference(pts[b].double().tolist(), 24)
    # Seeded random start: the first index per cloud is the generator's draw; the rest follows deterministically.
    idx_r = farthest_point_sample(pts, 24, random_start=True, generator=torch.Generator().manual_seed(7))
    starts = torch.randint(200, (3,), generator=torch.Generator().manual_seed(7)).tolist()
    for b in range(3):
        assert idx_r[b].tolist() == fps_reference(pts[b].double().tolist(), 24, start=starts[b])
    again = farthest_point_sample(pts, 24, random_start=True, generator=torch.Generator().manual_seed(7))
    assert torch.equal(idx_r, again)


def test_knn_matches_brute_force_and_groups_are_centred():
    pts = clouds(2, 150)
    q = clouds(2, 10, seed=5)
    idx = knn_indices(q, pts, 12)
    for b in range(2):
        p = pts[b].double().tolist()
        for g in range(10):
            assert idx[b, g].tolist() == knn_reference(p, q[b, g].double().tolist(), 12)
    hood, center = group_points(pts, 8, 12)
    ref_hood, ref_center = group_reference(pts, 8, 12)
    assert torch.equal(center, ref_center)
    assert torch.equal(hood, ref_hood)
    assert torch.equal(hood[:, :, 0], torch.zeros_like(hood[:, :, 0]))  # each centre is its own nearest point
    assert torch.equal(gather_points(pts, idx), torch.stack([pts[b][idx[b]] for b in range(2)]))


@pytest.mark.parametrize("call, msg", [
    (lambda: farthest_point_sample(clouds(1, 10), 11), "n must be an int in \\[1, 10\\]"),
    (lambda: knn_indices(clouds(1, 4), clouds(1, 10), 0), "k must be an int in \\[1, 10\\]"),
    (lambda: group_points(torch.randn(2, 10, 2), 4, 4), "shape \\(B, N, 3\\)"),
])
def test_geometry_ops_refuse_bad_input(call, msg):
    with pytest.raises(ValueError, match=msg):
        call()


# --- official key formats, written out from the official code ---------------------------------------------------
# Point-MAE models/Point_MAE.py: Encoder, PointTransformer (fine-tune), MaskTransformer + Point_MAE (pre-train).
# Point-BERT models/Point_BERT.py + models/dvae.py: PointTransformer (fine-tune), MaskTransformer, Point_BERT.


def _bn(prefix: str, c: int) -> dict:
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def official_encoder_shapes(encoder_dims: int) -> dict:
    """The mini-PointNet ``Encoder`` of both repositories."""
    return {"encoder.first_conv.0.weight": (128, 3, 1), "encoder.first_conv.0.bias": (128,),
            **_bn("encoder.first_conv.1", 128),
            "encoder.first_conv.3.weight": (256, 128, 1), "encoder.first_conv.3.bias": (256,),
            "encoder.second_conv.0.weight": (512, 512, 1), "encoder.second_conv.0.bias": (512,),
            **_bn("encoder.second_conv.1", 512),
            "encoder.second_conv.3.weight": (encoder_dims, 512, 1), "encoder.second_conv.3.bias": (encoder_dims,)}


def official_block_shapes(prefix: str, d: int) -> dict:
    """``Block``: norm1, attn.qkv (no bias), attn.proj, norm2, mlp.fc1, mlp.fc2."""
    return {f"{prefix}.norm1.weight": (d,), f"{prefix}.norm1.bias": (d,), f"{prefix}.attn.qkv.weight": (3 * d, d),
            f"{prefix}.attn.proj.weight": (d, d), f"{prefix}.attn.proj.bias": (d,),
            f"{prefix}.norm2.weight": (d,), f"{prefix}.norm2.bias": (d,),
            f"{prefix}.mlp.fc1.weight": (4 * d, d), f"{prefix}.mlp.fc1.bias": (4 * d,),
            f"{prefix}.mlp.fc2.weight": (d, 4 * d), f"{prefix}.mlp.fc2.bias": (d,)}


def official_transformer_shapes(d: int, depth: int, encoder_dims: int, bert: bool, cls: bool = True) -> dict:
    """Encoder side of the fine-tuning ``PointTransformer`` (Point-BERT adds ``reduce_dim``)."""
    out = official_encoder_shapes(encoder_dims)
    if bert:
        out.update({"reduce_dim.weight": (d, encoder_dims), "reduce_dim.bias": (d,)})
    if cls:
        out.update({"cls_token": (1, 1, d), "cls_pos": (1, 1, d)})
    out.update({"pos_embed.0.weight": (128, 3), "pos_embed.0.bias": (128,), "pos_embed.2.weight": (d, 128),
                "pos_embed.2.bias": (d,)})
    for i in range(depth):
        out.update(official_block_shapes(f"blocks.blocks.{i}", d))
    out.update({"norm.weight": (d,), "norm.bias": (d,)})
    return out


def official_head_shapes(d: int, num_classes: int, bert: bool) -> dict:
    """``cls_head_finetune``: Point-MAE Linear, BN, ReLU, Dropout, Linear, BN, ReLU, Dropout, Linear;
    Point-BERT Linear, ReLU, Dropout, Linear."""
    if bert:
        return {"cls_head_finetune.0.weight": (256, 2 * d), "cls_head_finetune.0.bias": (256,),
                "cls_head_finetune.3.weight": (num_classes, 256), "cls_head_finetune.3.bias": (num_classes,)}
    return {"cls_head_finetune.0.weight": (256, 2 * d), "cls_head_finetune.0.bias": (256,),
            **_bn("cls_head_finetune.1", 256),
            "cls_head_finetune.4.weight": (256, 256), "cls_head_finetune.4.bias": (256,),
            **_bn("cls_head_finetune.5", 256),
            "cls_head_finetune.8.weight": (num_classes, 256), "cls_head_finetune.8.bias": (num_classes,)}


def point_mae_pretrain_shapes(d: int, depth: int, group_size: int) -> dict:
    """``Point_MAE``: MAE_encoder (no cls token), mask_token, decoder_pos_embed, MAE_decoder (4 blocks + norm),
    increase_dim."""
    out = {f"MAE_encoder.{k}": v for k, v in official_transformer_shapes(d, depth, d, bert=False, cls=False).items()}
    out.update({"mask_token": (1, 1, d), "decoder_pos_embed.0.weight": (128, 3), "decoder_pos_embed.0.bias": (128,),
                "decoder_pos_embed.2.weight": (d, 128), "decoder_pos_embed.2.bias": (d,),
                "MAE_decoder.norm.weight": (d,), "MAE_decoder.norm.bias": (d,),
                "increase_dim.0.weight": (3 * group_size, d, 1), "increase_dim.0.bias": (3 * group_size,)})
    for i in range(4):
        out.update(official_block_shapes(f"MAE_decoder.blocks.{i}", d))
    return out


def point_bert_pretrain_shapes(d: int, depth: int, encoder_dims: int) -> dict:
    """``Point_BERT``: transformer_q / transformer_k (MaskTransformer: + mask_token, lm_head, cls_head), dvae,
    queue, queue_ptr."""
    mask = official_transformer_shapes(d, depth, encoder_dims, bert=True)
    mask.update({"mask_token": (1, 1, d), "lm_head.weight": (8192, d), "lm_head.bias": (8192,),
                 "cls_head.0.weight": (256, d), "cls_head.0.bias": (256,), "cls_head.2.weight": (256, 256),
                 "cls_head.2.bias": (256,)})
    out = {f"transformer_{q}.{k}": v for q in "qk" for k, v in mask.items()}
    out.update({f"dvae.{k}": v for k, v in official_encoder_shapes(encoder_dims).items()})
    out.update({"dvae.codebook": (8192, 256), "queue": (256, 16384), "queue_ptr": (1,)})
    return out


def random_state(shapes: dict, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        if k.endswith("num_batches_tracked") or k == "queue_ptr":
            out[k] = torch.tensor(7) if shape == () else torch.zeros(shape, dtype=torch.long)
        elif k.endswith("running_var"):
            out[k] = 0.5 + torch.rand(shape, generator=g)
        elif k.endswith(("norm1.weight", "norm2.weight", "norm.weight")) or ".1.weight" in k or ".5.weight" in k:
            out[k] = 1.0 + 0.1 * torch.randn(shape, generator=g)  # norm / BN scales near 1
        else:
            out[k] = 0.1 * torch.randn(shape, generator=g)
    return out


def save_official(path, base_model: dict, ddp: bool = False) -> str:
    """The official ``builder.save_checkpoint`` layout."""
    sd = {(f"module.{k}" if ddp else k): v for k, v in base_model.items()}
    torch.save({"base_model": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 3,
                "metrics": {"acc": torch.tensor(91.5)}, "best_metrics": {"acc": 92.0}}, path)
    return str(path)


def official_forward(sd: dict, pts: torch.Tensor, depth: int, heads: int, group_size: int, num_group: int,
                     bert: bool) -> torch.Tensor:
    """The official fine-tuning ``PointTransformer.forward`` (eval mode) re-written functionally on its own keys."""
    def lin(x, p, bias=True):
        return F.linear(x, sd[f"{p}.weight"], sd[f"{p}.bias"] if bias else None)

    def conv(x, p):
        return F.conv1d(x, sd[f"{p}.weight"], sd[f"{p}.bias"])

    def bn(x, p):
        return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
                            False, 0.0, 1e-5)

    def ln(x, p):
        return F.layer_norm(x, x.shape[-1:], sd[f"{p}.weight"], sd[f"{p}.bias"], 1e-5)

    hood, center = group_reference(pts, num_group, group_size)
    b, g, s, _ = hood.shape
    f = hood.reshape(b * g, s, 3).transpose(2, 1)
    f = conv(F.relu(bn(conv(f, "encoder.first_conv.0"), "encoder.first_conv.1")), "encoder.first_conv.3")
    f = torch.cat([f.max(dim=2, keepdim=True)[0].expand(-1, -1, s), f], dim=1)
    f = conv(F.relu(bn(conv(f, "encoder.second_conv.0"), "encoder.second_conv.1")), "encoder.second_conv.3")
    tokens = f.max(dim=2)[0].reshape(b, g, -1)
    if bert:
        tokens = lin(tokens, "reduce_dim")
    d = tokens.shape[-1]
    x = torch.cat([sd["cls_token"].expand(b, -1, -1), tokens], dim=1)
    pos = torch.cat([sd["cls_pos"].expand(b, -1, -1), lin(F.gelu(lin(center, "pos_embed.0")), "pos_embed.2")], dim=1)
    for i in range(depth):
        p = f"blocks.blocks.{i}"
        x = x + pos
        n = x.shape[1]
        qkv = lin(ln(x, f"{p}.norm1"), f"{p}.attn.qkv", bias=False).reshape(b, n, 3, heads, d // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (d // heads) ** -0.5).softmax(dim=-1)
        x = x + lin((attn @ v).transpose(1, 2).reshape(b, n, d), f"{p}.attn.proj")
        x = x + lin(F.gelu(lin(ln(x, f"{p}.norm2"), f"{p}.mlp.fc1")), f"{p}.mlp.fc2")
    x = ln(x, "norm")
    f = torch.cat([x[:, 0], x[:, 1:].max(1)[0]], dim=-1)
    if bert:
        return lin(F.relu(lin(f, "cls_head_finetune.0")), "cls_head_finetune.3")
    f = F.relu(bn(lin(f, "cls_head_finetune.0"), "cls_head_finetune.1"))
    f = F.relu(bn(lin(f, "cls_head_finetune.4"), "cls_head_finetune.5"))
    return lin(f, "cls_head_finetune.8")


KW = dict(num_group=16, group_size=16, depth=2)  # width and heads stay the official base (384, 6)


@pytest.mark.parametrize("family", ["point_mae", "point_bert"])
def test_official_finetuned_checkpoint_matches_official_forward(tmp_path, family):
    bert = family == "point_bert"
    enc = 256 if bert else 384
    sd = random_state({**official_transformer_shapes(384, 2, enc, bert), **official_head_shapes(384, 7, bert)})
    path = save_official(tmp_path / "ckpt-best.pth", sd, ddp=True)
    model = vpeft.create_backbone(f"{family}:base", pretrained=path, **KW).eval()  # classes follow the file
    assert model.num_classes == 7 and model.vpeft_backbone_id == f"{family}:base"
    assert model.vpeft_load_report["notes"] == []
    pts = clouds()
    with torch.no_grad():
        assert rel_err(model(pts), official_forward(sd, pts, 2, 6, 16, 16, bert)) < 1e-5
    # Every official tensor landed, bit-identical, and maps back to the official names.
    back = to_official_state_dict(model)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_random_model_saved_in_official_format_loads_bit_identical(tmp_path):
    torch.manual_seed(0)
    ref = PointTransformer(num_classes=5, **KW).eval()
    with torch.no_grad():  # BN statistics away from (0, 1), so BN is not an identity
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    official = to_official_state_dict(ref)
    assert set(official) == set(official_transformer_shapes(384, 2, 384, False)) | set(official_head_shapes(384, 5,
                                                                                                             False))
    path = save_official(tmp_path / "ft.pth", official)
    model = vpeft.create_backbone("point_mae:base", pretrained=path, num_classes=5, **KW).eval()
    pts = clouds()
    with torch.no_grad():
        assert torch.equal(model(pts), ref(pts))
        assert torch.equal(model.forward_features(pts), ref.forward_features(pts))


def test_point_mae_pretrain_checkpoint_drops_decoder_keeps_encoder(tmp_path):
    shapes = point_mae_pretrain_shapes(384, 2, 16)
    sd = random_state(shapes, seed=3)
    path = save_official(tmp_path / "pretrain.pth", sd)
    model = vpeft.create_backbone("point_mae:base", pretrained=path, num_classes=40, **KW).eval()
    rep = model.vpeft_load_report
    assert sorted(rep["dropped"]) == sorted(k for k in shapes if not k.startswith("MAE_encoder."))
    assert any("cls_token" in n for n in rep["notes"]) and any("no classifier head" in n for n in rep["notes"])
    back = to_official_state_dict(model)
    for k in shapes:
        if k.startswith("MAE_encoder."):
            assert torch.equal(back[k[len("MAE_encoder."):]], sd[k]), k
    assert model.num_classes == 40


def test_point_bert_pretrain_checkpoint_uses_the_query_encoder(tmp_path):
    shapes = point_bert_pretrain_shapes(384, 2, 256)
    sd = random_state(shapes, seed=4)
    path = save_official(tmp_path / "Point-BERT.pth", sd, ddp=True)
    model = vpeft.create_backbone("point_bert:base", pretrained=path, num_classes=15, **KW).eval()
    rep = model.vpeft_load_report
    kept = [k for k in shapes if k.startswith("transformer_q.")
            and not k.startswith(("transformer_q.lm_head", "transformer_q.cls_head", "transformer_q.mask_token"))]
    assert len(rep["dropped"]) == len(shapes) - len(kept)
    back = to_official_state_dict(model)
    for k in kept:
        assert torch.equal(back[k[len("transformer_q."):]], sd[k]), k
    assert rep["notes"] == ["the file has no classifier head: head left at its init"]


def test_other_num_classes_drops_the_head_with_a_note(tmp_path):
    sd = random_state({**official_transformer_shapes(384, 2, 384, False), **official_head_shapes(384, 7, False)})
    path = save_official(tmp_path / "ft.pth", sd)
    model = vpeft.create_backbone("point_mae:base", pretrained=path, num_classes=3, **KW)
    assert model.num_classes == 3 and model.head[8].out_features == 3
    assert len(model.vpeft_load_report["notes"]) == 1 and "7 classes" in model.vpeft_load_report["notes"][0]
    assert torch.equal(model.blocks[1].attn.qkv.weight, sd["blocks.blocks.1.attn.qkv.weight"])


@pytest.mark.parametrize("edit, kw, pieces", [
    (lambda sd: sd.pop("blocks.blocks.1.mlp.fc2.bias"), {}, ["1 missing encoder keys", "blocks.1.mlp.fc2.bias"]),
    (lambda sd: sd.update({"extra.weight": torch.zeros(2)}), {}, ["1 unexpected keys", "extra.weight"]),
    (lambda sd: None, {"depth": 1}, ["unexpected keys", "blocks.1.attn.qkv.weight"]),
    (lambda sd: None, {"encoder_dims": 256}, ["shape mismatches", "encoder.second_conv.3.weight"]),
])
def test_checkpoint_that_does_not_fit_is_refused(tmp_path, edit, kw, pieces):
    sd = random_state({**official_transformer_shapes(384, 2, 384, False), **official_head_shapes(384, 7, False)})
    edit(sd)
    path = save_official(tmp_path / "bad.pth", sd)
    with pytest.raises(ValueError) as e:
        vpeft.create_backbone("point_mae:base", pretrained=path, **{**KW, **kw})
    for p in pieces:
        assert p in str(e.value)


class _Metric:  # a Python object in a checkpoint: what torch.load(weights_only=True) refuses
    acc = 90.0


def test_checkpoint_with_python_objects_is_refused_readably(tmp_path):
    sd = random_state(official_transformer_shapes(384, 2, 384, False))
    path = tmp_path / "pickled.pth"
    torch.save({"base_model": sd, "metrics": _Metric()}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        vpeft.create_backbone("point_mae:base", pretrained=str(path), **KW)


def test_create_errors(tmp_path):
    with pytest.raises(ValueError, match="no hub download"):
        vpeft.create_backbone("point_mae:base", pretrained=True)
    with pytest.raises(ValueError, match="names: \\['base'\\]"):
        vpeft.create_backbone("point_bert:large")
    with pytest.raises(ValueError, match="does not exist"):
        vpeft.create_backbone("point_mae:base", pretrained=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="not divisible"):
        PointTransformer(embed_dim=64, num_heads=5)


# --- timm contract and spec -------------------------------------------------------------------------------------


def tiny(seed: int = 0, **kw) -> PointTransformer:
    torch.manual_seed(seed)
    return PointTransformer(**{**TINY, "num_classes": 5, **kw}).eval()


def test_timm_contract():
    model, pts = tiny(), clouds()
    with torch.no_grad():
        feats = model.forward_features(pts)
        assert feats.shape == (2, 1 + 16, 64) and model.num_prefix_tokens == 1 and model.num_features == 64
        pooled = model.forward_head(feats, pre_logits=True)
        assert torch.equal(pooled, torch.cat([feats[:, 0], feats[:, 1:].amax(1)], dim=-1))
        assert torch.equal(model(pts), model.head(pooled))
        final, inter = model.forward_intermediates(pts)
        assert torch.equal(final, feats) and len(inter) == 2 and inter[0].shape == (2, 16, 64)
        assert torch.equal(model.norm(inter[-1]), feats[:, 1:])
        normed = model.forward_intermediates(pts, indices=[0], norm=True, return_prefix_tokens=True,
                                             intermediates_only=True, stop_early=True)
        assert len(normed) == 1 and normed[0][1].shape == (2, 1, 64)
        d = model.forward_intermediates(pts, indices=1, output_dict=True)
        assert torch.equal(d["point_features"], feats) and torch.equal(d["point_intermediates"][0], inter[-1])
    model.reset_classifier(7)
    assert model(pts).shape == (2, 7)
    model.reset_classifier(0)
    assert model(pts).shape == (2, 128) and model.head_hidden_size == 128
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(pts, output_fmt="NCHW")


def test_grad_checkpointing_same_output_and_grads():
    model = tiny(drop_path_rate=0.0)
    pts = clouds()
    ref = model.forward_features(pts).square().sum()
    ref.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out = model.forward_features(pts).square().sum()
    out.backward()
    assert torch.allclose(out, ref)
    for n, p in model.named_parameters():
        if n in grads:
            assert torch.allclose(p.grad, grads[n], rtol=1e-5, atol=1e-7), n


def test_spec_sites():
    model = tiny()
    spec = vpeft.get_spec(model)
    tower = spec.towers[""]
    assert (tower.depth, tower.width, tower.num_heads, tower.num_prefix_tokens, tower.layout) == (2, 64, 4, 1, "NLC")
    q, v = spec.resolve(model, "q", layers=[1]) + spec.resolve(model, "v", layers=[1])
    assert (q.path, q.kind, q.out_slice) == ("blocks.1.attn.qkv", "linear", (0, 64))
    assert v.out_slice == (128, 192)
    paths = {n: spec.resolve(model, n, layers=[0])[0].path for n in
             ("block", "norm1", "attn_out", "norm2", "mlp", "mlp_in", "mlp_out")}
    assert paths == {"block": "blocks.0", "norm1": "blocks.0.norm1", "attn_out": "blocks.0.attn.proj",
                     "norm2": "blocks.0.norm2", "mlp": "blocks.0.mlp", "mlp_in": "blocks.0.mlp.fc1",
                     "mlp_out": "blocks.0.mlp.fc2"}
    assert spec.resolve(model, "final_norm")[0].path == "norm" and spec.resolve(model, "head")[0].path == "head"
    # The embed site (the mini-PointNet's last 1x1 conv) appears once the registry classifies Conv1d as "conv".
    if "embed" in spec.available():
        assert spec.resolve(model, "embed")[0].path == "encoder.second_conv.3"
    # q is what the attention uses: the first third of the fused projection's output.
    x = torch.randn(2, 5, 64)
    qkv = model.blocks[1].attn.qkv
    assert torch.equal(qkv(x)[..., q.out_slice[0]:q.out_slice[1]], x @ qkv.weight[:64].T)


# --- PEFT methods through the spec ------------------------------------------------------------------------------


def randomize_adapters(pm, seed: int = 3, scale: float = 0.1, head: bool = False) -> None:
    """Perturb the adapters (or, with ``head``, the trainable head) away from their init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad and n.startswith("base_model.head.") == head:
                p.add_(scale * torch.randn(p.shape, generator=g))


def test_lora_qv_parameter_count_on_the_base_encoder():
    torch.manual_seed(0)
    model = vpeft.create_backbone("point_mae:base", num_classes=40)
    pm = vpeft.get_peft_model(model, vpeft.LoraConfig(r=8, targets=["q", "v"]))
    assert pm.num_parameters(trainable_only=True) == 12 * 2 * 8 * (384 + 384) == 147_456


@pytest.mark.parametrize("cfg, identity, mergeable", [
    (lambda: vpeft.LoraConfig(r=4, targets=["q", "v"]), True, True),
    # The official qkv projection has no bias, so SSF's shift there could not be merged: SSF on the other sites.
    (lambda: vpeft.SSFConfig(targets=["attn_out", "mlp_in", "mlp_out", "norm1", "norm2", "final_norm"]), False, True),
    (lambda: vpeft.VPTConfig(num_tokens=5, deep=True), False, False),
    (lambda: vpeft.AdaptFormerConfig(bottleneck=8, dropout=0.0), True, False),
], ids=["lora", "ssf", "vpt_deep", "adaptformer"])
def test_methods_attach(tmp_path, cfg, identity, mergeable):
    pts = clouds()
    base = tiny()
    with torch.no_grad():
        y0 = base(pts)
    pm = vpeft.get_peft_model(tiny(), cfg(), trainable_extra=["head"])
    pm.eval()
    with torch.no_grad():
        if identity:  # LoRA's B and AdaptFormer's up-projection start at zero
            assert torch.equal(pm(pts), y0)
        randomize_adapters(pm)
        y = pm(pts)
        assert y.shape == y0.shape and not torch.allclose(y, y0)
        with pm.disabled():
            assert torch.equal(pm(pts), y0)
        randomize_adapters(pm, seed=4, head=True)  # the trained head travels with the adapter (trainable_extra)
        y = pm(pts)
    pm.save_adapter(str(tmp_path / "adapter"))
    pm2 = vpeft.PeftModel.from_pretrained(tiny(), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert torch.equal(pm2(pts), y)
    if not mergeable:
        with pytest.raises(ValueError, match="not mergeable"):
            pm.merge()
        return
    with torch.no_grad():
        pm.merge()
        assert rel_err(pm(pts), y) < 1e-5
        pm.unmerge()
        assert rel_err(pm(pts), y) < 1e-5
        plain = pm.merge_and_unload()
        assert isinstance(plain, PointTransformer) and set(plain.state_dict()) == set(base.state_dict())
        assert rel_err(plain(pts), y) < 1e-5


def test_ssf_default_placement_skips_the_bias_free_qkv_and_merges():
    """The official model builds its fused qkv without a bias, where SSF's shift could not be folded: the default
    placement leaves that site out (an explicit target keeps it, trains, and refuses merge naming the site)."""
    model, pts = tiny(), clouds()
    pm = vpeft.get_peft_model(model, vpeft.SSFConfig()).eval()
    assert "blocks.0.attn.qkv" not in pm.adapter_layers() and "blocks.0.attn.proj" in pm.adapter_layers()
    randomize_adapters(pm)
    with torch.no_grad():
        y = pm(pts)
        pm.merge()
        assert rel_err(pm(pts), y) < 1e-5
    explicit = vpeft.get_peft_model(tiny(), vpeft.SSFConfig(targets=["qkv"]))
    with pytest.raises(ValueError, match="ssf at blocks.0.attn.qkv"):
        explicit.merge()


def test_vpt_deep_prompts_live_only_inside_blocks():
    pm = vpeft.get_peft_model(tiny(), vpeft.VPTConfig(num_tokens=3, deep=True)).eval()
    with torch.no_grad():
        final, inter = pm.forward_intermediates(clouds())
    assert final.shape == (2, 17, 64) and all(t.shape == (2, 16, 64) for t in inter)
    trainable = pm.num_parameters(trainable_only=True)
    assert trainable == 2 * 3 * 64  # depth x tokens x width


def test_embed_site_is_the_pointnet_conv1d():
    """``nn.Conv1d`` is a ``conv`` site: the mini-PointNet's last conv is the ``embed`` site (channels on dim 1) and
    SSF there merges exactly."""
    model, pts = tiny(), clouds()
    site = vpeft.get_spec(model).resolve(model, "embed")[0]
    assert (site.path, site.kind) == ("encoder.second_conv.3", "conv")
    pm = vpeft.get_peft_model(model, vpeft.SSFConfig(targets=["embed"])).eval()
    randomize_adapters(pm)
    with torch.no_grad():
        y = pm(pts)
        scale, shift = (pm.adapter_state_dict()[f"encoder.second_conv.3.ssf.{n}"] for n in ("scale", "shift"))
        conv = torch.nn.Conv1d(512, 64, 1)  # the expectation: SSF folded into the conv by hand
        conv.weight.copy_(model.encoder.second_conv[3].base_layer.weight * scale.view(-1, 1, 1))
        conv.bias.copy_(model.encoder.second_conv[3].base_layer.bias * scale + shift)
        ref = tiny()
        ref.encoder.second_conv[3] = conv
        assert rel_err(y, ref(pts)) < 1e-5
        pm.merge()
        assert rel_err(pm(pts), y) < 1e-5


def test_frozen_batchnorm_keeps_its_statistics_and_the_heads_are_saved(tmp_path):
    """In train mode the frozen mini-PointNet's BatchNorm layers stay in eval mode (their running statistics are
    backbone state, so they must not move), while the new head's BatchNorm trains and its statistics travel in the
    adapter file: a reloaded model reproduces the trained one in eval mode."""
    model = tiny()
    pm = vpeft.get_peft_model(model, vpeft.LoraConfig(r=2), trainable_extra=["head"]).train()
    frozen = {n: b.clone() for n, b in model.encoder.named_buffers()}
    head_before = model.head[1].running_mean.clone()
    assert not model.encoder.first_conv[1].training and model.head[1].training
    pm(clouds()).square().mean().backward()
    assert all(torch.equal(b, frozen[n]) for n, b in model.encoder.named_buffers())
    assert not torch.equal(model.head[1].running_mean, head_before)
    state = pm.adapter_state_dict()
    assert {"head.1.running_mean", "head.1.running_var", "head.5.running_mean"} <= set(state)
    pm.eval()
    pm.save_adapter(str(tmp_path / "a"))
    loaded = vpeft.PeftModel.from_pretrained(tiny(), str(tmp_path / "a")).eval()
    with torch.no_grad():
        assert torch.equal(loaded(clouds()), pm(clouds()))
