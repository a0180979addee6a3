"""Importers of official prompt checkpoints (CoOp, CoCoOp, MaPLe, IVLP, PromptSRC).

The official state dicts are written out by hand here, key by key, with the layouts of the reference trainers
(KaiyangZhou/CoOp ``trainers/coop.py``/``cocoop.py``, muzairkhattak/multimodal-prompt-learning ``trainers/maple.py``/
``independentVL.py`` + ``clip/model.py``, muzairkhattak/PromptSRC ``trainers/promptsrc.py``), and saved as Dassl
checkpoints. Each case lists its own official-key -> vpeft-name map, independent of the importer's.
"""

from __future__ import annotations

import pickle

import open_clip
import pytest
import torch
from open_clip.factory import _MODEL_CONFIGS

import vpeft
from vpeft.methods import _text_prompts
from vpeft.methods.importers import config_from_official, convert_official_prompts, load_official_prompts
from vpeft.methods.layers import AdapterLayer

# Own name: other test modules register "vpeft-tiny-bpe" with other widths, and setdefault keeps the first import's.
# Text width 48 != image width 64, so a transposed MaPLe projection or swapped text/vision prompts cannot pass.
TINY = "vpeft-tiny-bpe-importers"
_MODEL_CONFIGS.setdefault(TINY, dict(
    embed_dim=32, vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8, head_width=16),
    text_cfg=dict(context_length=32, vocab_size=49408, width=48, heads=4, layers=2)))
D, DV, E = 48, 64, 32  # text width, image width, CLIP embedding dim
NAMES = ["dog", "golden retriever", "cat", "sea_lion"]


@pytest.fixture(scope="module")
def tok():
    return open_clip.tokenizer.SimpleTokenizer(context_length=32)


@pytest.fixture(autouse=True)
def _one_bpe_tokenizer(monkeypatch):
    # building CLIP's BPE tokenizer takes ~0.2 s and every ctx_init learner builds one: share a single instance
    shared = _text_prompts.default_tokenizer()
    monkeypatch.setattr(_text_prompts, "default_tokenizer", lambda: shared)


def tiny(seed: int = 0):
    torch.manual_seed(seed)
    return vpeft.create_backbone(f"open_clip:{TINY}").eval()


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def _rand(gen, *shape, dtype=torch.float32, scale=0.5):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def _frozen_clip(gen, prefix_zs: bool = False) -> dict:
    """A few frozen-CLIP keys of the official whole-model state dict (dropped by the importer)."""
    sd = {
        "image_encoder.conv1.weight": _rand(gen, DV, 3, 8, 8, dtype=torch.float16),
        "image_encoder.transformer.resblocks.0.attn.in_proj_weight": _rand(gen, 3 * DV, DV, dtype=torch.float16),
        "image_encoder.ln_pre.weight": _rand(gen, DV),
        "text_encoder.positional_embedding": _rand(gen, 77, D),
        "text_encoder.transformer.resblocks.1.ln_1.weight": _rand(gen, D),
        "logit_scale": torch.tensor(4.6052),
    }
    if prefix_zs:  # PromptSRC's frozen zero-shot image encoder lives inside its prompt learner
        sd["prompt_learner.ZS_image_encoder.conv1.weight"] = _rand(gen, DV, 3, 8, 8, dtype=torch.float16)
        sd["prompt_learner.ZS_image_encoder.transformer.resblocks.0.ln_1.bias"] = _rand(gen, DV)
    return sd


def _buffers(gen, n_ctx: int, prefix: str = "") -> dict:
    return {f"{prefix}token_prefix": _rand(gen, len(NAMES), 1, D, dtype=torch.float16),
            f"{prefix}token_suffix": _rand(gen, len(NAMES), 77 - 1 - n_ctx, D, dtype=torch.float16)}


# Each case: (method, official state dict, {official key: vpeft name}, reference config, load overrides, folder)
def case_coop(gen):
    sd = {"ctx": _rand(gen, 4, D, dtype=torch.float16), **_buffers(gen, 4)}
    return "coop", sd, {"ctx": "ctx"}, vpeft.CoOpConfig(n_ctx=4), {}, "prompt_learner"


def case_coop_csc(gen):
    sd = {"ctx": _rand(gen, len(NAMES), 3, D), **_buffers(gen, 3)}
    ref = vpeft.CoOpConfig(n_ctx=3, csc=True, num_classes=len(NAMES), class_token_position="middle")
    return "coop", sd, {"ctx": "ctx"}, ref, {"class_token_position": "middle"}, "prompt_learner"


def case_cocoop(gen):
    sd = {
        "ctx": _rand(gen, 4, D, dtype=torch.float16),
        "meta_net.linear1.weight": _rand(gen, E // 16, E, scale=2.0),
        "meta_net.linear1.bias": _rand(gen, E // 16),
        "meta_net.linear2.weight": _rand(gen, D, E // 16, scale=2.0, dtype=torch.float16),
        "meta_net.linear2.bias": _rand(gen, D),
        **_buffers(gen, 4),
    }
    keymap = {k: k for k in sd if not k.startswith("token_")}
    return "cocoop", sd, keymap, vpeft.CoCoOpConfig(n_ctx=4, ctx_init=None), {}, "prompt_learner"


def case_maple(gen):
    sd = {
        "prompt_learner.ctx": _rand(gen, 2, D, dtype=torch.float16),
        "prompt_learner.proj.weight": _rand(gen, DV, D, dtype=torch.float16),
        "prompt_learner.proj.bias": _rand(gen, DV, dtype=torch.float16),
        "prompt_learner.compound_prompts_text.0": _rand(gen, 2, D),
        "prompt_learner.compound_prompt_projections.0.weight": _rand(gen, DV, D),
        "prompt_learner.compound_prompt_projections.0.bias": _rand(gen, DV),
        **_buffers(gen, 2, "prompt_learner."), **_frozen_clip(gen),
    }
    keymap = {
        "prompt_learner.ctx": "ctx",
        "prompt_learner.proj.weight": "proj.weight",
        "prompt_learner.proj.bias": "proj.bias",
        "prompt_learner.compound_prompts_text.0": "compound_prompts_text.0",
        "prompt_learner.compound_prompt_projections.0.weight": "compound_prompt_projections.0.weight",
        "prompt_learner.compound_prompt_projections.0.bias": "compound_prompt_projections.0.bias",
    }
    return "maple", sd, keymap, vpeft.MaPLeConfig(n_ctx=2, depth=2), {}, "MultiModalPromptLearner"


def _ivlp_like(gen, n_ctx: int, n_vis: int) -> tuple[dict, dict]:
    sd = {
        "prompt_learner.ctx": _rand(gen, n_ctx, D, dtype=torch.float16),
        "text_encoder.transformer.resblocks.1.VPT_shallow": _rand(gen, n_ctx, D, dtype=torch.float16),
        "image_encoder.VPT": _rand(gen, n_vis, DV),
        "image_encoder.transformer.resblocks.1.VPT_shallow": _rand(gen, n_vis, DV, dtype=torch.float16),
        **_buffers(gen, n_ctx, "prompt_learner."),
    }
    keymap = {
        "prompt_learner.ctx": "ctx",
        "text_encoder.transformer.resblocks.1.VPT_shallow": "text_prompts.0",
        "image_encoder.VPT": "vision_prompts.0",
        "image_encoder.transformer.resblocks.1.VPT_shallow": "vision_prompts.1",
    }
    return sd, keymap


def case_ivlp(gen):
    sd, keymap = _ivlp_like(gen, 2, 2)
    sd.update(_frozen_clip(gen))
    ref = vpeft.IVLPConfig(n_ctx=2, n_ctx_vision=2, text_depth=2, vision_depth=2)
    return "ivlp", sd, keymap, ref, {}, "VLPromptLearner"


def case_promptsrc(gen):
    sd, keymap = _ivlp_like(gen, 4, 4)
    sd.update(_frozen_clip(gen, prefix_zs=True))
    ref = vpeft.PromptSRCConfig(n_ctx=4, n_ctx_vision=4, text_depth=2, vision_depth=2)
    return "promptsrc", sd, keymap, ref, {}, "VLPromptLearner"


CASES = {"coop": case_coop, "coop_csc": case_coop_csc, "cocoop": case_cocoop, "maple": case_maple,
         "ivlp": case_ivlp, "promptsrc": case_promptsrc}


def make_case(name: str, seed: int = 0):
    return CASES[name](torch.Generator().manual_seed(seed))


def save_dassl(directory, sd: dict, folder: str, epoch: int = 5, **extra):
    """Write ``sd`` the way Dassl's save_checkpoint does: ``<dir>/<model name>/model.pth.tar-<epoch>``."""
    d = directory / folder
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"model.pth.tar-{epoch}"
    torch.save({"state_dict": sd, "epoch": epoch, "optimizer": None, "scheduler": None, **extra}, path)
    return path


def logits(pm, tok) -> torch.Tensor:
    with torch.no_grad():
        return vpeft.ClipClassifier(pm, tok, NAMES)(images())


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {k: p.requires_grad for k, p in model.named_parameters()})


def assert_untouched(model, snap):
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    state, grads = snap
    now = model.state_dict()
    assert set(now) == set(state) and all(torch.equal(now[k], state[k]) for k in state)
    assert {k: p.requires_grad for k, p in model.named_parameters()} == grads


# --- loading ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_official_checkpoint_loads(name, tmp_path, tok):
    method, sd, keymap, ref_cfg, overrides, folder = make_case(name)
    path = save_dassl(tmp_path, sd, folder)
    pm = load_official_prompts(tiny(), path, **overrides)
    assert pm.method_keys == [method]
    assert pm.configs[0] == ref_cfg

    # every learner tensor is the official one (cast from fp16 where stored so), and nothing else was created
    own = pm.adapter_state_dict()
    assert set(own) == {f"_shared.{method}.{v}" for v in keymap.values()}
    for official, vname in keymap.items():
        t = own[f"_shared.{method}.{vname}"]
        assert t.dtype == torch.float32 and torch.equal(t, sd[official].float()), official

    # same logits as the reference config with the tensors copied in by this test's own key map
    got = logits(pm, tok)
    ref = vpeft.get_peft_model(tiny(), ref_cfg)
    with torch.no_grad():
        for official, vname in keymap.items():
            ref.shared[method].get_parameter(vname).copy_(sd[official])
    assert torch.allclose(got, logits(ref, tok), atol=1e-5)

    # every official tensor steers the logits: perturbing it alone changes them
    base = pm.unload()
    for official in keymap:
        moved = dict(sd)
        moved[official] = sd[official] + torch.randn(sd[official].shape, generator=torch.Generator().manual_seed(1))
        pm = load_official_prompts(base, {"state_dict": moved}, method, **overrides)
        assert (logits(pm, tok) - got).abs().max() > 1e-3, f"{official} does not reach the logits"
        pm.unload()


def test_maple_keeps_init_words_as_fixed_text(tok):
    _, sd, *_ = make_case("maple")
    pm = load_official_prompts(tiny(), sd)
    learner = pm.shared["maple"]
    assert learner.prompt_template("{}") == "X X of a {}."
    # the official prompt is "a photo of a dog." with positions 1..n_ctx replaced by the learned context
    rows = learner.tokenize(tok, ["dog", "sea_lion"])
    official = tok(["a photo of a dog.", "a photo of a sea lion."])
    official[:, 1:3] = tok.sot_token_id  # vpeft's context placeholder
    assert torch.equal(rows, official)


def test_ctx_init_decides_the_fixed_text():
    gen = torch.Generator().manual_seed(0)
    ivlp2 = {"ctx": _rand(gen, 2, D), "text_prompts.0": _rand(gen, 2, D), "vision_prompts.0": _rand(gen, 3, DV)}
    assert config_from_official("ivlp", ivlp2).ctx_init == "a photo of a"  # the method default
    assert config_from_official("ivlp", ivlp2, ctx_init=None).ctx_init is None
    assert config_from_official("ivlp", ivlp2, ctx_init="a_picture of").ctx_init == "a_picture of"
    cfg = config_from_official("ivlp", ivlp2)
    assert (cfg.text_depth, cfg.vision_depth, cfg.n_ctx, cfg.n_ctx_vision) == (2, 1, 2, 3)
    # the official learners ignore CTX_INIT for n_ctx > 4 (random context, "X X X X X {class}.")
    maple5 = {"ctx": _rand(gen, 5, D), "proj.weight": _rand(gen, DV, D), "proj.bias": _rand(gen, DV)}
    cfg = config_from_official("maple", maple5)
    assert (cfg.ctx_init, cfg.n_ctx, cfg.depth) == (None, 5, 1)
    pm = vpeft.get_peft_model(tiny(), config_from_official("maple", {**maple5, "ctx": maple5["ctx"][:2]},
                                                              ctx_init=None))
    assert pm.shared["maple"].prompt_template("{}") == "X X {}."
    # text-only IVLP (vision depth 0)
    cfg = config_from_official("ivlp", {"ctx": _rand(gen, 2, D)})
    assert (cfg.text_depth, cfg.vision_depth) == (1, 0)
    with pytest.raises(ValueError, match="inferred"):
        config_from_official("ivlp", ivlp2, n_ctx=3)


def test_coop_init_with_multi_token_words_is_refused(tok):
    word = "xylophonist"
    assert len(tok.encode(word)) > 1
    ctx = {"ctx": torch.zeros(2, D)}
    with pytest.raises(ValueError, match="BPE tokens"):
        config_from_official("coop", ctx, ctx_init=f"a {word}")
    assert config_from_official("coop", ctx, ctx_init="a photo").ctx_init is None  # single-token words: exact


def test_mapping_input_module_prefix_and_detection():
    for name in CASES:
        method, sd, keymap, *_ = make_case(name)
        got_method, converted = convert_official_prompts({f"module.{k}": v for k, v in sd.items()})
        assert got_method == method
        assert set(converted) == set(keymap.values())
        assert all(converted[v] is sd[k] for k, v in keymap.items())  # unchanged (no cast before loading)


def test_dassl_training_state_is_read_without_unpickling_objects(tmp_path, tok):
    if torch.__version__ < "2.6":
        pytest.skip("placeholders for training-state objects need torch >= 2.6")
    method, sd, keymap, _, _, folder = make_case("coop")
    # what Dassl writes: the optimizer's state dict, and a warm-up scheduler whose state holds the successor
    # scheduler object (which references the SGD optimizer object)
    param = torch.nn.Parameter(sd["ctx"].float())
    opt = torch.optim.SGD([param], lr=0.002, momentum=0.9)
    param.sum().backward()
    opt.step()
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 50.0)
    sched = {"successor": cosine, "warmup_epoch": 1, "cons_lr": 1e-5, "base_lrs": [0.002], "last_epoch": 1}
    path = tmp_path / folder / "model-best.pth.tar"
    path.parent.mkdir()
    torch.save({"state_dict": sd, "epoch": 50, "optimizer": opt.state_dict(), "scheduler": sched,
                "val_result": 71.5}, path)
    with pytest.raises(pickle.UnpicklingError):  # plain weights_only refuses this file
        torch.load(path, weights_only=True)
    pm = load_official_prompts(tiny(), path)
    assert torch.equal(pm.shared["coop"].ctx, sd["ctx"].float())


class _Opaque:
    """An arbitrary Python object in a checkpoint (needs full unpickling)."""

    def __init__(self) -> None:
        self.x = 1


def test_pickle_needing_full_unpickling_is_refused(tmp_path):
    _, sd, *_ = make_case("maple")
    path = save_dassl(tmp_path, sd, "MultiModalPromptLearner", cfg=_Opaque())
    model = tiny()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"weights_only=True.*_Opaque.*re-save only its state dict"):
        load_official_prompts(model, path)
    assert_untouched(model, snap)
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable torch checkpoint|cannot be read"):
        load_official_prompts(model, bad)
    with pytest.raises(FileNotFoundError):
        load_official_prompts(model, tmp_path / "missing.pth")


# --- errors -----------------------------------------------------------------------------------------------------------

def test_unknown_missing_and_inconsistent_keys():
    _, coop, *_ = make_case("coop")
    with pytest.raises(ValueError, match=r"unexpected key.*'bias_vec'.*holds ctx"):
        convert_official_prompts({**coop, "bias_vec": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"lacks \['ctx'\]"):
        convert_official_prompts({k: v for k, v in coop.items() if k != "ctx"})
    with pytest.raises(ValueError, match="prompt-learner state dict"):
        convert_official_prompts(coop, "maple")
    with pytest.raises(ValueError, match="cannot tell"):
        convert_official_prompts({"weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="method must be one of"):
        convert_official_prompts(coop, "vpt")

    _, cocoop, *_ = make_case("cocoop")
    with pytest.raises(ValueError, match=r"lacks \['meta_net.linear2.bias'\]"):
        convert_official_prompts({k: v for k, v in cocoop.items() if k != "meta_net.linear2.bias"})
    with pytest.raises(ValueError, match="meta_net.linear1.weight"):
        convert_official_prompts(cocoop, "coop")  # CoOp has no meta-net: its keys are unexpected

    _, maple, *_ = make_case("maple")
    with pytest.raises(ValueError, match=r"unexpected key.*prompt_learner\.new_thing.*compound_prompts_text"):
        convert_official_prompts({**maple, "prompt_learner.new_thing": torch.zeros(1)})
    with pytest.raises(ValueError, match="compound_prompt_projections"):
        convert_official_prompts({k: v for k, v in maple.items() if "projections.0.bias" not in k})
    with pytest.raises(ValueError, match=r"compound_prompts_text\.0'.*\(3, 48\)"):
        convert_official_prompts({**maple, "prompt_learner.compound_prompts_text.0": torch.zeros(3, D)})

    _, ivlp, *_ = make_case("ivlp")
    with pytest.raises(ValueError, match="VPT_deep"):
        convert_official_prompts({**ivlp, "image_encoder.transformer.resblocks.1.VPT_deep": torch.zeros(2, DV)})
    gap = dict(ivlp)
    text_vpt = "text_encoder.transformer.resblocks.{}.VPT_shallow"
    gap[text_vpt.format(3)] = gap.pop(text_vpt.format(1))
    with pytest.raises(ValueError, match="without gaps"):
        convert_official_prompts(gap)
    with pytest.raises(ValueError, match="block-0"):
        convert_official_prompts({k: v for k, v in ivlp.items() if k != "image_encoder.VPT"})
    with pytest.raises(ValueError, match="non-tensor"):
        convert_official_prompts({**ivlp, "prompt_learner.n_cls": 4})


def test_wrong_widths_and_depths_leave_the_model_untouched():
    model = tiny()
    snap = snapshot(model)
    gen = torch.Generator().manual_seed(0)
    # MaPLe prompts of ViT-B/16 (text 512, image 768) on the tiny model
    vit_b16 = {
        "prompt_learner.ctx": _rand(gen, 2, 512, dtype=torch.float16),
        "prompt_learner.proj.weight": _rand(gen, 768, 512, dtype=torch.float16),
        "prompt_learner.proj.bias": _rand(gen, 768, dtype=torch.float16),
        "prompt_learner.compound_prompts_text.0": _rand(gen, 2, 512),
        "prompt_learner.compound_prompt_projections.0.weight": _rand(gen, 768, 512),
        "prompt_learner.compound_prompt_projections.0.bias": _rand(gen, 768),
    }
    with pytest.raises(ValueError, match=r"do not fit this model.*prompt_learner\.compound_prompts_text\.0.*"
                                         r"\(2, 512\), model \(2, 48\).*text width 48, visual width 64"):
        load_official_prompts(model, vit_b16)
    assert_untouched(model, snap)
    # image prompts of the wrong width only
    _, ivlp, *_ = make_case("ivlp")
    wide = {**ivlp, "image_encoder.VPT": torch.zeros(2, 768),
            "image_encoder.transformer.resblocks.1.VPT_shallow": torch.zeros(2, 768)}
    with pytest.raises(ValueError, match=r"image_encoder\.VPT \(vpeft vision_prompts\.0\)"):
        load_official_prompts(model, wide)
    assert_untouched(model, snap)
    # deeper than the tiny towers (2 blocks)
    deep = dict(ivlp)
    for i in (2, 3):
        deep[f"text_encoder.transformer.resblocks.{i}.VPT_shallow"] = torch.zeros(2, D)
    with pytest.raises(ValueError, match="depth 4 exceeds"):
        load_official_prompts(model, deep)
    assert_untouched(model, snap)
    # class-specific context for 4 classes loads; the model already holding adapters is refused
    _, csc, *_ = make_case("coop_csc")
    pm = load_official_prompts(model, csc)
    with pytest.raises(TypeError, match="already a PeftModel"):
        load_official_prompts(pm, csc)
