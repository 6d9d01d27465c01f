"""Graceful preemption: SIGUSR1/SIGTERM -> finish the current step, checkpoint, exit 75.

SLURM sends SIGUSR1 ahead of the time limit (`#SBATCH --signal=B:USR1@300`, forwarded to the ranks
by the sbatch script) and SIGTERM on preemption/scancel. The handler only sets a flag; the trainer
reads it once per optimizer step, all-reduces it (ranks may receive the signal at different
moments, or only some of them) so every rank stops after the SAME step, saves a checkpoint, and
returns PREEMPTED_EXIT_CODE. Fine-tuning's validation also polls it between batches
(`StopPoll` below), so a signal during a long validation does not wait for its end.

The requeue decision is a file, not an exit code: after the checkpoint is committed rank 0 writes
the marker named by ALBEF_PREEMPT_MARKER (the sbatch scripts set
`RUN/checkpoints/.preempted.<job id>.<restart count>`), then all ranks pass a barrier and exit.
srun reports a task killed by a signal ahead of exit codes, and with `--kill-on-bad-exit` the
first rank to exit 75 gets the slower ones killed, so the script requeues when the marker of its
own job and restart exists, whatever srun returned.

Install the handler before the data loader starts its workers: forked workers inherit the Python
handler, so a signal sent to the whole process group only raises a flag in them instead of
killing them (SIGUSR1's default action is to terminate).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import FrameType

import torch
import torch.distributed as dist

from pipeline.runtime.exit_codes import PREEMPTED_EXIT_CODE
from pipeline.runtime.io import write_json_atomic

logger = logging.getLogger(__name__)


DEFAULT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
MARKER_ENV = "ALBEF_PREEMPT_MARKER"  # set by slurm/pretrain.sbatch and finetune.sbatch


class StopRequested(Exception):
    """Raised at a collective check point once the ranks agreed to stop (see `StopPoll`)."""


class PreemptionHandler:
    """Records that a stop signal arrived; use as a context manager to restore previous handlers."""

    def __init__(self, signals: tuple[signal.Signals, ...] = DEFAULT_SIGNALS) -> None:
        self.signals = signals
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = self.received is None
        self.received = signal.Signals(signum)
        if first:
            logger.warning(
                "received %s: will checkpoint after the current step and exit %d",
                self.received.name,
                PREEMPTED_EXIT_CODE,
            )

    def install(self) -> PreemptionHandler:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]
        self._previous.clear()

    def __enter__(self) -> PreemptionHandler:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()


def marker_path(env: Mapping[str, str] | None = None) -> Path | None:
    """The preemption marker to write after the save, from ALBEF_PREEMPT_MARKER (None: none)."""
    value = (os.environ if env is None else env).get(MARKER_ENV, "").strip()
    return Path(value) if value else None


def write_marker(path: Path, step: int, received: signal.Signals | None) -> None:
    """Atomically write the marker (rank 0, after the checkpoint of `step` is committed)."""
    name = received.name if received is not None else None
    write_json_atomic(path, {"step": step, "signal": name, "time": time.time()})
    logger.info("wrote preemption marker %s", path)


class StopPoll:
    """Lets collective work that runs longer than a step (fine-tuning validation) see a stop signal.

    `local()` is this rank's flag, cheap, for places where ranks are not in lockstep (e.g. to skip
    remaining work); `check()` is collective (all ranks must call it at the same point): it
    all-reduces the flags and raises StopRequested on every rank once any rank has one.
    """

    def __init__(self, handler: PreemptionHandler, device: torch.device, world_size: int) -> None:
        self.handler, self.device, self.world_size = handler, device, world_size

    def local(self) -> bool:
        return self.handler.requested

    def check(self) -> None:
        flag = torch.tensor([float(self.handler.requested)], device=self.device)
        if dist.is_initialized() and self.world_size > 1:
            dist.all_reduce(flag)
        if flag.item() > 0:
            raise StopRequested("stop requested")


_active_poll: StopPoll | None = None


@contextlib.contextmanager
def polling(poll: StopPoll) -> Iterator[StopPoll]:
    """Make `poll` the one `check_stop`/`stop_requested_here` consult while the block runs.

    The evaluation code is shared with `albef evaluate retrieval`, which installs no poll: there
    both functions are no-ops.
    """
    global _active_poll
    previous, _active_poll = _active_poll, poll
    try:
        yield poll
    finally:
        _active_poll = previous


def check_stop() -> None:
    """Collective stop check of the active poll (no-op without one); raises StopRequested."""
    if _active_poll is not None:
        _active_poll.check()


def stop_requested_here() -> bool:
    """This rank's flag under the active poll (False without one); not collective."""
    return _active_poll is not None and _active_poll.local()
