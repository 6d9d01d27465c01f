"""Launcher environments -> DistInfo: torchrun, SLURM srun, a plain process, and half-set ones."""

from __future__ import annotations

import pytest

from pipeline.runtime.distributed import DistEnvError, dist_info_from_env, export_env, first_host


def test_torchrun_env() -> None:
    env = {
        "RANK": "3",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "n1",
        "MASTER_PORT": "29500",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "1",
    }  # torchrun inside a SLURM allocation: torchrun wins
    info = dist_info_from_env(env)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (3, 8, 1, 2)
    assert (info.master_addr, info.master_port, info.launcher, info.is_main) == (
        "n1",
        29500,
        "torchrun",
        False,
    )


def test_slurm_srun_env_takes_master_from_first_host() -> None:
    env = {
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS": "8",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_NTASKS_PER_NODE": "4(x2)",
        "SLURM_JOB_NODELIST": "gpu[007-008]",
        "SLURM_JOB_ID": "123456",
    }
    info = dist_info_from_env(env)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (5, 8, 1, 4)
    assert info.master_addr == "gpu007" and info.launcher == "slurm"
    assert info.master_port == 15000 + 123456 % 20000  # per-job port: two jobs on a node do not collide
    exported: dict[str, str] = {}
    export_env(info, exported)
    assert exported == {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "gpu007",
        "MASTER_PORT": str(info.master_port),
    }


def test_slurm_env_keeps_explicit_master() -> None:
    env = {
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NTASKS": "2",
        "SLURM_NODELIST": "a,b",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "4000",
    }
    info = dist_info_from_env(env)
    assert (info.master_addr, info.master_port, info.world_size) == ("10.0.0.1", 4000, 2)


def test_plain_process_is_rank_0_of_1_with_a_free_port() -> None:
    info = dist_info_from_env({})
    assert (info.rank, info.world_size, info.local_rank, info.launcher) == (0, 1, 0, "single")
    assert info.master_addr == "127.0.0.1" and 0 < info.master_port < 65536
    exported: dict[str, str] = {}
    export_env(info, exported)  # what DeepSpeed needs to skip MPI discovery
    assert {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"} <= set(exported)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RANK": "0", "WORLD_SIZE": "2"}, "LOCAL_RANK missing"),
        ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "1"}, "rank 2 outside"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "MASTER_ADDR"),
        ({"RANK": "a", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "1"}, "RANK='a'"),
        ({"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2"}, "SLURM_JOB_NODELIST"),
    ],
)
def test_half_set_environments_raise(env: dict, message: str) -> None:
    with pytest.raises(DistEnvError, match=message):
        dist_info_from_env(env)


@pytest.mark.parametrize(
    "nodelist, host",
    [("node1", "node1"), ("gpu[03-05,9],cpu1", "gpu03"), ("a-1,b", "a-1"), ("gpu[003-004]", "gpu003"), ("x[7]", "x7")],
)
def test_first_host(nodelist: str, host: str) -> None:
    assert first_host(nodelist) == host
