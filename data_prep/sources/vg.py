"""Visual Genome: `image_data.json` (--input: image ids and URLs) + `region_descriptions.json` (--regions).

Each image's region phrases become its captions, after the filtering the ALBEF paper describes:
- phrases repeated within an image are dropped (compared case- and whitespace-insensitively; the
  first raw form is kept), counted as `duplicate_phrase`;
- regions whose shorter side is below `--min_region_size` pixels are dropped (`tiny_region`): such
  boxes describe a detail the whole-image sample cannot show;
- images listed in `--exclude` are dropped (`excluded`), e.g. COCO / RefCOCO+ evaluation images.
  The file holds one id per line: a VG image id, or `coco:<id>` matched against image_data's coco_id;
  a bad line there (not an id, not UTF-8) is an error, never skipped: a silently lost exclusion
  would leak evaluation images into training.
Image URLs must be http(s) (`data_prep.records`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_prep.errors import PrepInputError
from data_prep.options import PrepOptions
from data_prep.records import RowCollector, SourceRows, iter_text_lines, progress
from data_prep.sources._json import load_json, require_key


def read(path: Path, opts: PrepOptions) -> SourceRows:
    assert opts.regions is not None  # parse_options requires it for vg
    excluded_vg, excluded_coco = _read_exclusions(Path(opts.exclude)) if opts.exclude else (set(), set())
    images = load_json(path, "--input (image_data.json)")
    if not isinstance(images, list):
        raise PrepInputError(str(path), "expected a list of images (image_data.json)")
    regions_path = Path(opts.regions)
    regions_by_image = _regions_by_image(regions_path)
    collector = RowCollector()
    for i, image in enumerate(progress(images, f"reading {path.name}")):
        image_id = str(_image_id(path, i, image))
        url = require_key(path, i, image, "url")
        coco_id = image.get("coco_id")
        if image_id in excluded_vg or (coco_id is not None and str(coco_id) in excluded_coco):
            collector.skip_row("excluded", f"{path}: entry {i}")
            continue
        if image_id not in regions_by_image:
            collector.skip_row("no_regions", f"{path}: entry {i}")
            continue
        phrases = _filter_regions(regions_path, regions_by_image[image_id], opts.min_region_size, collector)
        collector.add(url, phrases, image_id, where=f"{path}: entry {i}")
    return collector.result()


def _image_id(path: Path, index: int, entry: Any) -> Any:
    # image_data.json v1.2 names it "image_id"; v1.0 named it "id".
    return require_key(path, index, entry, "image_id" if isinstance(entry, dict) and "image_id" in entry else "id")


def _regions_by_image(path: Path) -> dict[str, list[dict[str, Any]]]:
    data = load_json(path, "--regions (region_descriptions.json)")
    if not isinstance(data, list):
        raise PrepInputError(str(path), "expected a list of {'id', 'regions'} entries (region_descriptions.json)")
    out: dict[str, list[dict[str, Any]]] = {}
    for i, entry in enumerate(data):
        regions = require_key(path, i, entry, "regions")
        if not isinstance(regions, list):
            raise PrepInputError(f"{path}: entry {i}", "'regions' must be a list")
        if "id" in entry:
            image_id = entry["id"]
        elif regions:  # some releases leave the id out: every region carries it
            image_id = require_key(path, i, regions[0], "image_id", "first region of entry")
        else:
            continue
        out.setdefault(str(image_id), []).extend(regions)
    return out


def _filter_regions(path: Path, regions: list[dict[str, Any]], min_side: int, collector: RowCollector) -> list[str]:
    phrases: list[str] = []
    seen: set[str] = set()
    for region in regions:
        rid = region.get("region_id", "?") if isinstance(region, dict) else "?"
        width = require_key(path, rid, region, "width", "region")
        height = require_key(path, rid, region, "height", "region")
        phrase = require_key(path, rid, region, "phrase", "region")
        if min(width, height) < min_side:
            collector.skip("tiny_region")
            continue
        norm = " ".join(str(phrase).lower().split())
        if norm and norm in seen:
            collector.skip("duplicate_phrase")
            continue
        seen.add(norm)
        phrases.append(phrase)
    return phrases


def _read_exclusions(path: Path) -> tuple[set[str], set[str]]:
    vg_ids: set[str] = set()
    coco_ids: set[str] = set()
    for lineno, line in iter_text_lines(path, "--exclude file"):
        token = line.split("#", 1)[0].strip()
        if not token:
            continue
        prefix, _, value = token.rpartition(":")
        if prefix not in ("", "coco", "vg") or not value.isdigit():
            raise PrepInputError(f"{path}:{lineno}", f"expected an image id or coco:<id>, got {token!r}")
        (coco_ids if prefix == "coco" else vg_ids).add(value)
    return vg_ids, coco_ids
