"""Launch as srun does on a multi-node cluster, on this one machine (issue 15).

- 2 "nodes" x 2 ranks: the environment srun gives every task (SLURM_PROCID/LOCALID/NODEID/NTASKS,
  a two-host SLURM_STEP_NODELIST "127.0.0.[1-2]" whose first host is the master; no RANK/
  WORLD_SIZE/MASTER_ADDR) -> ranks, local ranks, master address, GPU choice for fake device
  counts; training and retrieval evaluation equal the one-process run.
- A stop signal in the middle of fine-tuning-style validation: saved at once, marker written,
  exit 75 on every rank, resumed to the end.
- A resume under another ZeRO layout (partitions vs stage 0) exits 2 and touches nothing.
- `--resume auto` past an incomplete `latest` (a kill between the shard writes and the commit)
  resumes from the previous complete tag, bit for bit; with no complete tag it exits 2 and
  touches nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import ALBEFConfig, build_albef
from pipeline.config import REPO_ROOT
from pipeline.runtime import checkpoint
from pipeline.runtime.distributed import device_for, dist_info_from_env
from pipeline.runtime.exit_codes import CONFIG_ERROR_EXIT_CODE, PREEMPTED_EXIT_CODE
from pipeline.runtime.io import torch_load_weights_only

from pipeline_testutils import make_synthetic_splits

SCRIPT = REPO_ROOT / "tests" / "pipeline" / "train" / "replicated_task.py"
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
NODES, PER_NODE = 2, 2


def srun_env(procid: int, port: int, nodes: int = NODES, per_node: int = PER_NODE) -> dict[str, str]:
    """What srun sets for task `procid` of a `nodes` x `per_node` step (block distribution)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("SLURM_")}
    ntasks = nodes * per_node
    env.update(
        {
            "SLURM_JOB_ID": "4242",
            "SLURM_PROCID": str(procid),
            "SLURM_LOCALID": str(procid % per_node),
            "SLURM_NODEID": str(procid // per_node),
            "SLURM_NTASKS": str(ntasks),
            "SLURM_STEP_NUM_TASKS": str(ntasks),
            "SLURM_STEP_NUM_NODES": str(nodes),
            "SLURM_JOB_NUM_NODES": str(nodes),
            "SLURM_NTASKS_PER_NODE": f"{per_node}(x{nodes})",
            "SLURM_STEP_NODELIST": f"127.0.0.[1-{nodes}]",  # two loopback hosts; the first is the master
            "SLURM_JOB_NODELIST": f"127.0.0.[1-{nodes}]",
            "MASTER_PORT": str(port),  # the sbatch scripts export it (15000 + job id % 20000)
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        }
    )
    return env


def plain_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("SLURM_")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ranks(cmd: list[str], envs: list[dict[str, str]], timeout: float = 900) -> list[subprocess.CompletedProcess]:
    procs = [
        subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for env in envs
    ]
    out = []
    for p in procs:
        stdout, _ = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, ""))
    return out


def module(run: Path, tag: str) -> dict[str, torch.Tensor]:
    return torch_load_weights_only(run / "checkpoints" / tag / checkpoint.MODEL_STATES)["module"]


def one_process(run: Path, *args: str) -> subprocess.CompletedProcess:
    """The replicated task as one plain process (no launcher), its output in stdout."""
    (proc,) = run_ranks([sys.executable, str(SCRIPT), str(run), *args], [plain_env()])
    return proc


def assert_trained_alike(run: Path, reference: Path, tag: str = "global_step9") -> None:
    """Same weights up to summation order (other world sizes or ZeRO layouts reduce in another order)."""
    ours, ref = module(run, tag), module(reference, tag)
    for name in ref:
        assert torch.allclose(ours[name], ref[name], rtol=1e-5, atol=1e-6), name


def test_srun_env_of_two_nodes_gives_ranks_master_and_gpus() -> None:
    for procid in range(NODES * PER_NODE):
        info = dist_info_from_env(srun_env(procid, port=29400))
        assert (info.rank, info.world_size, info.local_rank, info.local_world_size, info.launcher) == (
            procid,
            4,
            procid % 2,
            2,
            "slurm",
        )
        assert (info.master_addr, info.master_port) == ("127.0.0.1", 29400)
        assert device_for(info, "cuda", device_count=2) == torch.device("cuda", procid % 2)  # one rank per GPU
        assert device_for(info, "cuda", device_count=1) == torch.device("cuda", 0)  # --gpus-per-task=1/--gpu-bind
        assert device_for(info, "cuda", device_count=8) == torch.device("cuda", procid % 2)
        assert device_for(info, "cpu").type == "cpu"
    # A stray launcher variable from the submitting shell would win: the sbatch scripts unset them.
    stray = {**srun_env(3, port=29400), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    assert dist_info_from_env(stray).world_size == 1
    for script in ("pretrain.sbatch", "finetune.sbatch", "eval.sbatch"):
        text = (REPO_ROOT / "slurm" / script).read_text()
        assert "unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE" in text and "--kill-on-bad-exit=1" in text


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("one") / "run"
    proc = one_process(run)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return run


@pytest.mark.slow
@pytest.mark.distributed
def test_two_nodes_of_two_ranks_train_like_one_process(one_process_run: Path, tmp_path: Path) -> None:
    run, port = tmp_path / "run", free_port()
    procs = run_ranks([sys.executable, str(SCRIPT), str(run)], [srun_env(r, port) for r in range(4)])
    assert [p.returncode for p in procs] == [0] * 4, procs[0].stdout[-3000:]
    for r, p in enumerate(procs):
        (line,) = [x for x in p.stdout.splitlines() if x.startswith("DISTINFO ")]
        seen = json.loads(line.removeprefix("DISTINFO "))
        assert (seen["rank"], seen["local_rank"], seen["world_size"], seen["launcher"]) == (r, r % 2, 4, "slurm")
        assert seen["master_addr"] == "127.0.0.1" and seen["master_port"] == port
        assert seen["devices"] == {"1": "cuda:0", "2": f"cuda:{r % 2}", "8": f"cuda:{r % 2}"}
    record = json.loads((run / "checkpoints" / "global_step9" / checkpoint.COMMIT_FILE).read_text())
    assert record["world_size"] == 4 and len([f for f in record["files"] if "optim_states" in f]) == 4
    assert_trained_alike(run, one_process_run)  # identical batches on every rank: the one-process gradient


@pytest.mark.slow
@pytest.mark.distributed
def test_stop_during_validation_saves_marks_and_resumes(one_process_run: Path, tmp_path: Path) -> None:
    run, port = tmp_path / "run", free_port()
    marker = run / "checkpoints" / ".preempted.4242.0"
    cmd = [sys.executable, str(SCRIPT), str(run), "--signal_in_validation=6", "--signal_rank=1"]
    envs = [{**srun_env(r, port, nodes=1), "ALBEF_PREEMPT_MARKER": str(marker)} for r in range(2)]
    procs = run_ranks(cmd, envs)
    assert [p.returncode for p in procs] == [PREEMPTED_EXIT_CODE] * 2, procs[0].stdout[-3000:]
    assert "validation at step 6 interrupted by a stop signal" in procs[0].stdout
    assert checkpoint.latest_name(run / "checkpoints") == "global_step6"
    assert json.loads(marker.read_text())["step"] == 6  # written by rank 0 before any rank exited
    # The requeued run (next restart: another marker name) resumes and finishes.
    envs = [{**e, "ALBEF_PREEMPT_MARKER": str(marker.with_suffix(".1"))} for e in envs]
    procs = run_ranks([sys.executable, str(SCRIPT), str(run)], envs)
    assert [p.returncode for p in procs] == [0, 0], procs[0].stdout[-3000:]
    assert "resumed at step 6" in procs[0].stdout and not marker.with_suffix(".1").exists()
    assert_trained_alike(run, one_process_run)


@pytest.mark.slow
def test_resume_auto_skips_an_uncommitted_latest_bit_for_bit(one_process_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(one_process_run, run)
    ckpt = run / "checkpoints"
    # The save of step 9 was killed between the shard writes and the commit: rank 0's partition
    # is gone and `latest` (as DeepSpeed used to write it early) already names it.
    (ckpt / "global_step9" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    proc = one_process(run)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "names global_step9, which is incomplete" in proc.stdout and "resumed at step 6" in proc.stdout
    ours, ref = module(run, "global_step9"), module(one_process_run, "global_step9")
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
    assert checkpoint.incomplete_reason(ckpt, "global_step9") is None


@pytest.mark.slow
def test_one_process_without_zero_trains_like_zero2(one_process_run: Path, tmp_path: Path) -> None:
    """Stage 0 on one rank skips DeepSpeed's (pointless) gradient all-reduce: same training as ZeRO-2."""
    run = tmp_path / "run"
    proc = one_process(run, "--ds=ds_configs/cpu.json")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "DeepSpeed's gradient all-reduce is skipped" in proc.stdout
    assert not list((run / "checkpoints" / "global_step9").glob(checkpoint.OPTIM_STATES_GLOB))
    ref, start = module(one_process_run, "global_step9"), module(one_process_run, "global_step3")
    assert any(not torch.equal(ref[k], start[k]) for k in ref)  # it trained
    assert_trained_alike(run, one_process_run)


@pytest.mark.slow
def test_resume_under_another_zero_layout_exits_2_and_keeps_the_run(one_process_run: Path, tmp_path: Path) -> None:
    """A ZeRO-2 run resumed with a stage-0 config: DeepSpeed would die in the optimizer load."""
    run = tmp_path / "run"
    shutil.copytree(one_process_run, run)
    before = {p: p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file()}
    proc = one_process(run, "--ds=ds_configs/cpu.json")
    assert proc.returncode == CONFIG_ERROR_EXIT_CODE, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout
    assert "was written with ZeRO (optimizer partition files), but this run's deepspeed.config uses ZeRO stage 0" in (
        proc.stdout
    )
    assert {p: p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_resume_auto_without_a_complete_tag_exits_2_and_keeps_the_tags(tmp_path: Path) -> None:
    ckpt = tmp_path / "run" / "checkpoints"
    (ckpt / "global_step3").mkdir(parents=True)
    (ckpt / "global_step3" / checkpoint.MODEL_STATES).write_bytes(b"half a file")
    (ckpt / "global_step3" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"x")
    (ckpt / "latest").write_text("global_step7")  # dangling
    proc = one_process(tmp_path / "run")
    assert proc.returncode == CONFIG_ERROR_EXIT_CODE, proc.stdout[-3000:]
    assert "none is complete" in proc.stdout and "refusing to train from scratch" in proc.stdout
    assert (ckpt / "global_step3" / checkpoint.MODEL_STATES).read_bytes() == b"half a file"
    assert sorted(p.name for p in ckpt.iterdir()) == ["global_step3", "latest"]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_nodes_of_two_ranks_evaluate_like_one_process(tmp_path: Path) -> None:
    from pipeline.stages.evaluate_retrieval import evaluate_retrieval

    split = make_synthetic_splits(tmp_path / "data", n_train=8, n_test=12, image_size=32)["test"]
    torch.manual_seed(0)
    cfg = ALBEFConfig.tiny(image_size=32, queue_size=16)
    ckpt = tmp_path / "tiny.pth"
    torch.save({"model": build_albef(cfg).state_dict(), "model_config": cfg.to_dict()}, ckpt)
    args = ["--checkpoint", str(ckpt), "--data", str(split), "--k_test=4", "--num_workers=0", "--device=cpu"]
    cmd = [sys.executable, "-m", "pipeline.cli", "evaluate", "retrieval", *args, "--exact=true"]
    port = free_port()
    procs = run_ranks([*cmd, "--output_dir", str(tmp_path / "four")], [srun_env(r, port) for r in range(4)])
    assert [p.returncode for p in procs] == [0] * 4, procs[0].stdout[-3000:]
    single = evaluate_retrieval(
        str(ckpt),
        str(split),
        str(tmp_path / "one"),
        k_test=4,
        overrides={"num_workers": 0, "device": "cpu", "exact": True},
    )
    four = json.loads((tmp_path / "four" / "eval" / "retrieval_synthetic_test.json").read_text())
    assert (four["world_size"], four["device"]) == (4, "cpu")
    assert four["metrics"] == single["metrics"]
