"""``FewShotClassifier`` / ``PeftTask``: adapter-only, strictly reloaded checkpoints; the frozen backbone check;
method config forms; adapter directories (also with CLIP's task-owned head)."""

from __future__ import annotations

import functools

import pytest

pytest.importorskip("lightning")

import torch  # noqa: E402
from _train_helpers import BACKBONE, TINY  # noqa: E402
from lightning.pytorch import Trainer  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import vpeft  # noqa: E402
from vpeft.modules import FewShotClassifier  # noqa: E402


def tiny_task(**kw) -> FewShotClassifier:
    args = dict(backbone=BACKBONE, num_classes=3, methods=[vpeft.LoraConfig(r=2)], backbone_kwargs=TINY, init_seed=0)
    args.update(kw)
    task = FewShotClassifier(**args)
    task.configure_model()
    return task


def _x(n: int = 4, size: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def _train(task: FewShotClassifier, steps: int = 2) -> Trainer:
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 3, (8,), generator=g))
    trainer = Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu")
    trainer.fit(task, DataLoader(data, batch_size=4))
    return trainer


def test_state_dict_holds_adapters_and_head_only():
    task = tiny_task()
    keys = set(task.state_dict())
    assert keys == {f"model.{k}" for k in task.model.adapter_state_dict()}
    assert "model.head.weight" in keys and not any("patch_embed" in k or "base_layer" in k for k in keys)
    frozen = sum(p.numel() for p in task.parameters() if not p.requires_grad)
    assert sum(t.numel() for t in task.state_dict().values()) < frozen / 4


def test_load_state_dict_is_strict():
    task, other = tiny_task(), tiny_task()
    state = dict(task.state_dict())
    dropped = state.pop("model.head.bias")
    with pytest.raises(ValueError, match="missing.*model.head.bias"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="unexpected.*model.extra"):
        other.load_state_dict({**state, "model.head.bias": dropped, "model.extra": dropped})
    keys = other.load_state_dict(state, strict=False)
    assert keys.missing_keys == ["model.head.bias"] and keys.unexpected_keys == []


def test_checkpoint_roundtrip_restores_outputs(tmp_path):
    task = tiny_task()
    trainer = _train(task)
    path = tmp_path / "t.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)  # plain data only: hparams hold no pickled objects
    assert set(ckpt["state_dict"]) == set(task.state_dict()) and ckpt["vpeft"]["backbone"] == BACKBONE
    assert "optimizer_states" in ckpt
    restored = FewShotClassifier.load_from_checkpoint(path).eval()
    task.eval()
    with torch.no_grad():
        assert torch.equal(restored(_x()), task(_x()))
    assert [c.to_dict() for c in restored.model.configs] == [c.to_dict() for c in task.model.configs]


def test_other_frozen_backbone_is_refused(tmp_path):
    trainer = _train(tiny_task())
    path = tmp_path / "t.ckpt"
    trainer.save_checkpoint(path)
    with pytest.raises(ValueError, match="frozen backbone differs"):
        FewShotClassifier.load_from_checkpoint(path, init_seed=1)  # another random backbone
    with pytest.raises(ValueError, match="architecture"):
        FewShotClassifier.load_from_checkpoint(path, backbone_kwargs={**TINY, "embed_dim": 48})


def test_method_config_forms_are_equivalent():
    forms = [[vpeft.LoraConfig(r=2, targets=["q"])],
             [{"class_path": "vpeft.LoraConfig", "init_args": {"r": 2, "targets": ["q"]}}],
             [{"method": "lora", "r": 2, "targets": ["q"]}]]
    dicts = [[c.to_dict() for c in FewShotClassifier(BACKBONE, 3, methods=f).methods] for f in forms]
    assert dicts[0] == dicts[1] == dicts[2]
    with pytest.raises(TypeError, match="PeftConfig"):
        FewShotClassifier(BACKBONE, 3, methods=[{"class_path": "torch.nn.Linear"}])
    with pytest.raises(ValueError, match="unknown field"):
        FewShotClassifier(BACKBONE, 3, methods=[{"method": "lora", "rank": 2}])


def test_hparams_are_plain_data():
    task = FewShotClassifier(BACKBONE, 3, methods=[vpeft.SSFConfig()],
                             optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    assert "optimizer" not in task.hparams  # a callable cannot be stored in a weights_only checkpoint
    fields = {k: v for k, v in vpeft.SSFConfig().to_dict().items() if k != "method"}
    assert task.hparams["methods"] == [{"class_path": "vpeft.methods.ssf.SSFConfig", "init_args": fields}]


def test_adapter_directory_roundtrip(tmp_path):
    task = tiny_task()
    _train(task)
    task.save_adapter(str(tmp_path / "a"))
    again = tiny_task(methods=None, adapter=str(tmp_path / "a")).eval()
    task.eval()
    with torch.no_grad():
        assert torch.equal(again(_x()), task(_x()))
    with pytest.raises(ValueError, match="holds methods"):
        tiny_task(methods=[vpeft.SSFConfig()], adapter=str(tmp_path / "a"))


def test_clip_backbone_gets_a_task_head(tmp_path):
    from conftest import TINY_CLIP, register_tiny_clip

    register_tiny_clip()
    task = tiny_task(backbone=f"open_clip:{TINY_CLIP}", backbone_kwargs={}, methods=[vpeft.LoraConfig(r=2)])
    assert {"head.weight", "head.bias"} <= set(task.state_dict())
    assert not any(k.startswith("model.text") or "token_embedding" in k for k in task.state_dict())
    task.save_adapter(str(tmp_path / "clip"))
    assert (tmp_path / "clip" / "task_state.safetensors").is_file()
    again = tiny_task(backbone=f"open_clip:{TINY_CLIP}", backbone_kwargs={}, methods=None,
                      adapter=str(tmp_path / "clip")).eval()
    with torch.no_grad():
        x = _x(2, 32)
        assert torch.equal(again(x), task.eval()(x))


def test_training_rng_follows_the_batch_counters():
    task = tiny_task()
    draws = []
    for _ in range(2):
        task.on_train_batch_start(None, 3)
        draws.append(torch.rand(4))
    task.on_train_batch_start(None, 4)
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], torch.rand(4))
