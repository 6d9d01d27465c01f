"""A real one-node SLURM for the tests: started once per session by slurm/local_cluster.sh.

The script installs the Debian packages when they are missing (root + apt), writes its own
slurm.conf under ALBEF_SLURM_DIR, and starts only what is not already running; teardown stops
exactly the daemons this session's start launched. Client commands find the cluster through
SLURM_CONF, which the fixture sets for the whole session (and jobs inherit with --export=ALL).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = REPO_ROOT / "slurm" / "local_cluster.sh"
# The chain tests reuse the pipeline tests' helpers (pipeline_testutils: tiny checkpoints, CLI runs). pytest
# puts tests/pipeline on sys.path only when a test there is collected, so a run of tests/slurm alone adds it.
if str(REPO_ROOT / "tests" / "pipeline") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "tests" / "pipeline"))


@dataclass(frozen=True)
class LocalCluster:
    slurm_conf: str
    started: tuple[str, ...]  # daemons this session launched (and will stop)
    startup_s: float  # wall time of `local_cluster.sh start`, installation included


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[LocalCluster]:
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(CLUSTER_SCRIPT), "start"], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"local SLURM cluster did not start (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    conf = re.search(r"^export SLURM_CONF=(.+)$", proc.stdout, re.M)
    started = re.search(r"^started:(.*)$", proc.stdout, re.M)
    assert conf and started, f"unexpected output of {CLUSTER_SCRIPT} start:\n{proc.stdout}"
    cluster = LocalCluster(conf.group(1).strip(), tuple(started.group(1).split()), time.monotonic() - t0)
    print(f"\nlocal SLURM: {cluster.startup_s:.1f} s to an idle node, started {cluster.started or 'nothing'}")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = cluster.slurm_conf
    try:
        yield cluster
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        if cluster.started:
            subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop", *cluster.started], timeout=120, check=False)
