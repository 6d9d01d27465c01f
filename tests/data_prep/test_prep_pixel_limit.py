"""Decompression bombs: an image over --max_pixels fails on its header, in the img2dataset child.

img2dataset decodes with cv2.imdecode and checks its own `max_image_area` only after decoding;
prep hands `--max_pixels` to OpenCV's header check (OPENCV_IO_MAX_IMAGE_PIXELS) instead. The bomb
here is a real PNG: 30000x30000 grey, ~875 KB, 900 MB once decoded, under OpenCV's 2^30 default.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from data_prep.http_server import FolderServer
from data_prep.img2ds import MAX_PIXELS_ENV, child_env
from data_prep.manifest import MAX_PIXELS_REASON

from prep_testutils import read_samples, write_png_bomb

REPO_ROOT = Path(__file__).resolve().parents[2]
BOMB_SIDE = 30_000
MARGIN_MB = 450  # allowed growth of a child over a process that just imported img2dataset; the bomb needs 900
OPTIONS = {"image_size": 32, "processes": 1, "threads": 2, "samples_per_shard": 10, "retries": 0, "timeout": 20}

# Runs prep in a fresh process so RUSAGE_CHILDREN covers exactly this run's img2dataset child and
# its workers; the baseline is this process's peak after importing img2dataset (as every child does).
MEASURE = """
import json, os, resource, sys
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
import img2dataset  # noqa: F401
baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
from data_prep.prep import prepare
prepare("cc3m", sys.argv[1], sys.argv[2], **json.loads(sys.argv[3]))
children_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
open(sys.argv[4], "w").write(json.dumps({"baseline_kb": baseline_kb, "children_kb": children_kb}))
"""


def test_child_env_carries_the_limit() -> None:
    env = child_env(12345)
    assert env[MAX_PIXELS_ENV] == "12345" and str(REPO_ROOT) in env["PYTHONPATH"].split(os.pathsep)


@pytest.mark.slow
def test_decompression_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    assert write_png_bomb(media / "bomb.png", BOMB_SIDE, BOMB_SIDE) < 1_000_000
    Image.new("RGB", (4000, 3000), (200, 30, 30)).save(media / "photo.jpg")  # 12 MPixel: a real photo passes
    Image.new("RGB", (64, 48), (30, 200, 30)).save(media / "small.jpg")
    out, usage_path = tmp_path / "out", tmp_path / "usage.json"
    with FolderServer(media) as srv:
        urls = [srv.url(n) for n in ("photo.jpg", "bomb.png", "small.jpg")]
        tsv = tmp_path / "cc3m.tsv"
        tsv.write_text("".join(f"image {i}\t{u}\n" for i, u in enumerate(urls)))
        cmd = [sys.executable, "-c", MEASURE, str(tsv), str(out), json.dumps(OPTIONS), str(usage_path)]
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert srv.request_count("/bomb.png") == 1

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["failures"] == {MAX_PIXELS_REASON: 1} and manifest["complete"] is True
    assert manifest["settings"]["max_pixels"] == Image.MAX_IMAGE_PIXELS
    assert sorted(s.meta["url"] for s in read_samples(out)) == sorted([urls[0], urls[2]])
    usage = json.loads(usage_path.read_text())
    grown_mb = (usage["children_kb"] - usage["baseline_kb"]) / 1024
    assert grown_mb < MARGIN_MB, f"a child peaked {grown_mb:.0f} MB above an idle img2dataset process: {usage}"
