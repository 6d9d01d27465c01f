"""Typed, validated options of `albef prep` (defaults <- command-line flags).

Fire hands `run_prep` whatever flags the user typed, so this is where a typo (`--imagesize`), a
flag that means nothing for the chosen source (`--regions` with cc3m), a missing required flag or a
bad value becomes a clear error naming the flag, before anything is read or downloaded.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from data_prep.errors import PrepOptionsError

SOURCES = ("cc3m", "cc12m", "sbu", "coco", "vg", "flickr30k", "generic", "snli_ve", "vqa", "nlvr2", "refcoco+")
SPLITS = ("train", "val", "test")
RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")
GENERIC_FORMATS = ("parquet", "tsv", "csv", "json", "jsonl")
# PIL's Image.MAX_IMAGE_PIXELS (89.5 MPixel, ~270 MB decoded as RGB): a 48 MPixel camera photo
# passes, a decompression bomb (a small file declaring e.g. 30000x30000) does not.
DEFAULT_MAX_PIXELS = 89_478_485


def _default_processes() -> int:
    return max(1, min(16, os.cpu_count() or 1))


@dataclass(frozen=True)
class PrepOptions:
    """Every flag of `albef prep` except SOURCE/--input/--output. Units in the comments."""

    # --- what to read (source-specific; see SOURCE_OPTIONS) ---
    split: str | None = (
        None  # train|val|test. coco/flickr30k: the Karpathy split (coco train = train+restval); else a label
    )
    image_root: str | None = (
        None  # coco/flickr30k/generic/snli_ve/vqa/nlvr2/refcoco+: local folder (-> file:// URLs, names must stay inside) or http(s) base URL
    )
    regions: str | None = None  # vg: path of region_descriptions.json (--input is image_data.json)
    exclude: str | None = None  # vg: file of image ids to drop, one per line; "coco:ID" matches image_data's coco_id
    min_region_size: int = 32  # vg: pixels; regions whose shorter side is smaller are dropped
    refs: str | None = None  # refcoco+: REFER `refs(unc).p` (GT box + split of each ref; val/test)
    instances: str | None = None  # refcoco+: COCO-style `instances.json` of REFER (boxes, image sizes)
    dets: str | None = None  # refcoco+: `dets.json` detection proposals per image id (val/test)
    captions_file: str | None = None  # sbu txt pair: captions .txt (default: --input with "urls" -> "captions")
    url_col: str = "url"  # generic: URL column
    caption_col: str = "caption"  # generic: caption column (str or list of str per row)
    id_col: str | None = None  # generic: image-id column (default: derived from the URL)
    input_format: str | None = None  # generic: parquet|tsv|csv|json|jsonl (default: from the file extension)
    duplicate_urls: str = "skip"  # one-caption-per-row sources: skip a repeated URL, or "merge" its captions
    annotations: str | None = None  # vqa: v2_mscoco_*_annotations.json (--input is the questions json)
    answer_list: str | None = None  # vqa: official answer_list.json to copy beside the shards
    num_answers: int = 3128  # vqa: candidate answers kept when building the list from this split (paper: 3,128)
    # --- how img2dataset downloads and writes ---
    image_size: int = 384  # pixels (shorter side with keep_ratio); 384 keeps fine-tuning resolution
    resize_mode: str = "keep_ratio"  # img2dataset resize mode
    resize_only_if_bigger: bool = True  # never upscale small images
    encode_quality: int = 95  # JPEG quality of the re-encoded images
    processes: int = field(default_factory=_default_processes)  # download processes
    threads: int = 64  # download threads per process
    samples_per_shard: int = 10000  # input rows per shard (a shard holds the successes among them)
    retries: int = 2  # extra download attempts per URL
    timeout: int = 10  # seconds per download attempt
    min_image_size: int = 0  # pixels; smaller images are dropped as failures ("image too small")
    max_pixels: int = DEFAULT_MAX_PIXELS  # width*height; larger images fail before decoding (decompression bombs)
    extract_exif: bool = False  # EXIF in each sample's json (off: ALBEF does not use it)
    user_agent_token: str | None = None  # identifies the crawler in the User-Agent header
    overwrite: bool = False  # delete existing shards first instead of resuming

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Options that only mean something for some sources. Any other option is common to all.
SOURCE_OPTIONS: dict[str, frozenset[str]] = {
    "cc3m": frozenset({"duplicate_urls"}),
    "cc12m": frozenset({"duplicate_urls"}),
    "sbu": frozenset({"duplicate_urls", "captions_file"}),
    "coco": frozenset({"image_root"}),
    "vg": frozenset({"regions", "exclude", "min_region_size"}),
    "flickr30k": frozenset({"image_root"}),
    "generic": frozenset({"url_col", "caption_col", "id_col", "input_format", "duplicate_urls", "image_root"}),
    "snli_ve": frozenset({"image_root"}),
    "vqa": frozenset({"image_root", "annotations", "answer_list", "num_answers"}),
    "nlvr2": frozenset({"image_root"}),
    "refcoco+": frozenset({"image_root", "refs", "instances", "dets"}),
}
_SPECIFIC = frozenset().union(*SOURCE_OPTIONS.values())
_REQUIRED: dict[str, tuple[str, ...]] = {
    "coco": ("split",),
    "vg": ("regions",),
    "flickr30k": ("split", "image_root"),
    "snli_ve": ("image_root",),
    "vqa": ("image_root",),
    "nlvr2": ("image_root",),
    "refcoco+": ("image_root", "split"),
}
_CHOICES: dict[str, tuple[str, ...]] = {
    "split": SPLITS,
    "resize_mode": RESIZE_MODES,
    "input_format": GENERIC_FORMATS,
    "duplicate_urls": ("skip", "merge"),
}
_MINIMUM: dict[str, int] = {
    "image_size": 1, "processes": 1, "threads": 1, "samples_per_shard": 1, "retries": 0, "timeout": 1,
    "min_region_size": 0, "min_image_size": 0, "encode_quality": 0, "max_pixels": 1, "num_answers": 1,
}  # fmt: skip


def _coerce(name: str, value: Any, annotation: str) -> Any:
    """Convert a flag value to the field's type; Fire already parsed numbers and booleans."""
    kinds = set(annotation.replace(" ", "").split("|"))
    if value is None and "None" in kinds:
        return None
    if "bool" in kinds:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise PrepOptionsError(f"--{name} must be true or false, got {value!r}")
    if "int" in kinds:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise PrepOptionsError(f"--{name} must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise PrepOptionsError(f"--{name} must be an integer, got {value!r}") from None
    if "str" in kinds:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return str(value)  # Fire turns `--url_col 0` into an int
        if not isinstance(value, str) or not value:
            raise PrepOptionsError(f"--{name} must be a non-empty string, got {value!r}")
        return value
    raise AssertionError(f"unhandled type {annotation} for {name}")


def parse_options(source: str, options: dict[str, Any]) -> PrepOptions:
    """Validate user options for `source` and fill in defaults.

    Raises:
        PrepOptionsError: unknown source or option, an option that does not apply to the source,
            a missing required option, or a bad value; the message names the flag.
    """
    if source not in SOURCES:
        raise PrepOptionsError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
    fields = {f.name: f for f in dataclasses.fields(PrepOptions)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        valid = ", ".join("--" + n for n in sorted(fields))
        raise PrepOptionsError(f"unknown option(s) {', '.join('--' + n for n in unknown)}; valid options: {valid}")
    foreign = sorted(n for n in options if n in _SPECIFIC and n not in SOURCE_OPTIONS[source])
    if foreign:
        raise PrepOptionsError(f"option(s) {', '.join('--' + n for n in foreign)} do not apply to source {source!r}")
    values = {n: _coerce(n, v, str(fields[n].type)) for n, v in options.items()}
    for name, choices in _CHOICES.items():
        if values.get(name) is not None and values[name] not in choices:
            raise PrepOptionsError(f"--{name} must be one of {', '.join(choices)}, got {values[name]!r}")
    for name, low in _MINIMUM.items():
        if name in values and values[name] < low:
            raise PrepOptionsError(f"--{name} must be >= {low}, got {values[name]}")
    if values.get("encode_quality", 95) > 100:
        raise PrepOptionsError(f"--encode_quality must be <= 100, got {values['encode_quality']}")
    missing = [n for n in _REQUIRED.get(source, ()) if values.get(n) is None]
    if missing:
        raise PrepOptionsError(f"source {source!r} needs {', '.join('--' + n for n in missing)}")
    return PrepOptions(**values)
