"""Helpers shared by the SLURM tests (reading job states and job logs)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path


def job_fields(job_id: str) -> list[dict[str, str]]:
    """`scontrol show job -o ID` as dicts (one per array task)."""
    from pipeline.slurm.submit import parse_scontrol_line

    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True)
    return [parse_scontrol_line(line) for line in out.stdout.splitlines() if line.strip()]


def wait_for_file_text(path: Path, text: str, timeout_s: float) -> None:
    """Poll a job's log until `text` appears (jobs write it; the test must not sleep blindly)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.2)
    content = path.read_text(errors="replace")[-3000:] if path.exists() else "(no file)"
    raise AssertionError(f"{text!r} not in {path} after {timeout_s:.0f} s:\n{content}")
