"""IDPT numerics on a tiny Point-MAE transformer: the forward against a hand-written re-write of the official model
(DGCNN prompt before the last block, prompt position, head on cls + prompt + max), parameter counts against the
formula (full size on the meta device), refusal of non-point backbones and bad configs before any mutation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vpeft
import vpeft.backbones.point_mae  # noqa: F401  (registers point_mae until vpeft.backbones imports it)
from vpeft.backbones.point_mae import PointTransformer
from vpeft.methods.idpt import IDPTConfig, idpt_num_parameters
from vpeft.methods.layers import AdapterLayer

TINY = dict(num_group=16, group_size=16, embed_dim=64, depth=2, num_heads=4, num_classes=5, drop_path_rate=0.0)


def tiny(seed: int = 0, **kw) -> PointTransformer:
    torch.manual_seed(seed)
    return PointTransformer(**{**TINY, **kw}).eval()


def clouds(b: int = 2, n: int = 256, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, n, 3, generator=torch.Generator().manual_seed(seed))


def randomize(pm, seed: int = 1) -> None:
    """Random values for every adapter tensor, BatchNorm statistics included (variances kept positive)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, t in pm.adapter_state_dict().items():
            if not t.is_floating_point():
                continue
            r = torch.randn(t.shape, generator=g)
            t.copy_(0.5 + r.abs() if k.endswith("running_var") else 0.3 * r)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


# --- plain references (loops and explicit formulas, no vpeft code) ---------------------------------------------------


def bn_eval(x, sd, p, dim=1):
    shape = [1] * x.dim()
    shape[dim] = -1
    w, b, m, v = (sd[f"{p}.{n}"].view(shape) for n in ("weight", "bias", "running_mean", "running_var"))
    return (x - m) / torch.sqrt(v + 1e-5) * w + b


def edgeconv_ref(x, w, sd, p, k, slope):
    """x: (B, N, C) -> (B, N, C'): max over the k nearest x_j (feature space, itself included) of
    LeakyReLU(BN(W [x_j - x_i, x_i]))."""
    b, n, c = x.shape
    out = []
    for bi in range(b):
        d = ((x[bi, :, None] - x[bi, None]) ** 2).sum(-1)  # N x N, explicit differences
        nb = torch.argsort(d, dim=1, stable=True)[:, :k]  # N x k
        feat = torch.cat([x[bi, nb] - x[bi, :, None], x[bi, :, None].expand(n, k, c)], dim=-1)  # N k 2C
        h = bn_eval(feat @ w.t(), sd, p, dim=2)
        out.append(F.leaky_relu(h, slope).amax(1))
    return torch.stack(out)


def prompt_ref(tokens, sd, k, n_conv, slope):
    pre = "_shared.idpt.generator"
    x, outs = tokens, []
    for i in range(n_conv):
        w = sd[f"{pre}.edge_convs.{i}.0.weight"][:, :, 0, 0]
        x = edgeconv_ref(x, w, sd, f"{pre}.edge_convs.{i}.1", k, slope)
        outs.append(x)
    h = torch.cat(outs, dim=-1) @ sd[f"{pre}.fuse.0.weight"][:, :, 0].t()
    h = F.leaky_relu(bn_eval(h, sd, f"{pre}.fuse.1", dim=2), slope)
    return h.amax(1, keepdim=True)  # B 1 C


def head_ref(f, sd):
    p = "head.idpt.head"
    h = f @ sd[f"{p}.0.weight"].t() + sd[f"{p}.0.bias"]
    h = torch.relu(bn_eval(h, sd, f"{p}.1"))
    h = h @ sd[f"{p}.4.weight"].t() + sd[f"{p}.4.bias"]
    h = torch.relu(bn_eval(h, sd, f"{p}.5"))
    return h @ sd[f"{p}.8.weight"].t() + sd[f"{p}.8.bias"]


def idpt_ref(model, x, sd, layer, k, n_conv=3, slope=0.2):
    """The official IDPT forward: blocks with x + pos; before block `layer` the DGCNN prompt of the tokens (without
    positions) goes after the cls token with its position prompt_pos; head on cls, prompt, max over patches."""
    tokens, pos = model.prepare_tokens(x)
    prompt_pos = sd["_shared.idpt.prompt_pos"]
    for i, blk in enumerate(model.blocks):
        if i == layer:
            prompt = prompt_ref(tokens[:, 1:], sd, k, n_conv, slope)
            tokens = torch.cat([tokens[:, :1], prompt, tokens[:, 1:]], dim=1)
            pos = torch.cat([pos[:, :1], prompt_pos.expand(x.shape[0], -1, -1), pos[:, 1:]], dim=1)
        tokens = blk(tokens + pos)
    t = F.layer_norm(tokens, (tokens.shape[-1],), model.norm.weight, model.norm.bias, 1e-5)
    return head_ref(torch.cat([t[:, 0], t[:, 1], t[:, 2:].amax(1)], dim=-1), sd)


@pytest.mark.parametrize("layer, k", [(-1, 20), (0, 5)], ids=["last-block-k20", "first-block-k5"])
def test_forward_matches_official_rewrite(layer, k):
    pm = vpeft.get_peft_model(tiny(), IDPTConfig(prompt_layer=layer, k=k))
    randomize(pm)
    x = clouds()
    sd = {kk: v.clone() for kk, v in pm.adapter_state_dict().items()}
    with torch.no_grad():
        y = pm(x)
        ref = idpt_ref(tiny(), x, sd, layer % 2, min(k, 16))
        with pm.disabled():
            y_off = pm(x)
    assert y.shape == (2, 5)
    assert rel_err(y, ref) < 1e-4
    assert rel_err(y_off, tiny()(x)) == 0.0


def test_parameter_count_formula():
    pm = vpeft.get_peft_model(tiny(), IDPTConfig())
    assert pm.num_parameters(trainable_only=True) == idpt_num_parameters(64, 3, 5) == 154_949
    pm = vpeft.get_peft_model(tiny(), IDPTConfig(head=False, num_edge_convs=1))
    assert pm.num_parameters(trainable_only=True) == idpt_num_parameters(64, 1, None) == 3 * 64 * 64 + 5 * 64


def test_full_size_parameter_count():
    # Built on the CPU: the backbone's constructor reads its drop-path schedule with .item(), which the meta device
    # cannot run; the model is moved to the meta device before the adapters are built.
    model = PointTransformer().to("meta")  # Point-MAE base: width 384, depth 12, 40 classes
    pm = vpeft.get_peft_model(model, IDPTConfig())
    n = pm.num_parameters(trainable_only=True)
    assert n == idpt_num_parameters(384, 3, 40) == 1_330_176 + 384 + 372_264 == 1_702_824


def test_head_needs_the_prompt_of_the_same_call():
    pm = vpeft.get_peft_model(tiny(), IDPTConfig())
    x = clouds()
    with torch.no_grad():
        feats = pm.forward_features(x)
        assert pm.forward_head(feats, pre_logits=True).shape == (2, 128)
        with pytest.raises(RuntimeError, match="same top-level call"):
            pm.forward_head(feats)


def test_batchnorm_trains_and_state_reloads(tmp_path):
    pm = vpeft.get_peft_model(tiny(), IDPTConfig())
    pm.train()
    pm(clouds()).square().mean().backward()
    sd = pm.adapter_state_dict()
    assert int(sd["_shared.idpt.generator.fuse.1.num_batches_tracked"]) == 1
    assert all(not m.training for n, m in pm.base_model.named_modules()
               if isinstance(m, torch.nn.BatchNorm1d) and n.startswith("encoder"))
    pm.eval()
    x = clouds(seed=5)
    with torch.no_grad():
        y = pm(x)
    pm.save_adapter(str(tmp_path))
    pm2 = vpeft.PeftModel.from_pretrained(tiny(), str(tmp_path))
    with torch.no_grad():
        assert torch.equal(pm2(x), y)


def _assert_untouched(model, before):
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())


def test_refuses_non_point_backbones():
    from conftest import make_timm

    model = make_timm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="point-cloud"):
        vpeft.get_peft_model(model, IDPTConfig())
    _assert_untouched(model, before)


@pytest.mark.parametrize("kw, match", [
    (dict(prompt_layer=2), "prompt_layer"),
    (dict(prompt_layer=-3), "prompt_layer"),
    (dict(k=0), "k"),
    (dict(num_edge_convs=0), "num_edge_convs"),
    (dict(head_dropout=1.0), "head_dropout"),
    (dict(negative_slope=-0.1), "negative_slope"),
    (dict(targets=["q"]), "targets"),
    (dict(layers=[0]), "layers"),
])
def test_bad_configs_refused_before_mutation(kw, match):
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        vpeft.get_peft_model(model, IDPTConfig(**kw))
    _assert_untouched(model, before)


def test_head_true_needs_a_head():
    model = tiny(num_classes=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="num_classes"):
        vpeft.get_peft_model(model, IDPTConfig())
    _assert_untouched(model, before)
    pm = vpeft.get_peft_model(model, IDPTConfig(head=False))
    with torch.no_grad():
        assert pm(clouds()).shape == (2, 128)
