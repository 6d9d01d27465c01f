"""All samples bad: `albef pretrain` (a real process, one loader worker) must not hang.

- with the default `data.max_consecutive_bad_samples` it fails: exit 1, one line naming the field
  and the shards;
- with a limit too high to reach, SIGTERM while the loader skips still ends it (exit 75, once no
  batch came within the trainer's grace period);
- SIGKILL of the trainer leaves no loader worker behind (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import webdataset as wds

from pipeline.runtime.exit_codes import FAILED_EXIT_CODE, PREEMPTED_EXIT_CODE

from pipeline_testutils import REPO_ROOT, pretrain_cmd, rank_env

pytestmark = [pytest.mark.slow]

HUGE = "--data.max_consecutive_bad_samples=1000000000"


@pytest.fixture(scope="module")
def all_bad(tmp_path_factory) -> Path:
    """A prep folder whose 2 shards x 16 samples all hold undecodable images."""
    root = tmp_path_factory.mktemp("all_bad")
    (root / "shards").mkdir()
    entries = []
    for i in range(2):
        with wds.TarWriter(str(root / "shards" / f"{i:05d}.tar")) as sink:
            for k in range(16):
                meta = {"captions": [f"a red square number {k}"], "image_id": f"{i}-{k}", "status": "success"}
                sink.write(
                    {"__key__": f"{i:05d}{k:04d}", "jpg": b"\xff\xd8 not a jpeg", "json": json.dumps(meta).encode()}
                )
        entries.append({"path": f"shards/{i:05d}.tar", "samples": 16})
    manifest = {"format_version": 1, "source": "all_bad", "split": "train", "shards": entries}
    (root / "manifest.json").write_text(json.dumps({**manifest, "num_samples": 32, "num_captions": 32}))
    return root


def _start(tmp_path: Path, data: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / "train.log"
    cmd = pretrain_cmd(tmp_path / "run", data, "--model.image_res=32", "--data.num_workers=1", *extra)
    env = rank_env(0, 1, 0)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key)
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=fh, stderr=subprocess.STDOUT)
    return proc, log


def _wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while text not in log.read_text():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"never saw {text!r} (rc {proc.poll()}):\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        out |= {int(c) for c in (task / "children").read_text().split()}
    return out


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper that never comes in a container counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_all_bad_samples_fail_with_the_field_and_the_shards(tmp_path: Path, all_bad: Path) -> None:
    proc, log = _start(tmp_path, all_bad)
    assert proc.wait(timeout=300) == FAILED_EXIT_CODE, log.read_text()[-3000:]
    text = log.read_text()
    errors = [line for line in text.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in text, text[-3000:]
    assert "data.max_consecutive_bad_samples: 1001 samples in a row" in errors[0]
    assert str(all_bad / "shards" / "00000.tar") in errors[0] or str(all_bad / "shards" / "00001.tar") in errors[0]


def test_sigterm_is_honoured_while_the_loader_skips(tmp_path: Path, all_bad: Path) -> None:
    proc, log = _start(tmp_path, all_bad, HUGE)
    _wait_for(log, "skipped (bad_image", proc)
    time.sleep(1.0)  # well inside the endless search for a good sample
    proc.send_signal(signal.SIGTERM)
    t0 = time.time()
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"SIGTERM ignored while skipping:\n{log.read_text()[-3000:]}")
    assert code == PREEMPTED_EXIT_CODE, log.read_text()[-3000:]
    assert time.time() - t0 < 45  # the 10 s grace for a batch, then the worker shutdown
    assert "no batch 10 s after the stop signal: the loader is still searching" in log.read_text()


def test_sigkill_of_the_trainer_leaves_no_loader_worker(tmp_path: Path, all_bad: Path) -> None:
    proc, log = _start(tmp_path, all_bad, HUGE)
    _wait_for(log, "skipped (bad_image", proc)
    workers = _children(proc.pid)
    assert workers, "the loader worker should be a child of the trainer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.time() + 20
    while any(_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.2)
    orphans = [w for w in workers if _alive(w)]
    for w in orphans:  # do not leave them spinning if the test fails
        os.kill(w, signal.SIGKILL)
    assert not orphans, f"orphaned loader workers {orphans}"
