"""Trainer pieces without a full pretraining run: optimizer groups, seeds, segments, checkpoint
retention/resolution, the preemption handler, and the generic loop on a toy task (accumulation
hooks, per-epoch validation + best checkpoint, NaN stop keeping the last good checkpoint)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.runtime import checkpoint
from pipeline.runtime.exit_codes import PREEMPTED_EXIT_CODE
from pipeline.runtime.preemption import PreemptionHandler
from pipeline.runtime.seeds import derive_seed
from pipeline.runtime.tb_logger import console_line
from pipeline.train.geometry import segment_steps_for
from pipeline.train.trainer import weight_decay_groups

from pipeline_testutils import REPO_ROOT, model_states, tb_scalars


def test_weight_decay_groups_hold_trainable_params_once() -> None:
    from model.albef import build_albef
    from model.config import ALBEFConfig

    model = build_albef(ALBEFConfig.tiny())
    groups = {g["name"]: g for g in weight_decay_groups(model, 0.02)}
    names = {id(p): n for n, p in model.named_parameters()}
    decay = [names[id(p)] for p in groups["decay"]["params"]]
    no_decay = [names[id(p)] for p in groups["no_decay"]["params"]]
    assert groups["decay"]["weight_decay"] == 0.02 and groups["no_decay"]["weight_decay"] == 0.0
    assert sorted(decay + no_decay) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    params = dict(model.named_parameters())
    # The official add_weight_decay: only 1-D parameters and biases are exempt, so the 0-d temp is decayed.
    assert "temp" in decay and "visual_encoder.norm.weight" in no_decay
    assert all(params[n].ndim == 1 or n.endswith(".bias") for n in no_decay)
    assert all(params[n].ndim != 1 and not n.endswith(".bias") for n in decay)
    assert not any(
        n.startswith(("visual_encoder_m", "text_encoder_m")) for n in decay + no_decay
    )  # twins never optimised


def test_step_seeds_differ_per_step_micro_and_rank() -> None:
    seeds = {derive_seed(0, s, m, r) for s in range(20) for m in range(2) for r in range(4)}
    assert len(seeds) == 160 and derive_seed(1, 2, 0, 1) == derive_seed(1, 2, 0, 1)


@pytest.mark.parametrize(
    "save, accum, expected", [(16, 1, 16), (2000, 1, 1000), (500, 4, 1000), (1501, 1, 79), (7, 3, 21)]
)
def test_segment_divides_the_checkpoint_interval(save: int, accum: int, expected: int) -> None:
    seg = segment_steps_for(save, accum)
    assert seg == expected and (save * accum) % seg == 0 and seg <= 1000


def _tag(root: Path, step: int | str) -> None:
    name = checkpoint.tag_for(step) if isinstance(step, int) else step
    (root / name).mkdir(parents=True)
    (root / name / checkpoint.MODEL_STATES).write_bytes(b"x")


def test_prune_keeps_last_k_latest_and_best(tmp_path: Path) -> None:
    for s in (2, 4, 6, 8, 10):
        _tag(tmp_path, s)
    _tag(tmp_path, checkpoint.BEST_TAG)
    (tmp_path / "latest").write_text(checkpoint.tag_for(4))  # e.g. a newer save that never finished
    assert sorted(checkpoint.prune(tmp_path, keep_last=2)) == ["global_step2", "global_step6"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        "best",
        "global_step10",
        "global_step4",
        "global_step8",
    ]


def test_resume_resolution(tmp_path: Path) -> None:
    ckpt = tmp_path / "run" / "checkpoints"
    assert checkpoint.resolve_resume("auto", ckpt) is None  # fresh run
    assert checkpoint.resolve_resume("none", ckpt) is None
    _tag(ckpt, 6)
    (ckpt / "latest").write_text("global_step6\n")
    assert checkpoint.resolve_resume("auto", ckpt) == (ckpt, "global_step6")
    assert checkpoint.resolve_resume("none", ckpt) is None
    assert checkpoint.resolve_resume(str(tmp_path / "run"), tmp_path / "other") == (ckpt, "global_step6")  # run folder
    assert checkpoint.resolve_resume(str(ckpt / "global_step6"), tmp_path / "other") == (ckpt, "global_step6")  # tag
    with pytest.raises(FileNotFoundError, match="no DeepSpeed checkpoint"):
        checkpoint.resolve_resume(str(tmp_path / "nowhere"), ckpt)


def test_preemption_handler_flags_and_restores() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionHandler() as handler:
        assert not handler.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert handler.requested and handler.received == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is before
    assert PREEMPTED_EXIT_CODE == 75


def test_console_line_has_the_figures() -> None:
    line = console_line(
        10,
        100,
        0.5,
        {
            "train/loss_total": 3.0,
            "train/loss_itc": 1.0,
            "train/loss_scale": 1024.0,
            "train/lr": 1e-4,
            "perf/images_per_s": 50.0,
            "perf/images_per_s_per_gpu": 25.0,
            "perf/data_wait_frac": 0.1,
            "data/bad_samples": 2,
        },
    )
    assert (
        "step 10/100" in line
        and "itc 1.0000" in line
        and "scale 1024" in line
        and "50.0 img/s" in line
        and "bad 2" in line
    )
    assert "scale 1.0" not in line.split("|")[1]  # the loss scale is not listed as a loss


def _toy(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # a plain single process, whatever ran in this pytest process before
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "tests" / "pipeline" / "train" / "toy_task.py"), str(run_dir), *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_toy_task_hooks_validation_best_and_retention(tmp_path: Path) -> None:
    proc = _toy(tmp_path / "run", "--max_steps=12", "--save_every=4", "--grad_accum=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = tmp_path / "run" / "checkpoints"
    assert [s for s, _ in checkpoint.step_tags(ckpt)] == [8, 12] and checkpoint.read_latest(ckpt) == "global_step12"
    final = model_states(ckpt, "global_step12")
    assert int(final["module"]["begin_calls"]) == 12  # once per optimizer step (ALBEF: the EMA)
    assert int(final["module"]["micro_calls"]) == 24  # once per micro-batch (ALBEF: enqueue)
    assert final["run"]["samples_seen"] == 12 * 2 * 4 and final["run"]["bad_samples"] == 5  # micro-steps 0,5,..,20
    best = model_states(ckpt, checkpoint.BEST_TAG)
    scalars = tb_scalars(tmp_path / "run" / "tensorboard")
    val = dict(scalars["val/score"])
    assert sorted(val) == [3, 6, 9, 12]  # once per epoch (3 steps)
    assert best["run"]["best_value"] == pytest.approx(max(val.values()))
    assert best["run"]["step"] == max(val, key=val.get)


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    proc = _toy(tmp_path / "run", "--max_steps=12", "--save_every=4", "--nan_at=6")
    assert proc.returncode == 1
    assert (
        "non-finite loss or gradient at step 6" in proc.stderr and "last good checkpoint is global_step4" in proc.stderr
    )
    ckpt = tmp_path / "run" / "checkpoints"
    assert checkpoint.read_latest(ckpt) == "global_step4" and [s for s, _ in checkpoint.step_tags(ckpt)] == [4]
    assert torch.isfinite(model_states(ckpt, "global_step4")["module"]["net.0.weight"]).all()


@pytest.mark.slow
@pytest.mark.parametrize(
    "ds",
    ["ds_configs/cpu.json", "ds_configs/cpu_bf16.json", "ds_configs/cpu_zero2.json", "ds_configs/cpu_ds_bf16.json"],
)
def test_nan_gradient_under_a_finite_loss_stops_too(tmp_path: Path, ds: str) -> None:
    """fp32 engines never scan gradients, and our bf16 configs turn DeepSpeed's scan off
    (check_grad_overflow: false): the trainer's grad-norm check must catch what the loss does not.
    ZeRO engines (cpu_zero2, cpu_ds_bf16) report their norm; without ZeRO (cpu, cpu_bf16: stage 0)
    DeepSpeed computes none and the trainer takes its own."""
    proc = _toy(tmp_path / "run", "--max_steps=12", "--save_every=4", "--nan_grad_at=6", f"--ds={ds}")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "non-finite loss or gradient at step 6" in proc.stderr
    ckpt = tmp_path / "run" / "checkpoints"
    assert checkpoint.read_latest(ckpt) == "global_step4" and [s for s, _ in checkpoint.step_tags(ckpt)] == [4]
