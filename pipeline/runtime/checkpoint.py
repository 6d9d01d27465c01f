"""Checkpoint layout, commit protocol, resume resolution and retention around DeepSpeed's save/load.

Layout of `RUN/checkpoints/`:
    global_step{N}/          one DeepSpeed tag per save (tag = optimizer step N):
        mp_rank_00_model_states.pt               module state dict (parameters in the engine's
                                                 dtype; momentum twins + queues are fp32 buffers),
                                                 our client state, DeepSpeed counters
        zero_pp_rank_{r}_mp_rank_00_optim_states.pt   rank r's fp32 master + Adam partition (ZeRO
                                                 stages 1-2; stage 0 keeps the optimizer in
                                                 the model states)
        commit.json                              written by rank 0 once every rank's files are on
                                                 disk: world size, file names and sizes
    best/                    fine-tuning only: the checkpoint with the best validation metric
    latest                   text file naming the newest committed tag
    .preempted.<job>.<restart>   written by rank 0 after a preemption save (the sbatch scripts
                                 requeue on it; pipeline/runtime/preemption.py)

Commit protocol (`save`): every rank writes its files with DeepSpeed's `save_latest=False`
(DeepSpeed would write `latest` from rank 0 before its final barrier, while other nodes may still
be writing), then a barrier, then rank 0 writes `commit.json` and `latest`, each atomically (temp
file + fsync + rename). A kill at any point leaves `latest` naming a complete tag.

A tag is complete when its model states and every rank's optimizer partition are there (without
ZeRO, stage 0, the optimizer is in the model states and there are no partitions): its
`commit.json` lists them with their sizes. A tag without one is uncommitted when other tags have
one (the save died, or an overwrite of it did: the record is removed first); in a folder of older
code without any record, a tag passes when its partitions are ranks 0..n-1 without a gap. `--resume auto` takes the tag `latest` names when it
is complete, else the newest complete tag (with a warning); when tags exist but none is complete it
refuses (ResumeError, exit 2) rather than train from scratch over them.
"""

from __future__ import annotations

import json
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
COMMIT_FILE = "commit.json"
MODEL_STATES = "mp_rank_00_model_states.pt"
OPTIM_STATES_GLOB = "*zero_pp_rank_*_mp_rank_00_optim_states.pt"  # bf16 runs prefix "bf16_"
_TAG_RE = re.compile(rf"^{TAG_PREFIX}(\d+)$")
_RANK_RE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


class ResumeError(RuntimeError):
    """`--resume auto` found checkpoints but none it can safely resume from (exit 2, nothing written)."""


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


def latest_name(ckpt_dir: str | Path) -> str | None:
    """What `ckpt_dir/latest` says (None when the file is missing or empty), whether or not the tag exists."""
    path = Path(ckpt_dir) / LATEST_FILE
    if not path.is_file():
        return None
    return path.read_text(encoding="utf-8").strip() or None


def read_latest(ckpt_dir: str | Path) -> str | None:
    """The tag named by `ckpt_dir/latest`, if that file and the tag folder exist."""
    tag = latest_name(ckpt_dir)
    return tag if tag and (Path(ckpt_dir) / tag).is_dir() else None


def partition_ranks(folder: str | Path) -> list[int]:
    """Ranks of the ZeRO optimizer partitions in a tag folder, sorted."""
    return sorted(int(m.group(1)) for f in Path(folder).glob(OPTIM_STATES_GLOB) if (m := _RANK_RE.search(f.name)))


def incomplete_reason(ckpt_dir: str | Path, tag: str) -> str | None:
    """Why `tag` cannot be resumed from (None when it is complete; see the module docstring)."""
    folder = Path(ckpt_dir) / tag
    if not folder.is_dir():
        return "no such folder"
    if not (folder / MODEL_STATES).is_file():
        return f"{MODEL_STATES} missing"
    record = folder / COMMIT_FILE
    if record.is_file():
        try:
            files = dict(json.loads(record.read_text(encoding="utf-8"))["files"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            return f"unreadable {COMMIT_FILE} ({err})"
        for name, size in sorted(files.items()):
            path = folder / name
            if not path.is_file():
                return f"{name} missing (listed in {COMMIT_FILE})"
            if path.stat().st_size != size:
                return f"{name} has {path.stat().st_size} bytes, {COMMIT_FILE} says {size}"
        return None
    if any((other / COMMIT_FILE).is_file() for other in Path(ckpt_dir).iterdir() if other.is_dir()):
        # This run writes records: a tag without one was never committed (killed mid-save, or
        # being overwritten), whatever files it holds.
        return f"not committed (no {COMMIT_FILE})"
    ranks = partition_ranks(folder)  # a tag of older code: judged by its files
    if ranks != list(range(len(ranks))):
        missing = sorted(set(range(max(ranks) + 1)) - set(ranks))
        return f"optimizer partition of rank(s) {missing} missing"
    return None


def write_commit(ckpt_dir: str | Path, tag: str, world_size: int, *, latest: bool) -> None:
    """Rank 0, after the save barrier: `tag/commit.json`, then (if `latest`) the `latest` pointer.

    Both are written atomically (temp + fsync + rename), so `latest` never names a tag whose
    record is not on disk, and never holds half a name.
    """
    from pipeline.runtime.io import write_json_atomic, write_text_atomic  # io imports this module

    folder = Path(ckpt_dir) / tag
    files = {f.name: f.stat().st_size for f in sorted(folder.iterdir()) if f.is_file() and f.name != COMMIT_FILE}
    write_json_atomic(folder / COMMIT_FILE, {"tag": tag, "world_size": world_size, "files": files})
    if latest:
        write_text_atomic(Path(ckpt_dir) / LATEST_FILE, tag)


def newest_complete(ckpt_dir: str | Path) -> str | None:
    """The newest complete step tag, if any."""
    for _, tag in reversed(step_tags(ckpt_dir)):
        if incomplete_reason(ckpt_dir, tag) is None:
            return tag
    return None


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
    """What to load for `--resume`: 'none' -> None; 'auto' -> see `resolve_auto`; else a path."""
    value = "none" if resume is None else str(resume)
    if value.lower() == "none":
        return None
    if value.lower() == "auto":
        tag = resolve_auto(ckpt_dir)
        return (Path(ckpt_dir), tag) if tag is not None else None
    return locate(value)


def resolve_auto(ckpt_dir: str | Path) -> str | None:
    """The tag `--resume auto` loads: `latest` when complete, else the newest complete tag.

    None only when the folder holds no step tag at all (a fresh run). Raises ResumeError when
    tags exist but none is complete: training from scratch would overwrite them.
    """
    named = latest_name(ckpt_dir)
    tags = step_tags(ckpt_dir)
    if named is not None:
        reason = incomplete_reason(ckpt_dir, named)
        if reason is None:
            return named
        fallback = newest_complete(ckpt_dir)
        if fallback is not None:
            logger.warning(
                "%s/%s names %s, which is incomplete (%s); resuming from %s, the newest complete checkpoint",
                ckpt_dir,
                LATEST_FILE,
                named,
                reason,
                fallback,
            )
            return fallback
    else:
        fallback = newest_complete(ckpt_dir)
        if fallback is not None:
            logger.warning(
                "%s has no '%s'; resuming from %s, the newest complete checkpoint", ckpt_dir, LATEST_FILE, fallback
            )
            return fallback
    if tags:
        details = "; ".join(f"{t}: {incomplete_reason(ckpt_dir, t)}" for _, t in tags)
        raise ResumeError(
            f"--resume auto: {ckpt_dir} holds checkpoints but none is complete ({details}); "
            "refusing to train from scratch over them. Resume from one explicitly (--resume PATH), "
            "move them away, or use another --output_dir"
        )
    if named is not None:
        logger.warning(
            "%s/%s names %s, which does not exist, and there is no other checkpoint", ckpt_dir, LATEST_FILE, named
        )
    return None


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
    world_size: int = 1,
    latest: bool = True,
) -> None:
    """Collective save of `tag` with the commit protocol of the module docstring. Call on every rank.

    On return `latest` (if asked for) names `tag` on every rank: the last barrier follows the commit.
    """
    folder = Path(ckpt_dir) / tag
    if is_main:
        # Overwriting a tag (`best`, or a step re-trained after a resume): it is uncommitted until
        # the new record is written, so a kill mid-overwrite is seen as incomplete.
        (folder / COMMIT_FILE).unlink(missing_ok=True)
    _barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    _barrier()  # every rank's files are written and closed
    if is_main:
        write_commit(ckpt_dir, tag, world_size, latest=latest)
        if keep_last is not None:
            prune(ckpt_dir, keep_last)
    _barrier()
    logger.info("saved checkpoint %s/%s", ckpt_dir, tag)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def check_zero_layout(folder: Path, stage: int) -> None:
    """Refuse (ResumeError, exit 2) a tag written with or without ZeRO by an engine of the other kind.

    A ZeRO engine (stage 1/2) keeps its optimizer in per-rank partition files, a stage-0 engine in
    the model states file; DeepSpeed itself would fail deep inside the optimizer load with a
    traceback (or, the other way round, find no partition to read)."""
    written_with_zero = bool(partition_ranks(folder))
    if written_with_zero != (stage > 0):
        was = "with ZeRO (optimizer partition files)" if written_with_zero else "without ZeRO (stage 0)"
        raise ResumeError(
            f"{folder} was written {was}, but this run's deepspeed.config uses ZeRO stage {stage}: "
            "resume with the DeepSpeed config the run was written with"
        )


def load(engine: Any, ckpt_dir: str | Path, tag: str, load_file: Callable[..., Any]) -> dict[str, Any]:
    """Collective DeepSpeed load (module, fp32 master + optimizer, counters); returns the client state.

    DeepSpeed reads every file through `engine.checkpoint_engine.load`, which unpickles without
    restriction; for this call it reads through `load_file(path, map_location)` instead (the
    caller passes the weights-only reader), so a planted payload cannot run on resume.
    """
    check_zero_layout(Path(ckpt_dir) / tag, engine.zero_optimization_stage())
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
