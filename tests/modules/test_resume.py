"""Fault tolerance: a real ``vpeft fit`` process SIGKILLed after its first checkpoint, restarted with
``--ckpt_path last``, ends with exactly (bit for bit) the adapter of an uninterrupted run.

The run uses LoRA dropout and a cosine schedule, so the RNG and the scheduler are restored too, not only the
weights. Checkpoints are written at epoch ends (the data pipeline is reproducible per epoch, not per batch); a kill
mid-epoch loses that epoch's partial progress, which the restarted run recomputes identically.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch
from _train_helpers import (
    REPO,
    adapter_tensors,
    card,
    cli_args,
    coop_root_fixture,
    subprocess_env,
    torch_threads,
    vpeft_cmd,
)

from vpeft.cli import main

pytestmark = [pytest.mark.slow]

RECIPE = """
model:
  methods:
    - class_path: vpeft.LoraConfig
      init_args: {r: 4, dropout: 0.1}
  trainable_extra: [head]
  lr_scheduler:
    class_path: torch.optim.lr_scheduler.CosineAnnealingLR
    init_args: {T_max: 4}
"""

coop_root = coop_root_fixture()


def test_sigkill_and_resume_gives_the_uninterrupted_adapter(coop_root, tmp_path):
    pytest.importorskip("lightning")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    extra = ("-c", str(recipe), "--trainer.max_epochs=4", "--data.batch_size=4")

    with torch_threads(1):  # the killed subprocess runs single-threaded: same kernels, same bits
        assert main(["fit", *cli_args(coop_root, tmp_path / "straight", *extra)]) == 0
    reference = adapter_tensors(card(tmp_path / "straight", "fit")["adapter_dir"])

    out = tmp_path / "killed"
    last = out / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(vpeft_cmd("fit", *cli_args(coop_root, out, *extra)), env=subprocess_env(1),
                            cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if not last.exists():
            err = proc.stderr.read()[-3000:] if proc.poll() is not None else "(still running)"
            pytest.fail(f"no checkpoint appeared (rc={proc.poll()}): {err}")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = torch.load(last, weights_only=True)  # complete and loadable: written atomically
    assert killed_at["epoch"] < 3

    with torch_threads(1):
        assert main(["fit", *cli_args(coop_root, out, *extra, "--ckpt_path", "last")]) == 0
    resumed = card(out, "fit")
    assert resumed["ckpt_path"] == str(last) and resumed["global_step"] == 24  # 4 epochs x 24 images / 4
    final = adapter_tensors(resumed["adapter_dir"])
    assert final.keys() == reference.keys()
    for k in reference:
        assert torch.equal(final[k], reference[k]), k
