"""Running img2dataset: its input parquet, its arguments, and a child process that isolates it.

Facts about img2dataset 1.47.0 this module is built on (checked by experiment, see the tests):
- `img2dataset.download` starts its workers and its logger with the multiprocessing *spawn*
  context, which re-imports the caller's `__main__` in every child: called from an unguarded
  script it re-runs that script in each child. It also replaces the SIGINT handler with one that
  calls `sys.exit(0)`, and prints progress to stdout. So we never call it in the caller's process:
  `python -m data_prep.img2ds ARGS_JSON` runs it in a child whose `__main__` is this guarded
  module (and whose signal handlers and prints are its own).
- Importing img2dataset imports albumentations, which phones home for updates unless
  NO_ALBUMENTATIONS_UPDATE=1, and wandb (kept off); each spawned process pays ~5 s of imports.
- A parquet `list<string>` column named in `save_additional_columns` reaches each sample's json
  as a JSON list, so `captions` needs no string round trip; `caption_col` becomes `key.txt`.
- Incremental mode takes every `*.json` in the output folder as a finished shard (the number
  before the first `_`), so nothing of ours may live in that folder.
- Shard k holds input rows [k*N, (k+1)*N) of the parquet, in order; `file://` URLs work, bare
  paths fail ("unknown url type"); truncated or non-image files fail as "Image decoding error".
  urllib fetches whatever scheme it is given (file:// included), so the rows must be trusted:
  `data_prep.records` lets only http(s) through from lists and builds file:// URLs itself.
- Decoding is `cv2.imdecode` (the resizer); its `max_image_area` is checked only *after* the
  decode, too late for a decompression bomb (a 875 KB PNG declaring 30000x30000 costs ~1.7 GB).
  OpenCV's own limit, the environment variable OPENCV_IO_MAX_IMAGE_PIXELS (read once when cv2 is
  loaded; default 2^30), is checked on the header before any pixel buffer exists, and the resizer
  reports its cv2.error as the failure ("... pixels <= CV_IO_MAX_IMAGE_PIXELS ..."). So the child
  and its spawned workers get `--max_pixels` in that variable (`child_env`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.options import PrepOptions
from data_prep.records import ImageRow

logger = logging.getLogger(__name__)

CHILD_ENV = {"NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled", "WANDB_SILENT": "true"}
FINGERPRINT_KEY = b"albef_prep_fingerprint"
ADDITIONAL_COLUMNS = ["captions", "image_id"]
# Options that change what lands in the shards: resuming with different values would mix them.
SHARD_DEFINING = ("samples_per_shard", "image_size", "resize_mode", "resize_only_if_bigger", "encode_quality",
                  "min_image_size", "extract_exif", "max_pixels")  # fmt: skip
MAX_PIXELS_ENV = "OPENCV_IO_MAX_IMAGE_PIXELS"


def rows_fingerprint(rows: list[ImageRow], opts: PrepOptions) -> str:
    """Hash of the rows (in order) and the shard-defining options: equal iff a resume is safe."""
    h = hashlib.sha256()
    h.update(json.dumps({k: getattr(opts, k) for k in SHARD_DEFINING}, sort_keys=True).encode())
    for row in rows:
        fields: list = [row.url, row.captions, row.image_id]
        if row.extra is not None:  # absent for caption-only sources: their fingerprints stay as they were
            fields.append(row.extra)
        h.update(json.dumps(fields, sort_keys=True).encode())
        h.update(b"\n")
    return h.hexdigest()


def extra_columns(rows: list[ImageRow]) -> list[str]:
    """Names of the rows' per-caption annotation columns (`ImageRow.extra`); every row has the same."""
    names = sorted(rows[0].extra or {}) if rows else []
    for row in rows:
        if sorted(row.extra or {}) != names:
            raise ValueError(f"rows disagree on their extra columns: {names} vs {sorted(row.extra or {})}")
    return names


def write_input_parquet(rows: list[ImageRow], path: Path, fingerprint: str) -> None:
    """Write img2dataset's input (url, caption = first caption, captions, image_id, extra columns) atomically."""
    columns = {
        "url": pa.array([r.url for r in rows], pa.string()),
        "caption": pa.array([r.captions[0] for r in rows], pa.string()),
        "captions": pa.array([r.captions for r in rows], pa.list_(pa.string())),
        "image_id": pa.array([r.image_id for r in rows], pa.string()),
    }
    for name in extra_columns(rows):
        columns[name] = pa.array([(r.extra or {})[name] for r in rows])  # e.g. list<string> per image
    table = pa.table(columns).replace_schema_metadata({FINGERPRINT_KEY: fingerprint.encode()})
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def read_fingerprint(path: Path) -> str | None:
    if not path.is_file():
        return None
    metadata = pq.read_schema(path).metadata or {}
    value = metadata.get(FINGERPRINT_KEY)
    return value.decode() if value is not None else None


def download_kwargs(
    opts: PrepOptions, input_parquet: Path, shards_dir: Path, extra: list[str] | None = None
) -> dict[str, Any]:
    """Arguments of `img2dataset.download` for our options (webdataset, incremental, wandb off);
    `extra` names the input's per-caption annotation columns, saved into each sample's json."""
    return {
        "url_list": str(input_parquet),
        "input_format": "parquet",
        "url_col": "url",
        "caption_col": "caption",
        "save_additional_columns": list(ADDITIONAL_COLUMNS) + list(extra or ()),
        "output_folder": str(shards_dir),
        "output_format": "webdataset",
        "incremental_mode": "incremental",
        "image_size": opts.image_size,
        "resize_mode": opts.resize_mode,
        "resize_only_if_bigger": opts.resize_only_if_bigger,
        "encode_quality": opts.encode_quality,
        "encode_format": "jpg",
        "processes_count": opts.processes,
        "thread_count": opts.threads,
        "number_sample_per_shard": opts.samples_per_shard,
        "retries": opts.retries,
        "timeout": opts.timeout,
        "min_image_size": opts.min_image_size,
        "extract_exif": opts.extract_exif,
        "user_agent_token": opts.user_agent_token,
        "enable_wandb": False,
        "distributor": "multiprocessing",
    }


def child_env(max_pixels: int) -> dict[str, str]:
    """Environment of the img2dataset child: ours on top of the caller's (module docstring)."""
    env = {**os.environ, **CHILD_ENV, MAX_PIXELS_ENV: str(max_pixels)}
    package_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return env


def run_img2dataset(kwargs: dict[str, Any], max_pixels: int) -> int:
    """Run `img2dataset.download(**kwargs)` in a child process; returns the child's exit code.

    Images over `max_pixels` (width*height) fail on their header, before decoding. The child
    stays in our process group, so Ctrl-C (or killing the group) reaches it and its spawned
    workers at once; if we are interrupted otherwise, the child is terminated.
    """
    env = child_env(max_pixels)
    cmd = [sys.executable, "-m", "data_prep.img2ds", json.dumps(kwargs)]
    proc = subprocess.Popen(cmd, env=env)
    try:
        return proc.wait()
    except BaseException:
        logger.warning("interrupted: stopping img2dataset (pid %d)", proc.pid)
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise


def _child_main(argv: list[str]) -> int:
    os.environ.update(CHILD_ENV)  # before the import: albumentations checks it at import time
    if MAX_PIXELS_ENV not in os.environ or "cv2" in sys.modules:
        raise RuntimeError(f"run through run_img2dataset: {MAX_PIXELS_ENV} must be set before cv2 loads")
    import img2dataset

    img2dataset.download(**json.loads(argv[1]))
    return 0


if __name__ == "__main__":  # spawned workers import this module as __mp_main__ and skip this
    sys.exit(_child_main(sys.argv))
