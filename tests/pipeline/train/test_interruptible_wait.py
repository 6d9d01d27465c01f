"""The trainer's wait for a batch honours stop signals: a batch that still comes within the grace
period is returned (the normal preemption path checkpoints after the step), a loader that never
yields is abandoned `grace_s` after the signal, even through `except Exception` skip handlers."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from pipeline.runtime.preemption import PreemptionHandler
from pipeline.train.trainer import DataWaitInterrupted, InterruptibleBatches


def _send_later(sig: signal.Signals, delay: float) -> None:
    threading.Timer(delay, os.kill, (os.getpid(), sig)).start()


def _skipping_forever() -> Iterator[dict]:
    """A loader whose every sample is bad: its handler swallows every Exception and goes on."""
    while True:
        try:
            time.sleep(0.01)
            raise OSError("cannot identify image file")
        except Exception:  # noqa: BLE001 - what the decode stage does with a bad image
            continue
    yield {}  # never reached


def _slow_batches(delay: float) -> Iterator[dict]:
    while True:
        time.sleep(delay)
        yield {"ok": True}


def test_a_loader_that_never_yields_is_abandoned_after_the_grace() -> None:
    alarm_before = signal.getsignal(signal.SIGALRM)
    with PreemptionHandler() as stop:
        batches = InterruptibleBatches(_skipping_forever(), stop.signals, lambda: stop.requested, grace_s=0.5)
        _send_later(signal.SIGTERM, 0.3)
        t0 = time.perf_counter()
        with pytest.raises(DataWaitInterrupted, match="no batch 0.5 s after the stop signal"):
            next(batches)
        assert 0.7 < time.perf_counter() - t0 < 5.0 and stop.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGALRM) == alarm_before  # put back


def test_a_batch_within_the_grace_is_returned_and_the_flag_kept() -> None:
    with PreemptionHandler() as stop:
        batches = InterruptibleBatches(_slow_batches(0.6), stop.signals, lambda: stop.requested, grace_s=5.0)
        _send_later(signal.SIGUSR1, 0.2)
        assert next(batches) == {"ok": True}  # the step can complete and the loop checkpoint
        assert stop.received == signal.SIGUSR1
        assert signal.getsignal(signal.SIGUSR1) == stop._handle


def test_a_signal_before_the_wait_bounds_it_too() -> None:
    with PreemptionHandler() as stop:
        os.kill(os.getpid(), signal.SIGUSR1)  # e.g. during the previous forward
        batches = InterruptibleBatches(_skipping_forever(), stop.signals, lambda: stop.requested, grace_s=0.3)
        with pytest.raises(DataWaitInterrupted):
            next(batches)
