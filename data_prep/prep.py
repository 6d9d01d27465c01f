"""`albef prep SOURCE --input PATH --output DIR [...]`: native list -> img2dataset shards + manifest.

Layout of DIR (img2dataset owns `shards/`; our files stay beside it because its incremental mode
parses every *.json inside its folder):
    DIR/img2dataset_input.parquet   rows grouped per image (url, caption, captions, image_id[, the
                                    source's per-caption columns, e.g. snli_ve's labels])
    DIR/answer_list.json            vqa only: the candidate answers (data_prep/sources/vqa.py)
    DIR/shards/NNNNN.tar|.parquet|_stats.json
    DIR/pairs/NNNNN.tar              two-image sources (nlvr2): one sample per record, both images
                                    joined from shards/ (data_prep/pairs.py); the manifest lists these
    DIR/manifest.json
Re-running the same command on a partial DIR resumes: finished shards (those with a stats file)
are not downloaded again, and the manifest is rebuilt from everything on disk. Finished shards hold
their samples in key order (`data_prep.shard_order`), so one input list always gives the same shards.

Guarantees (each row that breaks one is skipped and counted in the manifest, never fatal):
- URLs from a list are http(s) only; a local file is read only when named relative to an explicit
  `--image_root` folder and resolving inside it (`data_prep.records`, `data_prep.image_root`);
- an image over `--max_pixels` (width*height, default PIL's 89.5M) fails on its header, before
  any pixel buffer is allocated (`data_prep.img2ds`), counted as "image larger than max_pixels";
- a text-list row that is not valid UTF-8 is skipped (`not_utf8`, with its line in
  `skipped_examples`); a whole-file JSON with a bad byte is an error naming the file and line.
Bad options, a malformed list or an --output that is not a folder exit with code 2 and one line
on stderr, before anything is written.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from data_prep.errors import PrepError, PrepInputError, PrepOptionsError
from data_prep.img2ds import (
    download_kwargs,
    extra_columns,
    read_fingerprint,
    rows_fingerprint,
    run_img2dataset,
    write_input_parquet,
)
from data_prep.manifest import MANIFEST_NAME, build_manifest, shard_name, write_json_atomic
from data_prep.options import PrepOptions, parse_options
from data_prep.pairs import join_pairs, pair_manifest
from data_prep.shard_order import sort_shards
from data_prep.sources import READERS, SIDE_FILES
from data_prep.sources.nlvr2 import PairRows

logger = logging.getLogger(__name__)

INPUT_PARQUET = "img2dataset_input.parquet"
SHARDS_DIR = "shards"
MANIFEST = MANIFEST_NAME


def run_prep(source: str, input: str | None = None, output: str | None = None, **options: Any) -> int:  # noqa: A002
    """CLI entry: run `prepare` and turn the outcome into an exit code.

    Returns:
        0 when every shard is finished; 1 when img2dataset left shards unfinished (re-run to
        resume); 2 for bad options or malformed input (the message names the flag or file:line).
        Rows skipped or images that failed to download never make the exit code non-zero.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        manifest = prepare(source, input, output, **options)
    except PrepError as err:  # one line on stderr (not also logged: the log handler writes there too)
        print(f"albef prep: error: {err}", file=sys.stderr)
        return 2
    return 0 if manifest["complete"] else 1


def prepare(source: str, input: str | Path | None, output: str | Path | None, **options: Any) -> dict[str, Any]:  # noqa: A002
    """Read the native list, run img2dataset (resuming), write and return the manifest.

    Raises:
        PrepOptionsError: unknown/inapplicable/missing option or bad value, or an --output that
            exists but is not a folder (checked before anything is read or written).
        PrepInputError: malformed input (message names the file and line), an --input that is
            missing or a folder, or no usable row.
        PrepError: the output folder holds shards made from another input or settings.
    """
    start = time.time()
    opts = parse_options(source, options)
    in_path, out_dir = _path_flag("input", input), _path_flag("output", output)
    _check_output_path(out_dir)
    rows = READERS[source](in_path, opts)
    logger.info(
        "%s: %d input rows -> %d images to download; skipped %s", source, rows.input_rows, len(rows.rows), rows.skipped
    )
    if not rows.rows:
        hint = "; list URLs must be http(s), local files need --image_root" if "bad_url_scheme" in rows.skipped else ""
        raise PrepInputError(str(in_path), f"no usable rows (skipped: {rows.skipped}){hint}")

    shards_dir = out_dir / SHARDS_DIR
    input_parquet = out_dir / INPUT_PARQUET
    fingerprint = rows_fingerprint(rows.rows, opts)
    _prepare_output(out_dir, shards_dir, input_parquet, fingerprint, opts.overwrite)
    write_input_parquet(rows.rows, input_parquet, fingerprint)
    if source in SIDE_FILES:  # e.g. vqa's answer_list.json
        SIDE_FILES[source](rows, opts, out_dir)

    expected_shards = math.ceil(len(rows.rows) / opts.samples_per_shard)
    unfinished = [k for k in range(expected_shards) if not (shards_dir / f"{shard_name(k)}_stats.json").is_file()]
    if unfinished:  # img2dataset would skip finished shards itself, but costs ~15 s of start-up
        kwargs = download_kwargs(opts, input_parquet.resolve(), shards_dir.resolve(), extra_columns(rows.rows))
        code = run_img2dataset(kwargs, opts.max_pixels)
        if code != 0:
            logger.error("img2dataset exited with code %d", code)
    else:
        logger.info("all %d shards are finished already; nothing to download", expected_shards)
    if shards_dir.is_dir():
        sort_shards(shards_dir)  # download order varies between runs; key order does not
    manifest = build_manifest(
        out_dir, shards_dir, source=source, split=opts.split, rows=rows, expected_shards=expected_shards,
        settings=_settings(source, in_path, opts), elapsed_s=time.time() - start,
    )  # fmt: skip
    if isinstance(rows, PairRows):  # two images per sample (nlvr2): join the downloaded images per record
        manifest = _join_pairs(out_dir, manifest, rows, opts)
    write_json_atomic(out_dir / MANIFEST, manifest)
    _log_summary(out_dir, manifest)
    return manifest


def _join_pairs(out_dir: Path, manifest: dict[str, Any], rows: PairRows, opts: PrepOptions) -> dict[str, Any]:
    """The pair manifest (data_prep/pairs.py); while downloads are unfinished it lists no shards, so
    nothing trains on a partial join (re-run to resume the downloads, then the join runs)."""
    if not manifest["complete"]:
        joined: dict[str, Any] = {"shards": [], "num_pairs": 0, "skipped": {}, "skipped_examples": {}}
    else:
        tars = [out_dir / s["path"] for s in manifest["shards"]]
        joined = join_pairs(out_dir, tars, rows.pairs, opts.samples_per_shard)
    return pair_manifest(manifest, joined)


def _path_flag(name: str, value: object) -> Path:
    """--input/--output as a Path; Fire hands `--output 2024` over as an int."""
    if value is None or value == "":
        raise PrepOptionsError(f"--{name} is required")
    if isinstance(value, bool) or not isinstance(value, (str, Path, int)):
        raise PrepOptionsError(f"--{name} must be a path, got {value!r}")
    return Path(str(value))


def _check_output_path(out_dir: Path) -> None:
    """--output must be a folder or creatable as one: not a file, nor below a file."""
    for path in (out_dir, *out_dir.parents):
        if path.is_dir():
            return
        if path.exists() or path.is_symlink():
            what = "is not a folder" if path == out_dir else f"cannot be created: {path} is not a folder"
            raise PrepOptionsError(f"--output {out_dir} {what}")


def _prepare_output(out_dir: Path, shards_dir: Path, input_parquet: Path, fingerprint: str, overwrite: bool) -> None:
    """Create DIR, or check that its finished shards came from this same input and settings."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # e.g. no permission; a file in the way was refused up front
        raise PrepError(f"--output {out_dir} cannot be created ({err.strerror})") from None
    if overwrite and shards_dir.exists():
        logger.info("--overwrite: removing %s", shards_dir)
        shutil.rmtree(shards_dir)
    _drop_broken_shards(shards_dir)
    if not any(shards_dir.glob("*_stats.json")):
        (out_dir / MANIFEST).unlink(missing_ok=True)  # it describes shards that are gone
        return
    if read_fingerprint(input_parquet) != fingerprint:
        raise PrepError(
            f"{shards_dir} holds shards made from a different input list or different shard settings "
            "(samples_per_shard, image_size, resize_mode, ...); re-run with the same ones to resume, "
            "or pass --overwrite true, or choose another --output"
        )
    logger.info("resuming: %d finished shards in %s", len(list(shards_dir.glob("*_stats.json"))), shards_dir)


def _drop_broken_shards(shards_dir: Path) -> None:
    """Make a shard whose stats file is unreadable or whose tar/parquet is gone count as unfinished.

    img2dataset would otherwise trust any *.json as "done" (e.g. a stats file cut short by a kill).
    """
    for stats in sorted(shards_dir.glob("*.json")):
        stem = stats.name.split("_")[0]
        ok = stats.name.endswith("_stats.json") and stem.isdigit()
        if ok:
            try:
                json.loads(stats.read_text())
            except (OSError, ValueError):
                ok = False
        ok = ok and (shards_dir / f"{stem}.tar").is_file() and (shards_dir / f"{stem}.parquet").is_file()
        if not ok:
            logger.warning("%s is not a finished shard's stats; that shard will be downloaded again", stats)
            stats.unlink()


def _settings(source: str, input: str | Path, opts: PrepOptions) -> dict[str, Any]:  # noqa: A002
    try:
        version = metadata.version("img2dataset")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {"source": source, "input": str(Path(input).resolve()), **opts.to_dict(), "img2dataset_version": version}


def _log_summary(out_dir: Path, manifest: dict[str, Any]) -> None:
    logger.info(
        "%s: %d samples (%d captions) in %d shards; failures %s; skipped %s",
        out_dir / MANIFEST, manifest["num_samples"], manifest["num_captions"], len(manifest["shards"]),
        manifest["failures"], manifest["skipped"],
    )  # fmt: skip
    if not manifest["complete"]:
        names = ", ".join(shard_name(s) for s in manifest["missing_shards"][:10])
        logger.error("unfinished shards (%s); re-run the same command to resume", names)
