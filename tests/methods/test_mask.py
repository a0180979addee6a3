"""R-AMT mask tuning numerics: the forward and the straight-through score gradient against a hand-written masked
model, the paper's initialisation (all masks on: the pretrained function), the masked fraction, bit-exact unmerge,
only the scores train, the calibration criterion against an independent computation, gradient dropout against its
formula, and the same outputs and gradients under ``use_kernels("torch")`` and ``use_kernels("triton")``."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_clip, make_timm, rel_err
from torch.func import functional_call

import vpeft
from vpeft.kernels import use_kernels
from vpeft.methods._calibration import calibrate
from vpeft.methods.layers import AdapterLayer
from vpeft.methods.mask import (
    MaskTuningConfig,
    drop_gradient,
    general_knowledge_loss,
    gradient_dropout_backward,
    mask_adapters,
    masked_fraction,
)

THR = 5e-3






def images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def labelled(n: int = 2):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(n)]


def timm_selection(depth: int = 2, mlp: bool = False) -> dict:
    mats = [f"blocks.{i}.attn.{m}" for m in ("qkv", "proj") for i in range(depth)]
    if mlp:
        mats += [f"blocks.{i}.mlp.{m}" for m in ("fc1", "fc2") for i in range(depth)]
    return {"matrices": mats}


def randomize_scores(pm, seed: int = 0, off: float = 0.3) -> None:
    """Scores around the threshold so that roughly ``off`` of the masks are 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in mask_adapters(pm):
            u = torch.rand(a.scores.shape, generator=g)
            a.scores.copy_(torch.where(u < off, THR - 0.004 * torch.rand(u.shape, generator=g),
                                       THR + 0.01 * torch.rand(u.shape, generator=g)))


def masked_params(model, pm) -> dict[str, torch.Tensor]:
    """The backbone's parameters with W * 1[S > thr] at every masked site (the hand-written expectation)."""
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    from vpeft.methods.peft_model import canonical_name

    for n, p in list(pm.named_parameters()):
        if n.endswith(".mask.scores"):
            site = canonical_name(n[: -len(".mask.scores")]).removeprefix("base_model.")
            wname = f"{site}.in_proj_weight" if f"{site}.in_proj_weight" in params else f"{site}.weight"
            params[wname] = params[wname] * (p.detach() > THR).float()
    return params


def test_init_is_pretrained_function_and_paper_defaults():
    cfg = MaskTuningConfig(selection=timm_selection())
    assert (cfg.init, cfg.threshold, cfg.select_fraction) == (1e-2, 5e-3, 1.0)
    base = make_timm()
    x = images()
    with torch.no_grad():
        y0 = base(x)
    pm = vpeft.get_peft_model(make_timm(), cfg)
    with torch.no_grad():
        torch.testing.assert_close(pm(x), y0, rtol=0, atol=1e-6)
    assert masked_fraction(pm)["num_masked"] == 0
    # trainable: exactly one score per masked weight, nothing else
    names = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert names and all(n.endswith(".mask.scores") for n in names)
    d, depth = 64, 2
    assert pm.num_parameters(True) == depth * (3 * d * d + d * d)


@pytest.mark.parametrize("backbone", ["timm", "clip"])
def test_forward_and_straight_through_gradient_match_hand_written(backbone):
    if backbone == "timm":
        model, run = make_timm(), (lambda m, x: m(x))
        cfg = MaskTuningConfig(selection=timm_selection(mlp=True), targets=["qkv", "attn_out", "mlp_in", "mlp_out"])
        x = images()
    else:
        model, run = make_clip(), (lambda m, x: m.encode_text(x))
        cfg = MaskTuningConfig(towers=["text"], selection={"matrices": [
            f"transformer.resblocks.{i}.{m}" for i in range(2) for m in ("attn", "attn.out_proj")]})
        x = torch.randint(1, 98, (2, 16), generator=torch.Generator().manual_seed(2))
        x[:, 10] = 99
    ref_model = copy.deepcopy(model).requires_grad_(False)
    pm = vpeft.get_peft_model(model, cfg)
    randomize_scores(pm)
    out = run(pm, x)
    w_out = torch.linspace(-1, 1, out.shape[-1])
    (out * w_out).sum().backward()
    # expectation: the backbone with masked weights; the STE gradient of S is dL/d(W*M) * W
    params = masked_params(ref_model, pm)
    eff = {n: p.clone().requires_grad_(True) for n, p in params.items()}
    wrapper = _Call(ref_model, backbone)
    exp = functional_call(wrapper, {f"m.{n}": p for n, p in eff.items()}, (x,))
    torch.testing.assert_close(out, exp, rtol=1e-5, atol=1e-5)
    (exp * w_out).sum().backward()
    from vpeft.methods.peft_model import canonical_name

    for n, p in pm.named_parameters():
        if n.endswith(".mask.scores"):
            site = canonical_name(n[: -len(".mask.scores")]).removeprefix("base_model.")
            wname = f"{site}.in_proj_weight" if f"{site}.in_proj_weight" in eff else f"{site}.weight"
            expected = eff[wname].grad * dict(ref_model.named_parameters())[wname]
            torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-6, msg=n)


class _Call(torch.nn.Module):
    """The backbone call under test as a module, so that torch.func.functional_call can swap its weights."""

    def __init__(self, m, backbone: str) -> None:
        super().__init__()
        self.m, self.backbone = m, backbone

    def forward(self, x):
        return self.m(x) if self.backbone == "timm" else self.m.encode_text(x)


def test_masked_fraction_counts():
    pm = vpeft.get_peft_model(make_timm(), MaskTuningConfig(selection=timm_selection()))
    randomize_scores(pm, off=0.25)
    zeros = sum(int((a.scores <= THR).sum()) for a in mask_adapters(pm))
    selected = 2 * (3 * 64 * 64 + 64 * 64)
    backbone = sum(p.numel() for p in make_timm().parameters())
    frac = masked_fraction(pm)
    assert frac["num_masked"] == zeros and frac["num_selected"] == selected
    assert frac["selected"] == pytest.approx(zeros / selected)
    assert frac["backbone"] == pytest.approx(zeros / backbone)
    assert 0.2 < frac["selected"] < 0.3


def test_merge_exact_and_unmerge_bit_for_bit():
    model = make_timm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pm = vpeft.get_peft_model(model, MaskTuningConfig(selection=timm_selection(mlp=True),
                                                      targets=["qkv", "attn_out", "mlp_in", "mlp_out"]))
    randomize_scores(pm)
    x = images()
    with torch.no_grad():
        y = pm(x)
        pm.merge()
        assert rel_err(pm(x), y) < 1e-5
        w = model.blocks[0].attn.qkv.weight
        assert torch.equal(w, before["blocks.0.attn.qkv.weight"] * (mask_adapters(pm)[0].scores > THR))
        pm.unmerge()
    for k, v in pm.unload().state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bad_configs_refused_before_mutation():
    model = make_timm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = [
        (MaskTuningConfig(threshold=float("nan"), selection=timm_selection()), "threshold"),
        (MaskTuningConfig(select_fraction=0.0, selection=timm_selection()), "select_fraction"),
        (MaskTuningConfig(selection={"matrices": []}), "selection"),
        (MaskTuningConfig(selection={"matrices": ["blocks.9.attn.qkv"]}), "not among"),
        (MaskTuningConfig(targets=["q"], selection=timm_selection()), "slice"),
        (MaskTuningConfig(), "vpeft.calibrate"),
    ]
    for cfg, msg in bad:
        with pytest.raises(ValueError, match=msg):
            vpeft.get_peft_model(model, [vpeft.SSFConfig(), cfg])
    with pytest.raises(ValueError, match="must be the first method on site"):
        vpeft.get_peft_model(model, [vpeft.LoraConfig(targets=["qkv"]), MaskTuningConfig(selection=timm_selection())])
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_calibration_criterion_matches_independent_importance():
    """Candidates qkv, attn_out, mlp_in, mlp_out; half are kept: those with the largest share of entries in the global
    top-1% of accumulated |dL/dW| (computed here with torch.autograd.grad)."""
    model = make_timm()
    data = labelled(2)
    cfg = MaskTuningConfig(targets=["qkv", "attn_out", "mlp_in", "mlp_out"], select_fraction=0.5)
    (res,) = calibrate(model, [cfg], data)
    ref = copy.deepcopy(model).eval()
    paths = [f"blocks.{i}.{m}" for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2") for i in range(2)]
    ws = [ref.get_submodule(p).weight for p in paths]
    imp = [torch.zeros_like(w) for w in ws]
    for x, y in data:
        for a, g in zip(imp, torch.autograd.grad(F.cross_entropy(ref(x), y), ws)):
            a += g.abs()
    flat = torch.cat([a.flatten() for a in imp])
    cut = flat.sort(descending=True).values[math.ceil(0.01 * flat.numel()) - 1]
    share = {p: float((a >= cut).float().mean()) for p, a in zip(paths, imp)}
    top = sorted(paths, key=lambda p: -share[p])[:4]
    assert set(res.selection["matrices"]) == set(top)
    for p in paths:
        assert res.selection["scores"][p] == pytest.approx(share[p])
    # defaults: the paper's attention mask tuning, every MHSA weight
    (full,) = calibrate(model, [MaskTuningConfig()], data)
    assert set(full.selection["matrices"]) == set(timm_selection()["matrices"])


def test_gradient_dropout_formula():
    a = torch.tensor([1.0, -2.0, 3.0, 0.5, -1.0])
    b = torch.tensor([2.0, -1.0, -3.0, -1.5, 4.0])  # agree, agree, opposite equal, opposite larger, opposite larger
    u = torch.rand(5, generator=torch.Generator().manual_seed(7))
    p = torch.tensor([1.0, 1.0, 0.5, 0.25, 0.2])  # (sign(a)(a+b)/(|a|+|b|) + 1) / 2, by hand
    got = drop_gradient(a, b, lam=1.0, generator=torch.Generator().manual_seed(7), eps=0.0)
    torch.testing.assert_close(got, a * (p > u).float())
    half = drop_gradient(a, b, lam=0.5, generator=torch.Generator().manual_seed(7), eps=0.0)
    torch.testing.assert_close(half, a * (0.5 + 0.5 * (p > u).float()))
    # general-knowledge loss: cross-entropy to the zero-shot distribution = KL + teacher entropy
    s, t = torch.randn(3, 4), torch.randn(3, 4)
    kl = F.kl_div(F.log_softmax(s / 2, -1), F.softmax(t / 2, -1), reduction="batchmean") * 4
    ent = -(F.softmax(t / 2, -1) * F.log_softmax(t / 2, -1)).sum(-1).mean() * 4
    torch.testing.assert_close(general_knowledge_loss(s, t, temperature=2.0), kl + ent)


def test_gradient_dropout_backward_in_a_training_step():
    pm = vpeft.get_peft_model(make_timm(), MaskTuningConfig(selection=timm_selection()), trainable_extra=["head"])
    randomize_scores(pm)
    x, y = labelled(1)[0]

    def grads(general_sign):
        pm.zero_grad(set_to_none=True)
        logits = pm(x)
        with torch.no_grad(), pm.disabled():
            zs = pm(x)
        task = F.cross_entropy(logits, y)
        general = general_sign * task if general_sign else general_knowledge_loss(logits, zs)
        gradient_dropout_backward(pm, task, general, generator=torch.Generator().manual_seed(0))
        return {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}

    pm.zero_grad(set_to_none=True)
    F.cross_entropy(pm(x), y).backward()
    plain = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
    agree = grads(1.0)  # identical gradients: nothing is dropped
    for n in plain:
        torch.testing.assert_close(agree[n], plain[n], msg=n)
    opposed = grads(-1.0)  # exactly opposed: P = 1/2 everywhere, the head (not a score) untouched
    gen = torch.Generator().manual_seed(0)
    name_of = {id(p): n for n, p in pm.named_parameters()}
    scores = [name_of[id(a.scores)] for a in mask_adapters(pm)]  # the order the uniforms are drawn in
    for n in scores:
        u = torch.rand(plain[n].shape, generator=gen)
        torch.testing.assert_close(opposed[n], plain[n] * (0.5 > u).float(), msg=n)
    for n in set(plain) - set(scores):
        torch.testing.assert_close(opposed[n], plain[n], msg=n)
    kd = grads(0.0)  # the real general-knowledge loss runs end to end
    assert all(torch.isfinite(g).all() for g in kd.values())


def test_save_load_reproduces_and_json_has_selection(tmp_path):
    model = make_timm()
    (cfg,) = calibrate(model, [MaskTuningConfig()], labelled(1))
    pm = vpeft.get_peft_model(model, cfg, trainable_extra=["head"])
    randomize_scores(pm)
    x = images()
    with torch.no_grad():
        y = pm(x)
    pm.save_adapter(str(tmp_path))
    import json

    meta = json.loads((tmp_path / "vpeft_config.json").read_text())
    assert meta["methods"][0]["selection"]["matrices"] == cfg.selection["matrices"]
    pm2 = vpeft.PeftModel.from_pretrained(make_timm(), str(tmp_path))  # no data needed
    with torch.no_grad():
        assert torch.equal(pm2(x), y)


def _randomise(pm) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad:
                if name.endswith(".scores"):  # around the threshold: a mix of kept and masked weights
                    p.copy_(THR + 0.01 * (torch.rand(p.shape, generator=g) - 0.3))
                else:
                    p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


def _run(pm, x, mode):
    with use_kernels(mode):
        out = pm(x)
        (out * torch.linspace(-1, 1, out.shape[-1], device=out.device)).sum().backward()
    grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
    pm.zero_grad(set_to_none=True)
    return out.detach(), grads


def test_vit_lora_ssf_mask_torch_and_triton_agree():
    """Mask (first on qkv and attn_out, so its fused masked_linear op runs), then LoRA and SSF on the same sites."""
    configs = [MaskTuningConfig(selection={"matrices": [f"blocks.{i}.attn.{m}" for i in range(2)
                                                        for m in ("qkv", "proj")]}),
               vpeft.LoraConfig(r=4, targets=["q", "v"]), vpeft.SSFConfig()]
    pm = vpeft.get_peft_model(make_timm(embed_dim=48, num_heads=2), configs, trainable_extra=["head"])
    _randomise(pm)
    x = images()
    ref_out, ref_grads = _run(pm, x, "torch")
    assert "kernel=torch" in repr(pm)
    out, grads = _run(pm, x, "triton")
    assert "kernel=triton" in repr(pm) and "kernel=torch" not in repr(pm)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and any(n.endswith(".scores") for n in grads)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-5, atol=1e-5, msg=n)


def test_clip_packed_in_proj_torch_and_triton_agree():
    """open_clip's packed in_proj_weight (image tower, nn.MultiheadAttention in the text tower) through the kernel."""
    clip = make_clip()
    sel = [f"{t}.resblocks.{i}.{m}" for t in ("visual.transformer", "transformer") for i in range(2)
           for m in ("attn", "attn.out_proj")]
    pm = vpeft.get_peft_model(clip, MaskTuningConfig(towers=["visual", "text"], selection={"matrices": sel}))
    _randomise(pm)
    images_, text = images(), torch.randint(1, 99, (2, 16), generator=torch.Generator().manual_seed(3))

    def run(mode):
        with use_kernels(mode):
            img, txt = pm.encode_image(images_), pm.encode_text(text)
            (img.sum() + (txt * 2).sum()).backward()
        grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
        pm.zero_grad(set_to_none=True)
        return img.detach(), txt.detach(), grads

    ref, got = run("torch"), run("triton")
    assert "kernel=triton" in repr(pm)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5)
    assert len(ref[2]) == 8
    for n in ref[2]:
        torch.testing.assert_close(got[2][n], ref[2][n], rtol=1e-5, atol=1e-5, msg=n)
