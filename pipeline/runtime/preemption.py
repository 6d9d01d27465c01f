"""Graceful preemption: SIGUSR1/SIGTERM -> finish the current step, checkpoint, exit 75.

SLURM sends SIGUSR1 ahead of the time limit (`#SBATCH --signal=USR1@120`) and SIGTERM on
preemption/scancel. The handler only sets a flag; the trainer reads it once per optimizer step,
all-reduces it (ranks may receive the signal at different moments, or only some of them) so every
rank stops after the SAME step, saves a checkpoint and returns PREEMPTED_EXIT_CODE. The sbatch
template requeues on that code and the next run resumes from `latest` (`--resume auto`).

Install the handler before the data loader starts its workers: forked workers inherit the Python
handler, so a signal sent to the whole process group only raises a flag in them instead of
killing them (SIGUSR1's default action is to terminate).
"""

from __future__ import annotations

import logging
import signal
from types import FrameType

from pipeline.runtime.exit_codes import PREEMPTED_EXIT_CODE

logger = logging.getLogger(__name__)


DEFAULT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


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
