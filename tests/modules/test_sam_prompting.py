"""MapSAM automatic prompting (vpeft.modules._sam_prompting): the batched decoder against the official one, the
attention mask's effect, point selection, the target embedding, the prompt generator, and SamSegmenter with
``auto_prompt`` (loss, save/load, errors)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lightning")
pytest.importorskip("segment_anything")

import vpeft  # noqa: E402
from vpeft.modules._sam_prompting import (  # noqa: E402
    AutoPromptConfig,
    PromptGenerator,
    attention_bias,
    decode,
    foreground_mask,
    select_points,
    target_embedding,
)
from vpeft.modules.segmentation import SamSegmenter  # noqa: E402

TINY = dict(img_size=64, embed_dim=64, depth=2, num_heads=4, window_size=2, global_attn_indexes=(1,))


@pytest.fixture(scope="module")
def sam():
    torch.manual_seed(0)
    return vpeft.create_backbone("sam:vit_b", **TINY)


def _prompts(sam, b: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    coords = torch.randint(0, 64, (b, 3, 2), generator=g).float()
    labels = torch.tensor([[1, 0, 1]] * b)
    return sam.prompt_encoder(points=(coords, labels), boxes=None, masks=None)


def test_decode_equals_the_official_decoder_image_by_image(sam):
    emb = torch.randn(2, 256, 4, 4)
    sparse, dense = _prompts(sam, 2)
    pe = sam.prompt_encoder.get_dense_pe()
    with torch.no_grad():
        got, iou = decode(sam.mask_decoder, emb, pe, sparse, dense)
        for i in range(2):
            ref, ref_iou = sam.mask_decoder.predict_masks(emb[i:i + 1], pe, sparse[i:i + 1], dense[i:i + 1])
            torch.testing.assert_close(got[i:i + 1], ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(iou[i:i + 1], ref_iou, rtol=1e-5, atol=1e-5)
    # The prompt-free shared prompt broadcasts like the official decoder's.
    sparse0, dense0 = sam.prompt_encoder(points=None, boxes=None, masks=None)
    with torch.no_grad():
        got0, _ = decode(sam.mask_decoder, emb, pe, sparse0, dense0)
        ref0, _ = sam.mask_decoder.predict_masks(emb, pe, sparse0, dense0)
    torch.testing.assert_close(got0, ref0, rtol=1e-5, atol=1e-5)


def test_masked_attention_hides_background_positions_from_the_tokens(sam):
    """Tokens read the image only through the masked token-to-image attentions, and the decoder's upscaling has no
    spatial mixing (stride-2, kernel-2 transposed convolutions, per-position LayerNorm): with the mask, changing the
    embedding at masked positions leaves the IoU output and the mask logits of the kept positions unchanged; without
    it, both change."""
    emb = torch.randn(1, 256, 4, 4)
    fg = torch.zeros(1, 16, dtype=torch.bool)
    fg[0, [0, 1, 5, 6]] = True
    bias = attention_bias(fg, emb.dtype)
    other = emb.clone()
    other.flatten(2)[0, :, ~fg[0]] += torch.randn(256, 12) * 3
    sparse, dense = _prompts(sam, 1)
    pe = sam.prompt_encoder.get_dense_pe()
    keep = fg[0].reshape(4, 4).repeat_interleave(4, 0).repeat_interleave(4, 1)
    with torch.no_grad():
        a, ia = decode(sam.mask_decoder, emb, pe, sparse, dense, bias=bias)
        b, ib = decode(sam.mask_decoder, other, pe, sparse, dense, bias=bias)
        c, ic = decode(sam.mask_decoder, other, pe, sparse, dense)
        d, id_ = decode(sam.mask_decoder, emb, pe, sparse, dense)
    torch.testing.assert_close(ia, ib, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a[..., keep], b[..., keep], rtol=1e-5, atol=1e-5)
    assert (ic - id_).abs().max() > 1e-3 and (c[..., keep] - d[..., keep]).abs().max() > 1e-3


def test_attention_bias_attends_everywhere_for_an_empty_foreground():
    fg = torch.tensor([[True, False, False], [False, False, False]])
    bias = attention_bias(fg, torch.float32)
    assert bias.shape == (2, 1, 1, 3)
    assert bias[0, 0, 0].tolist() == [0.0, float("-inf"), float("-inf")]
    assert bias[1, 0, 0].tolist() == [0.0, 0.0, 0.0]


def test_target_embedding_is_the_foreground_mean_or_the_probability_weighted_mean():
    emb = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 2, 2)
    coarse = torch.tensor([[[[3.0, -3.0], [0.0, -5.0]]], [[[-4.0, -3.0], [-2.0, -5.0]]]])
    fg = foreground_mask(coarse, 0.2)
    assert fg.tolist() == [[True, False, True, False], [False, False, False, False]]
    t = target_embedding(emb, fg, coarse)
    assert t.shape == (2, 1, 3)
    # image 0: mean over positions 0 and 2 of each channel (values c*4 + {0, 2}) = c*4 + 1
    torch.testing.assert_close(t[0, 0], torch.tensor([1.0, 5.0, 9.0]))
    p = torch.sigmoid(coarse[1].flatten())
    want = (emb[1].flatten(1) * p).sum(1) / p.sum()
    torch.testing.assert_close(t[1, 0], want)


def test_select_points_takes_extremes_inside_the_image_area():
    coarse = torch.zeros(1, 1, 4, 4)
    coarse[0, 0, 1, 0] = 5.0   # inside a 64 x 32 image (left half)
    coarse[0, 0, 2, 1] = -5.0  # inside
    coarse[0, 0, 0, 3] = 9.0   # in the padding (right half): never a prompt
    coarse[0, 0, 3, 3] = -9.0  # in the padding
    coords, labels = select_points(coarse, 1, img_size=64, input_size=(64, 32))
    assert labels.tolist() == [[1, 0]]
    x_pos, y_pos = coords[0, 0].tolist()
    x_neg, y_neg = coords[0, 1].tolist()
    # The 4 x 4 map upsampled to 64: coarse cell (row, col) covers pixels [16 row, 16 row + 16) x [16 col, ...).
    assert 16 <= y_pos < 32 and 0 <= x_pos < 16
    assert 32 <= y_neg < 48 and 16 <= x_neg < 32
    with pytest.raises(ValueError, match="exceeds"):
        select_points(coarse, 5, img_size=64, input_size=(2, 2))


def test_prompt_generator_parameters_and_shape():
    head = PromptGenerator(256, (64, 16))
    # conv 256->64, LayerNorm2d(64), conv 64->16, LayerNorm2d(16), conv 16->1
    want = (256 * 64 + 64) + 2 * 64 + (64 * 16 + 16) + 2 * 16 + (16 + 1)
    assert sum(p.numel() for p in head.parameters()) == want == 17665
    assert head(torch.randn(2, 256, 4, 4)).shape == (2, 1, 4, 4)


@pytest.mark.parametrize("kwargs, pieces", [
    (dict(points=0), "points"), (dict(threshold=1.0), "threshold"), (dict(loss_weight=-1), "loss_weight"),
    (dict(semantic=1), "semantic"), (dict(hidden=(8,)), "hidden"),
])
def test_auto_prompt_errors(kwargs, pieces):
    with pytest.raises((ValueError, TypeError), match=pieces):
        SamSegmenter("sam:vit_b", num_classes=2, backbone_kwargs=dict(TINY), auto_prompt=AutoPromptConfig(**kwargs))
    with pytest.raises(TypeError, match="AutoPromptConfig"):
        SamSegmenter("sam:vit_b", num_classes=2, backbone_kwargs=dict(TINY), auto_prompt="mapsam")


def _task(**kw) -> SamSegmenter:
    task = SamSegmenter("sam:vit_b", num_classes=3, backbone_kwargs=dict(TINY), init_seed=3,
                        auto_prompt=AutoPromptConfig(**kw))
    task.configure_model()
    return task


def test_task_uses_the_generated_prompts_and_trains_the_head(tmp_path):
    task = _task()
    images = torch.rand(2, 3, 64, 48) * 255
    labels = torch.zeros(2, 64, 48, dtype=torch.long)
    labels[:, 10:30, 5:25] = 1
    labels[:, 40:60, 20:40] = 2
    task.log = lambda *a, **k: None
    loss = task._step((images, labels), "train")
    loss.backward()
    assert task.prompt_head.layers[0].weight.grad is not None
    assert task.prompt_head.layers[0].weight.grad.abs().sum() > 0
    # The total loss is the SAMed loss plus the hint loss; the hint loss is the BCE against label > 0, computed here
    # independently at the decoder's low resolution (16 x 16 for a 64-pixel input; the 48-wide image covers 12).
    with torch.no_grad():
        coarse = task.prompt_head(task.sam.image_embeddings(images))
        up = F.interpolate(coarse, (16, 16), mode="bilinear", align_corners=False)[:, 0, :, :12]
        fg = F.interpolate((labels > 0).float()[:, None], (16, 12), mode="nearest-exact")[:, 0]
        want = F.binary_cross_entropy_with_logits(up, fg)
        torch.testing.assert_close(task.prompt_loss(coarse, labels, (64, 48)), want)
    # Switching the semantic prompt and the masked attention off changes the logits (they are used).
    with torch.no_grad():
        full = task.low_res_logits(images)
        task.auto_prompt.semantic = task.auto_prompt.masked_attention = False
        plain = task.low_res_logits(images)
    assert (full - plain).abs().max() > 1e-4


def test_prompt_head_saves_and_loads_with_the_adapter(tmp_path):
    task = _task()
    with torch.no_grad():
        for p in task.prompt_head.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    task.save_adapter(str(tmp_path / "a"))
    images = torch.rand(1, 3, 64, 64) * 255
    with torch.no_grad():
        want = task.low_res_logits(images)
    other = SamSegmenter("sam:vit_b", num_classes=3, backbone_kwargs=dict(TINY), init_seed=3,
                         auto_prompt=AutoPromptConfig(), adapter=str(tmp_path / "a"))
    other.configure_model()
    with torch.no_grad():
        torch.testing.assert_close(other.low_res_logits(images), want, rtol=1e-5, atol=1e-5)
    # hparams hold plain data; a task rebuilt from them gets the same config back.
    again = SamSegmenter(**{k: v for k, v in task.hparams.items() if k != "methods"})
    assert again.auto_prompt == task.auto_prompt
    head = copy.deepcopy(task.prompt_head.state_dict())
    assert set(head) <= {k[len("prompt_head."):] for k in task.state_dict() if k.startswith("prompt_head.")}


def test_cli_fit_with_automatic_prompting_improves_dice_and_reloads(tmp_path):
    """The MapSAM tiny preset through the CLI: Dice after 3 epochs beats the untrained model's; the adapter directory
    (DoRA, decoder, prompt encoder, prompt generator) reloads into a fresh task with identical logits, and merging the
    DoRA factors leaves them unchanged."""
    from test_segmentation import _card, fit_preset_improves_dice

    from vpeft.datasets.segmentation import SegmentationDataModule
    from vpeft.modules.lightning_cli import run

    root, common, fit = fit_preset_improves_dice(tmp_path, "sam_mapsam_tiny_cpu.yaml")
    # `vpeft test` rebuilds the task (auto_prompt included) from the adapter-only checkpoint.
    run(["test", *common, "--trainer.default_root_dir", str(tmp_path / "test"), "--ckpt_path",
         str(next((tmp_path / "fit").rglob("last.ckpt")))])
    assert _card(tmp_path / "test", "test")["metrics"]["test/dice"] > 0.5
    model_cfg = fit["config"]["model"]
    assert model_cfg.get("init_args", model_cfg)["auto_prompt"]["points"] == 2, model_cfg
    assert "val/prompt_loss" in fit["metrics"]

    adapter = next((tmp_path / "fit").rglob("adapter"))
    assert (adapter / "task_state.safetensors").is_file()
    task = SamSegmenter("sam:vit_b", num_classes=2, backbone_kwargs=dict(TINY), init_seed=1,
                        methods=[vpeft.DoRAConfig(r=4, targets=["q", "v"])], auto_prompt=AutoPromptConfig(),
                        adapter=str(adapter)).eval()
    task.configure_model()
    dm = SegmentationDataModule(str(root), class_map={0: 0, 255: 1}, image_size=64, batch_size=4)
    dm.setup("test")
    x, y = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        logits = task(x)
        pred = task.predict_labels(logits)
        task.model.merge()
        merged = task(x)
        task.model.unmerge()
    torch.testing.assert_close(merged, logits, rtol=1e-4, atol=1e-4)
    inter = ((pred == 1) & (y == 1)).sum().item()
    assert 2 * inter / ((pred == 1).sum().item() + (y == 1).sum().item()) > 0.5
