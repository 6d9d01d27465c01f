"""The real pretraining trainer: `python -m pipeline.cli pretrain`, 2 processes on gloo, DeepSpeed
on the CPU (the tiny config's stage 0), tiny ALBEF, learnable synthetic shards made here.

One uninterrupted reference run (48 steps, checkpoints every 16) is shared by the assertions:
losses fall, TensorBoard holds every scalar, export round-trips. A second run of the same config
is interrupted twice -- SIGUSR1 to one rank mid-run (checkpoint at the current step, exit 75),
then SIGKILL of both ranks between checkpoints -- and resumed with `--resume auto` each time: its
final checkpoint must equal the reference's bit for bit (parameters, momentum twins, queues,
optimizer state, counters).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from pipeline.runtime import checkpoint
from pipeline.runtime.exit_codes import PREEMPTED_EXIT_CODE

from pipeline_testutils import (
    launch,
    make_shards,
    model_states,
    pretrain_cmd,
    read_log,
    tb_scalars,
    wait_all,
)

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

WORLD, STEPS, SAVE = 2, 48, 16
RUN_ARGS = (
    f"--train.max_steps={STEPS}",
    f"--train.save_every_steps={SAVE}",
    "--train.keep_last=3",
    "--logging.log_every_steps=1",
    "--train.alpha_ramp_epochs=0.25",  # an epoch is 768 pairs = 48 steps here: ramp over 12, reach 0.4
    # The geometry these tests assert (batch 8 x 2 ranks, queue 256, warm-up then cosine decay), pinned
    # against the tiny recipe's own values (batch 32, queue 64, constant LR).
    "--train.batch_size=8",
    "--model.queue_size=256",
    "--optim.lr=1e-3",
    "--optim.min_lr=1e-5",
)
EXPECTED_SCALARS = {
    "train/loss_itc",
    "train/loss_itm",
    "train/loss_mlm",
    "train/loss_total",
    "train/lr",
    "train/alpha",
    "train/temp",
    "train/loss_scale",
    "train/grad_norm",
    "train/skipped_steps",
    "train/itc_acc",
    "perf/images_per_s",
    "perf/images_per_s_per_gpu",
    "perf/data_wait_s",
    "data/bad_samples",
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("trainer_data") / "prep", n_train=256, per_shard=64, image_size=64)


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> Path:
    """The uninterrupted run."""
    root = tmp_path_factory.mktemp("reference")
    codes = wait_all(launch(pretrain_cmd(root / "run", shards, *RUN_ARGS), WORLD, root, "ref"))
    assert codes == [0, 0], read_log(root, "ref")[-3000:]
    return root


def _wait_for(predicate, what: str, procs, timeout: float = 600.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a rank exited while waiting for {what}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _logged_step(log_dir: Path, tag: str, step: int) -> bool:
    return f"step {step}/{STEPS} " in read_log(log_dir, tag)


def test_losses_fall_and_tensorboard_holds_every_scalar(reference: Path) -> None:
    scalars = tb_scalars(reference / "run" / "tensorboard")
    assert EXPECTED_SCALARS <= set(scalars), EXPECTED_SCALARS - set(scalars)
    total = [v for _, v in scalars["train/loss_total"]]
    mlm = [v for _, v in scalars["train/loss_mlm"]]
    assert len(total) == STEPS
    first, last = sum(total[:8]) / 8, sum(total[-8:]) / 8
    assert last < first - 0.5, (first, last)  # lr 1e-3: ~16.5 -> ~15.2
    assert sum(mlm[-8:]) / 8 < sum(mlm[:8]) / 8 - 0.5  # ~10.3 -> ~9.2
    lr = dict(scalars["train/lr"])
    assert lr[1] == pytest.approx(1e-5) and max(lr.values()) > lr[STEPS]  # warm-up then decay
    alpha = dict(scalars["train/alpha"])
    assert alpha[1] == 0.0 and alpha[STEPS] == pytest.approx(0.4)
    assert all(v == 1.0 for _, v in scalars["train/loss_scale"])  # fp32
    assert (reference / "run" / "config.yaml").read_text().startswith("# resolved config; git")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(reference / "run" / "tensorboard"))
    acc.Reload()
    assert "config/text_summary" in acc.Tags()["tensors"]  # the resolved config as text


def test_checkpoints_hold_fp32_momentum_and_queues(reference: Path) -> None:
    ckpt = reference / "run" / "checkpoints"
    assert checkpoint.read_latest(ckpt) == checkpoint.tag_for(STEPS)
    assert [s for s, _ in checkpoint.step_tags(ckpt)] == [16, 32, 48]
    states = model_states(ckpt, checkpoint.tag_for(STEPS))
    module = states["module"]
    assert {"image_queue", "text_queue", "queue_ptr"} <= set(module)  # buffers are in the DeepSpeed file
    twins = [
        k for k in module if k.startswith(("visual_encoder_m.", "text_encoder_m.", "vision_proj_m.", "text_proj_m."))
    ]
    assert twins and all(module[k].dtype == torch.float32 for k in twins if module[k].is_floating_point())
    assert int(module["queue_ptr"]) == (STEPS * 8 * WORLD) % 256  # every micro-batch enqueued B x world
    assert states["run"]["step"] == STEPS and states["run"]["samples_seen"] == STEPS * 8 * WORLD
    assert states["data"]["micro_step"] == STEPS and states["world_size"] == WORLD


def _assert_equal_tree(a, b, path: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"tensor differs at {path}"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"keys differ at {path}: {set(a) ^ set(b)}"
        for k in a:
            _assert_equal_tree(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal_tree(x, y, f"{path}[{i}]")


def test_sigusr1_then_sigkill_resume_equals_uninterrupted(reference: Path, shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    ckpt = run / "checkpoints"
    cmd = pretrain_cmd(run, shards, *RUN_ARGS)

    # 1) SIGUSR1 to rank 1 only: both ranks agree to stop after the same step, save it, exit 75.
    procs = launch(cmd, WORLD, tmp_path, "a")
    _wait_for(lambda: _logged_step(tmp_path, "a", 20), "step 20", procs)
    os.kill(procs[1].pid, signal.SIGUSR1)
    assert wait_all(procs) == [PREEMPTED_EXIT_CODE] * WORLD, read_log(tmp_path, "a")[-3000:]
    stopped = checkpoint.step_of(checkpoint.read_latest(ckpt) or "")
    assert stopped is not None and 20 <= stopped < STEPS
    assert f"checkpoint saved at step {stopped}" in read_log(tmp_path, "a")

    # 2) resume, then SIGKILL both ranks between the step-32 checkpoint and the next one.
    procs = launch(cmd, WORLD, tmp_path, "b")
    _wait_for(
        lambda: checkpoint.read_latest(ckpt) == checkpoint.tag_for(32) and _logged_step(tmp_path, "b", 34),
        "step 34",
        procs,
    )
    for p in procs:
        p.send_signal(signal.SIGKILL)
    wait_all(procs)
    assert checkpoint.read_latest(ckpt) == checkpoint.tag_for(32)
    assert f"resumed at step {stopped}" in read_log(tmp_path, "b")

    # 3) resume again and finish.
    procs = launch(cmd, WORLD, tmp_path, "c")
    assert wait_all(procs) == [0] * WORLD, read_log(tmp_path, "c")[-3000:]
    assert "resumed at step 32" in read_log(tmp_path, "c")

    tag = checkpoint.tag_for(STEPS)
    ours, ref = model_states(ckpt, tag), model_states(reference / "run" / "checkpoints", tag)
    _assert_equal_tree(ours["module"], ref["module"], "module")  # params, momentum twins, queues, queue_ptr
    assert ours["run"] == ref["run"] and ours["data"] == ref["data"]
    for key in ("global_steps", "global_samples", "skipped_steps"):
        assert ours[key] == ref[key], key
    # The tiny config runs without ZeRO (stage 0): the whole optimizer (Adam moments, step counts) is in
    # the model states file, no rank writes a partition. A ZeRO-2 run (partitions) resumes bit for bit in
    # tests/pipeline/train/test_launch_cluster.py.
    assert not list((ckpt / tag).glob(checkpoint.OPTIM_STATES_GLOB))
    assert ours["optimizer"]["state"], "no Adam state in the model states"
    _assert_equal_tree(ours["optimizer"], ref["optimizer"], "optimizer")
