"""Checkpoint layout, resume resolution and retention around DeepSpeed's own save/load.

Layout of `RUN/checkpoints/`:
    global_step{N}/          one DeepSpeed tag per save (tag = optimizer step N):
        mp_rank_00_model_states.pt               module state dict (parameters in the engine's
                                                 dtype; momentum twins + queues are fp32 buffers),
                                                 our client state, DeepSpeed counters
        zero_pp_rank_{r}_mp_rank_00_optim_states.pt   rank r's fp32 master + Adam partition
    best/                    fine-tuning only: the checkpoint with the best validation metric
    latest                   text file naming the newest complete tag (written by DeepSpeed last)

Saving is collective: every rank calls `engine.save_checkpoint` (each writes its optimizer
partition), then rank 0 prunes old tags. `latest` is written after the tag's files, so a run killed
mid-save resumes from the previous tag.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

TAG_PREFIX = "global_step"
BEST_TAG = "best"
LATEST_FILE = "latest"
MODEL_STATES = "mp_rank_00_model_states.pt"
OPTIM_STATES_GLOB = "*zero_pp_rank_*_mp_rank_00_optim_states.pt"  # bf16 runs prefix "bf16_"
_TAG_RE = re.compile(rf"^{TAG_PREFIX}(\d+)$")


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step}"


def step_of(tag: str) -> int | None:
    match = _TAG_RE.match(tag)
    return int(match.group(1)) if match else None


def step_tags(ckpt_dir: str | Path) -> list[tuple[int, str]]:
    """(step, tag) of every step checkpoint folder, oldest first."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    found = [(step_of(p.name), p.name) for p in root.iterdir() if p.is_dir()]
    return sorted((s, t) for s, t in found if s is not None)


def read_latest(ckpt_dir: str | Path) -> str | None:
    """The tag named by `ckpt_dir/latest`, if that file and the tag folder exist."""
    path = Path(ckpt_dir) / LATEST_FILE
    if not path.is_file():
        return None
    tag = path.read_text(encoding="utf-8").strip()
    return tag if tag and (Path(ckpt_dir) / tag).is_dir() else None


def locate(path: str | Path) -> tuple[Path, str]:
    """(checkpoint dir, tag) from a run folder, a checkpoints folder (its `latest`) or a tag folder.

    Raises FileNotFoundError saying what was expected.
    """
    p = Path(path)
    if (p / MODEL_STATES).is_file():
        return p.parent, p.name
    for ckpt_dir in (p / "checkpoints", p):
        tag = read_latest(ckpt_dir)
        if tag is not None:
            return ckpt_dir, tag
    raise FileNotFoundError(
        f"no DeepSpeed checkpoint at {p}: expected a run folder, a checkpoints folder with "
        f"'{LATEST_FILE}', or a tag folder holding {MODEL_STATES}"
    )


def resolve_resume(resume: str | None, ckpt_dir: str | Path) -> tuple[Path, str] | None:
    """What to load for `--resume`: 'none' -> None; 'auto' -> `latest` of this run if any; else a path."""
    value = "none" if resume is None else str(resume)
    if value.lower() == "none":
        return None
    if value.lower() == "auto":
        tag = read_latest(ckpt_dir)
        return (Path(ckpt_dir), tag) if tag is not None else None
    return locate(value)


def prune(ckpt_dir: str | Path, keep_last: int) -> list[str]:
    """Delete all but the `keep_last` newest step tags (never `best`, never what `latest` names)."""
    latest = read_latest(ckpt_dir)
    tags = step_tags(ckpt_dir)
    doomed = [t for _, t in tags[: max(0, len(tags) - keep_last)] if t != latest]
    for tag in doomed:
        shutil.rmtree(Path(ckpt_dir) / tag, ignore_errors=True)
    if doomed:
        logger.info("pruned checkpoints %s (keeping the last %d)", ", ".join(doomed), keep_last)
    return doomed


def save(
    engine: Any,
    ckpt_dir: str | Path,
    tag: str,
    client_state: dict[str, Any],
    *,
    keep_last: int | None,
    is_main: bool,
    latest: bool = True,
) -> None:
    """Collective DeepSpeed save of `tag`, then (rank 0) retention. Call on every rank."""
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=latest)
    if dist.is_initialized():
        dist.barrier()
    if is_main and keep_last is not None:
        prune(ckpt_dir, keep_last)
    logger.info("saved checkpoint %s/%s", ckpt_dir, tag)


def load(engine: Any, ckpt_dir: str | Path, tag: str, load_file: Callable[..., Any]) -> dict[str, Any]:
    """Collective DeepSpeed load (module, fp32 master + optimizer, counters); returns the client state.

    DeepSpeed reads every file through `engine.checkpoint_engine.load`, which unpickles without
    restriction; for this call it reads through `load_file(path, map_location)` instead (the
    caller passes the weights-only reader), so a planted payload cannot run on resume.
    """
    reader = engine.checkpoint_engine
    unrestricted = reader.load
    reader.load = lambda path, map_location=None: load_file(path, map_location)
    try:
        path, client_state = engine.load_checkpoint(
            str(ckpt_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
        )
    finally:
        reader.load = unrestricted
    if path is None:
        raise FileNotFoundError(f"DeepSpeed could not load checkpoint {ckpt_dir}/{tag}")
    logger.info("resumed from %s", path)
    return client_state or {}


def fp32_master_weights(
    ckpt_dir: str | Path, tag: str, model_states: dict[str, Any], load: Callable[[Path], Any]
) -> dict[str, torch.Tensor]:
    """The fp32 master copy of every trainable parameter, rebuilt from the ZeRO-1/2 partitions.

    Each rank's optimizer file holds, per parameter group, its slice of one flat fp32 vector; the
    slices in rank order are the whole vector, in which the parameters listed by the model file's
    `param_shapes` follow each other (plus the alignment padding DeepSpeed may record). `load`
    reads one file (weights-only: the caller's choice of loader).
    """
    folder = Path(ckpt_dir) / tag
    files = sorted(folder.glob(OPTIM_STATES_GLOB), key=lambda f: int(re.findall(r"zero_pp_rank_(\d+)_", f.name)[0]))
    if not files:
        raise FileNotFoundError(f"{folder}: no ZeRO optimizer partitions ({OPTIM_STATES_GLOB})")
    states = [load(f)["optimizer_state_dict"] for f in files]
    if int(states[0].get("zero_stage", 0)) > 2:
        raise ValueError(f"{folder}: ZeRO stage {states[0]['zero_stage']} checkpoints are not supported")
    groups = [s["single_partition_of_fp32_groups"] for s in states]
    paddings = states[0].get("param_alignment_paddings")
    shapes_per_group = model_states["param_shapes"]
    out: dict[str, torch.Tensor] = {}
    for g, shapes in enumerate(shapes_per_group):
        flat = torch.cat([rank_groups[g] for rank_groups in groups])
        offset = 0
        for i, (name, shape) in enumerate(shapes.items()):
            numel = math.prod(shape)
            out[name] = flat.narrow(0, offset, numel).view(tuple(shape)).clone()
            offset += numel + (paddings[g][i] if paddings is not None else 0)
        if offset > flat.numel():
            raise ValueError(f"{folder}: group {g} needs {offset} values, the partitions hold {flat.numel()}")
    return out
