"""DDP on CPU: two gloo processes through the real CLI train the same adapter as one process with the same global
batch.

Why they agree: ``FewShotDataModule`` shuffles with a ``DistributedSampler`` permutation seeded by ``seed + epoch``
(rank ``r`` takes ``perm[r::2]``), so the two ranks' batches of 4 together are exactly the single process's batch of
8, augmented identically (per-sample seeds); each rank's mean loss is over 4 images and DDP averages the two
gradients, which is the mean over the 8. Only the floating-point summation order differs (the all-reduce adds two
partial means instead of one 8-term mean), a relative error of a few float32 ulps (~1e-7) per step. Six AdamW steps
(which normalise each update by the gradient's own running RMS, so a relative gradient error stays a relative update
error) keep the difference near 1e-7 of the parameters' scale; measured here: max 4e-8 absolute on tensors of size
~0.05-0.2. The test allows 1e-5 absolute, 100x above that floor and still 100x below how far training moves the
adapters (checked, so equality is not the trivial "nothing trained").
"""

from __future__ import annotations

import pytest
import torch
from _train_helpers import adapter_tensors, card, cli_args, coop_root_fixture, run_subprocess, torch_threads

from vpeft.cli import main

pytestmark = [pytest.mark.slow]

coop_root = coop_root_fixture()


def test_ddp_two_cpu_processes_match_single_process(coop_root, tmp_path):
    pytest.importorskip("lightning")
    common = ("--trainer.max_epochs=2", "--checkpoint.monitor=null")
    run_subprocess(["fit", *cli_args(coop_root, tmp_path / "ddp", *common, "--data.batch_size=4",
                                     "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu")])
    with torch_threads(1):
        assert main(["fit", *cli_args(coop_root, tmp_path / "single", *common, "--data.batch_size=8")]) == 0

    ddp, single = card(tmp_path / "ddp", "fit"), card(tmp_path / "single", "fit")
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    assert ddp["global_step"] == single["global_step"] == 6  # 24 images / global batch 8 x 2 epochs
    assert ddp["manifest"]["hash"] == single["manifest"]["hash"]
    a, b = adapter_tensors(ddp["adapter_dir"]), adapter_tensors(single["adapter_dir"])
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)

    # Training moved the adapters far beyond the tolerance (LoRA's B starts at zero).
    moved = max(b[k].abs().max().item() for k in b if "lora_B" in k)
    assert moved > 1e-3
