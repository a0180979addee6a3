"""CLIP prompt learning (CoOp, CoCoOp, IVLP, MaPLe, PromptSRC): prompt layout, parameter counts against the papers,
equality with the frozen encoder, and an independent re-implementation of the deep-prompt forward."""

from __future__ import annotations

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.factory import _MODEL_CONFIGS

import vpeft
from vpeft.methods._text_prompts import prompt_tokens
from vpeft.methods.layers import AdapterLayer
from vpeft.methods.promptsrc import GaussianPromptAggregator, gaussian_weights, promptsrc_loss

TINY_BPE = "vpeft-tiny-bpe-w48"
_MODEL_CONFIGS.setdefault(TINY_BPE, dict(
    embed_dim=32, vision_cfg=dict(image_size=32, layers=3, width=64, patch_size=8, head_width=16),
    text_cfg=dict(context_length=32, vocab_size=49408, width=48, heads=4, layers=3)))
TINY_RN = "vpeft-tiny-rn"
_MODEL_CONFIGS.setdefault(TINY_RN, dict(
    embed_dim=32, vision_cfg=dict(image_size=64, layers=[1, 1, 1, 1], width=16),
    text_cfg=dict(context_length=32, vocab_size=49408, width=48, heads=4, layers=2)))
NAMES = ["dog", "golden retriever", "cat", "sea_lion"]


@pytest.fixture(scope="module")
def tok():
    return open_clip.tokenizer.SimpleTokenizer(context_length=32)


def tiny(seed: int = 0, arch: str = TINY_BPE):
    torch.manual_seed(seed)
    return vpeft.create_backbone(f"open_clip:{arch}").eval()


def images(n: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(5))


# --- prompt layout ----------------------------------------------------------------------------------------------------

def test_prompt_token_layouts(tok):
    sot, eot = tok.sot_token_id, tok.eot_token_id
    name = tok.encode("golden retriever")
    dot = tok.encode(".")
    assert len(name) == 2 and len(dot) == 1
    end = prompt_tokens(tok, ["golden retriever"], 4, "end")[0].tolist()
    assert end[:9] == [sot, sot, sot, sot, sot, *name, *dot, eot] and set(end[9:]) == {0}
    front = prompt_tokens(tok, ["golden retriever"], 4, "front")[0].tolist()
    assert front[:9] == [sot, *name, sot, sot, sot, sot, *dot, eot]
    middle = prompt_tokens(tok, ["golden retriever"], 3, "middle")[0].tolist()  # CoOp: n // 2 before the name
    assert middle[:8] == [sot, sot, *name, sot, sot, *dot, eot]
    fixed = prompt_tokens(tok, ["dog"], 2, "end", fixed_words="of a")[0].tolist()
    assert fixed[:8] == [sot, sot, sot, *tok.encode("of a"), *tok.encode("dog"), *dot, eot]
    with pytest.raises(ValueError, match="context length"):
        prompt_tokens(tok, ["x " * 40], 4)


# --- CoOp -------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vit_b16():
    torch.manual_seed(0)
    return vpeft.create_backbone("open_clip:ViT-B-16").eval()


def test_coop_vit_b16_counts_and_init_equals_frozen_prompt(vit_b16):
    tok = open_clip.get_tokenizer("ViT-B-16")
    with torch.no_grad():
        frozen = vit_b16.encode_text(tok([f"a photo of a {n.replace('_', ' ')}." for n in NAMES]), normalize=True)
    pm = vpeft.get_peft_model(vit_b16, vpeft.CoOpConfig())
    assert pm.num_parameters(trainable_only=True) == 16 * 512 == 8192
    pm.unload()
    pm = vpeft.get_peft_model(vit_b16, vpeft.CoOpConfig(ctx_init="a photo of a"))
    assert pm.num_parameters(trainable_only=True) == 4 * 512 == 2048
    clf = vpeft.ClipClassifier(pm, tok, NAMES)
    with torch.no_grad():
        learned = clf.class_embeddings()
    pm.unload()
    assert (learned - frozen).abs().max().item() < 1e-5


def test_paper_parameter_counts_vit_b16(vit_b16):
    """Trainable parameters equal the docstring formulas and the papers' reported sizes (ViT-B/16: d_text 512,
    d_vision 768, image features 512)."""
    d, dv, e = 512, 768, 512
    expected = [
        (vpeft.CoCoOpConfig(), 4 * d + (e * (e // 16) + e // 16) + ((e // 16) * d + d)),  # 35,360
        (vpeft.MaPLeConfig(), 9 * 2 * d + 9 * (d * dv + dv)),  # 3,555,072 (paper: 3.55M)
        (vpeft.PromptSRCConfig(), 9 * 4 * d + 9 * 4 * dv),  # 46,080 (paper: 46K)
        (vpeft.IVLPConfig(), 9 * 2 * d + 9 * 2 * dv),  # 23,040
    ]
    assert [n for _, n in expected] == [35_360, 3_555_072, 46_080, 23_040]
    for cfg, n in expected:
        pm = vpeft.get_peft_model(vit_b16, cfg)
        assert pm.num_parameters(trainable_only=True) == n, type(cfg).__name__
        pm.unload()


def test_coop_csc_rows_follow_class_index(tok):
    pm = vpeft.get_peft_model(tiny(), vpeft.CoOpConfig(n_ctx=3, csc=True, num_classes=4))
    learner = pm.shared["coop"]
    assert learner.ctx.shape == (4, 3, 48)
    rows = learner.tokenize(tok, NAMES)
    with torch.no_grad():
        full = pm.encode_text(rows)  # 4 rows = 4 classes: row i is class i
        with pm.conditioning(text_class_index=torch.tensor([2, 0])):
            part = pm.encode_text(rows[[2, 0]])
        with pytest.raises(ValueError, match="text_class_index"):
            pm.encode_text(rows[:2])
    # batch composition changes the last bits of torch's attention kernels (~1e-6 of the output scale)
    assert (part - full[[2, 0]]).abs().max() / full.abs().max() < 1e-5


def test_classifier_chunking_gives_same_gradients(tok):
    # float64: in float32 the batch composition alone moves torch's attention/GEMM results by ~1e-6, which the
    # gradient (a sum over classes) accumulates; in float64 chunking and recomputation must agree to rounding.
    pm = vpeft.get_peft_model(tiny().double(), vpeft.CoOpConfig(n_ctx=4))
    x = images().double()
    grads = []
    for chunk in (100, 3, 1):
        clf = vpeft.ClipClassifier(pm, tok, NAMES, class_chunk=chunk)
        pm.zero_grad()
        loss = F.cross_entropy(clf(x), torch.tensor([0, 1, 3]))
        loss.backward()
        grads.append((loss.detach(), pm.shared["coop"].ctx.grad.clone()))
    for loss, g in grads[1:]:
        assert torch.allclose(loss, grads[0][0], rtol=1e-12)
        assert (g - grads[0][1]).abs().max() / grads[0][1].abs().max() < 1e-10


def test_classifier_caches_until_parameters_change(tok):
    pm = vpeft.get_peft_model(tiny(), vpeft.CoOpConfig(n_ctx=4))
    clf = vpeft.ClipClassifier(pm, tok, NAMES)
    calls = []
    handle = pm.base_model.token_embedding.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        a = clf.class_embeddings()
        b = clf.class_embeddings()
    assert len(calls) == 1 and torch.equal(a, b)
    with torch.no_grad():
        pm.shared["coop"].ctx.add_(0.5)  # an optimizer step bumps the parameter version
        c = clf.class_embeddings()
    assert len(calls) == 2 and not torch.allclose(a, c)
    clf(images())  # with autograd: encoded again every call
    clf(images())
    assert len(calls) == 4
    handle.remove()


def test_zero_shot_builder_matches_open_clip(tok):
    from open_clip import build_zero_shot_classifier as oc_build

    model = tiny(3)
    templates = ["a photo of a {}.", "a drawing of a {}.", "itap of the {}."]
    ours = vpeft.build_zero_shot_classifier(model, tok, NAMES, templates, num_classes_per_batch=3)
    ref = oc_build(model, tok, NAMES, templates, num_classes_per_batch=3)
    assert ours.shape == ref.shape == (32, 4)
    assert (ours - ref).abs().max().item() < 1e-6
    # ClipClassifier on the plain model: logit_scale * norm(image) @ weights (class names with spaces, as CoOp)
    clf = vpeft.ClipClassifier(model, tok, NAMES, templates=templates)
    x = images()
    spaced = oc_build(model, tok, [n.replace("_", " ") for n in NAMES], templates)
    with torch.no_grad():
        expected = model.logit_scale.exp() * F.normalize(model.encode_image(x), dim=-1) @ spaced
        assert torch.allclose(clf(x), expected, atol=1e-5)
    with pytest.raises(ValueError, match="placeholder"):
        vpeft.build_zero_shot_classifier(model, tok, NAMES, ["a photo"])
    with pytest.raises(ValueError, match="classnames"):
        vpeft.build_zero_shot_classifier(model, tok, [], templates)


# --- CoCoOp -----------------------------------------------------------------------------------------------------------

def test_cocoop_batched_equals_per_image(tok):
    pm = vpeft.get_peft_model(tiny(), vpeft.CoCoOpConfig())
    learner = pm.shared["cocoop"]
    assert learner.n_ctx == 4 and learner.meta_net.linear1.out_features == 32 // 16
    with torch.no_grad():
        learner.meta_net.linear2.weight.normal_(0, 0.5)  # make the image conditioning matter
    clf = vpeft.ClipClassifier(pm, tok, NAMES, class_chunk=6)  # 6 // 3 images = 2 classes per text forward
    x = images()
    with torch.no_grad():
        batched = clf(x)
        # reference: CoCoOp's loop, one image at a time, its prompts = ctx + meta_net(feature) for every class
        rows = learner.tokenize(tok, NAMES)
        img = F.normalize(pm.encode_image(x), dim=-1)
        ref, texts = [], []
        for b in range(3):
            with pm.conditioning(image_features=img[b:b + 1]):
                t = pm.encode_text(rows, normalize=True)
            texts.append(t)
            ref.append(pm.logit_scale.exp() * img[b] @ t.T)
        ref = torch.stack(ref)
        with pytest.raises(ValueError, match="image_features"):
            pm.encode_text(rows)
    assert (texts[0] - texts[1]).abs().max() > 1e-3, "the class prompts must depend on the image"
    assert torch.allclose(batched, ref, atol=1e-5)


# --- deep prompts: an independent forward -----------------------------------------------------------------------------

def _reference_text(model, learner, rows: torch.Tensor, depth: int) -> torch.Tensor:
    """The official MaPLe/IVLP text forward written out: context replaces placeholder embeddings, deep prompts replace
    the same positions at blocks 1..depth-1."""
    n = learner.n_ctx
    x = model.token_embedding(rows)
    x[:, 1:1 + n] = learner.ctx
    x = x + model.positional_embedding
    for i, blk in enumerate(model.transformer.resblocks):
        if 1 <= i < depth:
            x[:, 1:1 + n] = learner.text_prompt(i)
        x = blk(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0]), rows.argmax(dim=-1)]
    return x @ model.text_projection


def _reference_image(model, learner, images: torch.Tensor, depth: int) -> torch.Tensor:
    """The official vision forward: prompts appended at the END of the sequence before ln_pre, replaced at blocks
    1..depth-1, carried through deeper blocks, dropped before pooling."""
    v = model.visual
    n = learner.n_ctx_vision
    x = v.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + v.positional_embedding
    x = torch.cat([x, learner.vision_prompt(0).expand(x.shape[0], -1, -1)], dim=1)
    x = v.ln_pre(x)
    for i, blk in enumerate(v.transformer.resblocks):
        if 1 <= i < depth:
            x = torch.cat([x[:, :-n], learner.vision_prompt(i).expand(x.shape[0], -1, -1)], dim=1)
        x = blk(x)
    x = v.ln_post(x[:, :-n])
    return x[:, 0] @ v.proj


@pytest.mark.parametrize("cfg, depth", [
    (vpeft.MaPLeConfig(depth=2), 2),
    (vpeft.IVLPConfig(text_depth=3, vision_depth=3), 3),
    (vpeft.PromptSRCConfig(text_depth=2, vision_depth=2), 2),
], ids=["maple", "ivlp", "promptsrc"])
def test_deep_prompts_match_reference_forward(cfg, depth, tok):
    model = tiny()
    ref_model = tiny()
    pm = vpeft.get_peft_model(model, cfg)
    learner = next(iter(pm.shared.values()))
    with torch.no_grad():
        for p in learner.parameters():
            p.normal_(0, 0.2)
    rows = learner.tokenize(tok, NAMES)
    x = images()
    with torch.no_grad():
        text = pm.encode_text(rows)
        img = pm.encode_image(x)
        ref_text = _reference_text(ref_model, learner, rows, depth)
        ref_img = _reference_image(ref_model, learner, x, depth)
    assert (text - ref_text).abs().max() / ref_text.abs().max() < 1e-5
    assert (img - ref_img).abs().max() / ref_img.abs().max() < 1e-5


def test_maple_vision_prompts_are_projections_of_text_prompts():
    pm = vpeft.get_peft_model(tiny(), vpeft.MaPLeConfig(depth=3, ctx_init="a photo of a"))
    ln = pm.shared["maple"]
    assert ln.fixed_words == "of a" and ln.n_ctx == 2
    assert torch.allclose(ln.vision_prompt(0), ln.ctx @ ln.proj.weight.T + ln.proj.bias)
    assert torch.allclose(ln.vision_prompt(2), ln.compound_prompts_text[1] @ ln.compound_prompt_projections[1].weight.T
                          + ln.compound_prompt_projections[1].bias)
    assert ln.prompt_template("dog") == "X X of a dog."


# --- errors and other backbones ---------------------------------------------------------------------------------------

def test_config_errors_leave_model_untouched():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = [
        (vpeft.CoOpConfig(csc=True), "num_classes"),
        (vpeft.CoOpConfig(n_ctx=0), "n_ctx"),
        (vpeft.CoOpConfig(class_token_position="left"), "class_token_position"),
        (vpeft.CoOpConfig(n_ctx=3, ctx_init="a photo of a"), "n_ctx"),
        (vpeft.CoOpConfig(towers=["text"]), "must be None"),
        (vpeft.MaPLeConfig(depth=4), "exceeds"),
        (vpeft.IVLPConfig(n_ctx=5, text_depth=2, vision_depth=2), "only 4 tokens"),
        (vpeft.PromptSRCConfig(gpa_std=0), "gpa_std"),
    ]
    for cfg, msg in bad:
        with pytest.raises(ValueError, match=msg):
            vpeft.get_peft_model(model, cfg)
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="text tower"):
        vpeft.get_peft_model(vpeft.create_backbone("timm:vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1),
                             vpeft.CoOpConfig())
    from open_clip import factory  # looked up now: other tests may have rebuilt the registry dict (rescan)

    factory._MODEL_CONFIGS.setdefault("vpeft-tiny-vocab100", dict(
        embed_dim=16, vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=8, head_width=16),
        text_cfg=dict(context_length=16, vocab_size=100, width=32, heads=2, layers=1)))
    small_vocab = vpeft.create_backbone("open_clip:vpeft-tiny-vocab100")
    with pytest.raises(ValueError, match="BPE vocabulary"):
        vpeft.get_peft_model(small_vocab, vpeft.CoOpConfig(ctx_init="a"))


def test_resnet_clip_text_prompts(tok):
    model = tiny(arch=TINY_RN)
    assert vpeft.get_spec(model).family == "open_clip_resnet"
    with pytest.raises(ValueError, match="ViT image tower"):
        vpeft.get_peft_model(model, vpeft.MaPLeConfig(depth=2))
    pm = vpeft.get_peft_model(model, vpeft.CoCoOpConfig())
    clf = vpeft.ClipClassifier(pm, tok, NAMES)
    logits = clf(images(2, 64))
    logits.sum().backward()
    assert logits.shape == (2, 4) and pm.shared["cocoop"].ctx.grad.abs().sum() > 0


# --- PromptSRC losses and GPA -----------------------------------------------------------------------------------------

def test_promptsrc_loss_terms_by_hand():
    cfg = vpeft.PromptSRCConfig()
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    frozen_logits = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    t, ft = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.6, 0.8]])
    i, fi = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 1.0]])
    out = promptsrc_loss(logits, torch.tensor([0, 1]), t, i, ft, fi, frozen_logits, cfg)
    # L1 mean: (0.4 + 0.8) / 2 = 0.6, times 25
    assert out["scl_text"].item() == pytest.approx(15.0)
    assert out["scl_image"].item() == 0.0
    # KL(frozen || prompted) summed over all entries / 4; the frozen rows are uniform: sum 0.5 * log(0.5 / p)
    def log_softmax(row):
        m = math.log(sum(math.exp(v) for v in row))
        return [v - m for v in row]
    kl = 0.0
    for row in ([2.0, 0.0], [0.0, 1.0]):
        kl += sum(0.5 * (math.log(0.5) - lp) for lp in log_softmax(row))
    assert out["scl_logits"].item() == pytest.approx(kl / 4, rel=1e-6)
    ce = -(log_softmax([2.0, 0.0])[0] + log_softmax([0.0, 1.0])[1]) / 2
    assert out["loss"].item() == pytest.approx(ce + 15.0 + kl / 4, rel=1e-6)


def test_gaussian_prompt_aggregation():
    w = gaussian_weights(20, 15, 1)
    assert sum(w) == pytest.approx(1.0) and max(range(20), key=lambda k: w[k]) == 14  # epoch 15 weighs most
    assert w[13] == pytest.approx(w[15]) and w[13] / w[14] == pytest.approx(math.exp(-0.5))
    agg = GaussianPromptAggregator(3, mean=2, std=1)
    states = [{"p": torch.full((2,), float(e))} for e in (1, 2, 3)]
    for e, s in enumerate(states, 1):
        agg.update(s, e)
    a, b = math.exp(-0.5), 1.0
    assert agg.complete
    assert torch.allclose(agg.state["p"], torch.full((2,), (a * 1 + b * 2 + a * 3) / (2 * a + b)))
    with pytest.raises(ValueError, match="no weight"):
        gaussian_weights(5, 1e4, 0.1)
