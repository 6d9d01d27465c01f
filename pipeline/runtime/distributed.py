"""One place that turns the launcher's environment into a frozen `DistInfo`, then initialises
torch.distributed through DeepSpeed.

Three launchers are supported and detected in this order:
- torchrun / `deepspeed` launcher / `python -m torch.distributed.run`: RANK, WORLD_SIZE, LOCAL_RANK
  (+ MASTER_ADDR/PORT) are set.
- SLURM `srun` (one task per GPU): SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS (SLURM_STEP_NUM_TASKS
  inside a step); MASTER_ADDR defaults to the first host of the node list, MASTER_PORT to a port
  derived from the job id so two jobs sharing a node do not collide.
- a plain process: rank 0 of 1.

Whatever the launcher, `init_distributed` exports RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT
before calling `deepspeed.init_distributed`; without them DeepSpeed falls back to MPI discovery and
asks for mpi4py. A half-set environment (RANK without WORLD_SIZE, rank >= world size...) raises
instead of silently training as N independent single-process jobs.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import socket
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, Literal

import deepspeed
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

Launcher = Literal["torchrun", "slurm", "single"]
_TORCHRUN_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class DistEnvError(RuntimeError):
    """The launcher environment is inconsistent (half-set or out of range)."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job. Passed to whatever needs it; nothing reads env later."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: Launcher

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info_from_env(env: Mapping[str, str] | None = None) -> DistInfo:
    """Read the launcher's environment (default: os.environ) into a validated DistInfo."""
    env = os.environ if env is None else env
    present = [k for k in _TORCHRUN_KEYS if k in env]
    if present:
        if len(present) != len(_TORCHRUN_KEYS):
            missing = [k for k in _TORCHRUN_KEYS if k not in env]
            raise DistEnvError(
                f"half-set launcher environment: {', '.join(present)} set but {', '.join(missing)} missing"
            )
        info = _from_torchrun(env)
    elif "SLURM_PROCID" in env and _slurm_ntasks(env) is not None:
        info = _from_slurm(env)
    else:
        info = DistInfo(
            0, 1, 0, 1, env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 0)) or _free_port(), "single"
        )
    _validate(info)
    return info


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except (KeyError, ValueError):
        raise DistEnvError(f"{key}={env.get(key)!r} is not an integer") from None


def _from_torchrun(env: Mapping[str, str]) -> DistInfo:
    world = _int(env, "WORLD_SIZE")
    addr = env.get("MASTER_ADDR")
    port = env.get("MASTER_PORT")
    if world > 1 and (not addr or not port):
        raise DistEnvError("WORLD_SIZE > 1 but MASTER_ADDR/MASTER_PORT are not set")
    local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    return DistInfo(
        _int(env, "RANK"),
        world,
        _int(env, "LOCAL_RANK"),
        local_world,
        addr or "127.0.0.1",
        int(port or 0) or _free_port(),
        "torchrun",
    )


def _slurm_ntasks(env: Mapping[str, str]) -> str | None:
    # Inside an srun step SLURM_STEP_NUM_TASKS is the step's size; SLURM_NTASKS is the allocation's.
    return env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")


def _from_slurm(env: Mapping[str, str]) -> DistInfo:
    world = int(_slurm_ntasks(env) or 1)
    nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    local_world = int(env.get("SLURM_NTASKS_PER_NODE", "0").split("(")[0] or 0) or max(1, world // max(1, nodes))
    addr = env.get("MASTER_ADDR")
    if not addr:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise DistEnvError("SLURM_PROCID set but no SLURM_JOB_NODELIST to take MASTER_ADDR from")
        addr = first_host(nodelist)
    port = int(env.get("MASTER_PORT") or 0) or 15000 + int(env.get("SLURM_JOB_ID", "0") or 0) % 20000
    return DistInfo(_int(env, "SLURM_PROCID"), world, _int(env, "SLURM_LOCALID"), local_world, addr, port, "slurm")


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu[03-05,9],cpu1' -> 'gpu03', 'a-1,b' -> 'a-1'.

    Zero padding of a range is kept (gpu[003-004] -> gpu003), as `scontrol show hostnames` does.
    """
    text = nodelist.strip()
    if not text:
        raise DistEnvError("empty SLURM node list")
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", text)
    if match is None:
        raise DistEnvError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, bracket = match.group(1), match.group(3)
    if bracket is None:
        return prefix
    first = bracket.split(",")[0].split("-")[0]
    return f"{prefix}{first}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _validate(info: DistInfo) -> None:
    if info.world_size < 1:
        raise DistEnvError(f"world size {info.world_size} < 1")
    if not 0 <= info.rank < info.world_size:
        raise DistEnvError(f"rank {info.rank} outside [0, {info.world_size})")
    if not 0 <= info.local_rank < max(1, info.local_world_size):
        raise DistEnvError(f"local rank {info.local_rank} outside [0, {info.local_world_size})")
    if not 0 < info.master_port < 65536:
        raise DistEnvError(f"master port {info.master_port} outside (0, 65536)")


def export_env(info: DistInfo, env: MutableMapping[str, str] | None = None) -> None:
    """Write the torch launcher variables DeepSpeed and torch.distributed read (default: os.environ)."""
    env = os.environ if env is None else env
    env["RANK"] = str(info.rank)
    env["WORLD_SIZE"] = str(info.world_size)
    env["LOCAL_RANK"] = str(info.local_rank)
    env["LOCAL_WORLD_SIZE"] = str(info.local_world_size)
    env["MASTER_ADDR"] = info.master_addr
    env["MASTER_PORT"] = str(info.master_port)


def device_for(info: DistInfo, kind: str, device_count: int | None = None) -> torch.device:
    """This rank's device: the CPU, or the GPU of its local rank.

    Under `--gpus-per-task=1` or `--gpu-bind` each task sees one GPU (index 0), so the local rank
    is taken modulo the visible count rather than used as an index.
    """
    if kind != "cuda":
        return torch.device("cpu")
    count = torch.cuda.device_count() if device_count is None else device_count
    if count < 1:
        raise RuntimeError("cuda requested but no GPU is visible")
    return torch.device("cuda", 0 if count == 1 else info.local_rank % count)


def init_distributed(info: DistInfo, device: str, timeout_s: float = 1800.0, group_of_one: bool = True) -> torch.device:
    """Export the env, pin the GPU, start torch.distributed via DeepSpeed (gloo on CPU); returns the device.

    Every stage (training and evaluation) starts its process group here. A single process starts
    a group of one only with `group_of_one` (the DeepSpeed engine wants one; evaluation does not).
    The first call on a machine JIT-compiles DeepSpeed's shared-memory op (~75 s on
    2 cores); it is cached under TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions).
    """
    torch_device = device_for(info, device)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    if dist.is_initialized() or (info.world_size == 1 and not group_of_one):
        return torch_device  # no group to start: leave the environment as it is
    export_env(info)
    backend = "nccl" if device == "cuda" else "gloo"
    deepspeed.init_distributed(
        dist_backend=backend,
        auto_mpi_discovery=False,
        timeout=datetime.timedelta(seconds=timeout_s),
        rank=info.rank,
        world_size=info.world_size,
    )
    logger.info(
        "distributed: rank %d/%d (local %d) via %s, backend %s, master %s:%d",
        info.rank,
        info.world_size,
        info.local_rank,
        info.launcher,
        backend,
        info.master_addr,
        info.master_port,
    )
    return torch_device


def all_gather_objects(obj: Any, world_size: int) -> list[Any]:
    """Every rank's picklable `obj` in rank order: what evaluations gather (per-rank results of
    unequal sizes). world_size 1 = this process alone ([obj]), whatever process group exists."""
    if world_size == 1:
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over the ranks, in place (unchanged without a process group of several ranks)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t
