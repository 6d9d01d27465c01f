"""Interrupting `albef prep` and re-running it: finished shards are not fetched again.

The first run goes through the real CLI in its own process group and is killed (SIGKILL, like a
lost node) as soon as the first shard's stats file appears; the server answers slowly so the
run cannot finish before that. The server counts requests per path, which is the proof.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from data_prep.errors import PrepError
from data_prep.http_server import FolderServer
from data_prep.prep import prepare
from data_prep.records import url_image_id

from prep_testutils import check_output

REPO_ROOT = Path(__file__).resolve().parents[2]
N_IMAGES, PER_SHARD = 16, 4
OPTIONS = {"image_size": 32, "processes": 1, "threads": 1, "samples_per_shard": PER_SHARD, "retries": 0, "timeout": 10}


def _start_cli(tsv: Path, out: Path) -> subprocess.Popen:
    flags = [f"--{k}={v}" for k, v in OPTIONS.items()]
    cmd = [sys.executable, "-m", "pipeline.cli", "prep", "cc3m", f"--input={tsv}", f"--output={out}", *flags]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_after_first_shard(proc: subprocess.Popen, shards: Path, limit_s: float = 240) -> None:
    deadline = time.monotonic() + limit_s
    while not (shards / "00000_stats.json").exists():
        if proc.poll() is not None:
            pytest.fail(f"prep ended (code {proc.returncode}) before the first shard: {proc.stderr.read().decode()}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("no shard finished in time")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI, img2dataset's runner, its workers and logger
    proc.wait()
    time.sleep(0.5)  # let the kernel reap the group before we look at the files


@pytest.mark.slow
def test_prep_interrupted_run_resumes_without_refetching(tmp_path: Path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    for i in range(N_IMAGES):
        Image.new("RGB", (48, 40), (15 * i, 100, 200 - 10 * i)).save(media / f"r{i:02d}.jpg")
    out = tmp_path / "out"
    with FolderServer(media, delay_s=0.25) as srv:
        urls = [srv.url(f"r{i:02d}.jpg") for i in range(N_IMAGES)]
        tsv = tmp_path / "cc3m.tsv"
        tsv.write_text("".join(f"picture number {i}\t{u}\n" for i, u in enumerate(urls)))

        proc = _start_cli(tsv, out)
        _kill_after_first_shard(proc, out / "shards")
        done = sorted(int(p.name[:5]) for p in (out / "shards").glob("*_stats.json"))
        assert 0 in done and len(done) < N_IMAGES // PER_SHARD, f"the kill came too late to test resuming: {done}"
        assert not (out / "manifest.json").exists()
        first_counts = srv.request_counts()

        srv.set_delay(0.0)
        manifest = prepare("cc3m", tsv, out, **OPTIONS)

        done_urls = [u for k in done for u in urls[k * PER_SHARD : (k + 1) * PER_SHARD]]
        for url in urls:
            path = "/" + url.split("/", 3)[3]
            if url in done_urls:
                assert first_counts.get(path) == 1 and srv.request_count(path) == 1, f"{path} fetched again"
            else:
                assert srv.request_count(path) >= 1, f"{path} never fetched"
        expected = {url_image_id(u): [f"picture number {i}"] for i, u in enumerate(urls)}
        check_output(out, manifest, expected=expected, failures={}, skipped={}, input_rows=N_IMAGES, source="cc3m")
        assert [s["samples"] for s in manifest["shards"]] == [PER_SHARD] * (N_IMAGES // PER_SHARD)

        # A complete output: re-running rebuilds the manifest and downloads nothing.
        before = srv.request_counts()
        again = prepare("cc3m", tsv, out, **OPTIONS)
        assert srv.request_counts() == before
        assert {k: again[k] for k in ("shards", "num_samples", "failures")} == {
            k: manifest[k] for k in ("shards", "num_samples", "failures")
        }

    # Resuming with settings that would change the shards is refused, not mixed in.
    with pytest.raises(PrepError, match="different input list or different shard settings"):
        prepare("cc3m", tsv, out, **{**OPTIONS, "image_size": 64})
    shutil.copy(tsv, tmp_path / "other.tsv")
    with open(tmp_path / "other.tsv", "a") as f:
        f.write("one more\thttp://127.0.0.1:9/x.jpg\n")
    with pytest.raises(PrepError, match="different input list"):
        prepare("cc3m", tmp_path / "other.tsv", out, **OPTIONS)


def test_prep_broken_stats_file_is_redone(tmp_path: Path) -> None:
    """A stats file cut short (kill during its write) must not mark its shard finished."""
    from data_prep.prep import _drop_broken_shards

    shards = tmp_path / "shards"
    shards.mkdir()
    for name in ("00000.tar", "00000.parquet", "00001.tar", "00001.parquet", "00002.parquet"):
        (shards / name).write_bytes(b"")
    (shards / "00000_stats.json").write_text('{"count": 4, "successes": 4}')
    (shards / "00001_stats.json").write_text('{"count": 4, "succ')  # truncated
    (shards / "00002_stats.json").write_text("{}")  # its tar is missing
    (shards / "manifest.json").write_text("{}")  # would crash img2dataset's incremental mode
    _drop_broken_shards(shards)
    assert sorted(p.name for p in shards.glob("*.json")) == ["00000_stats.json"]
