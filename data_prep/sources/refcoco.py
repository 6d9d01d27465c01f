"""RefCOCO+ (weakly supervised visual grounding): COCO images with referring expressions.

Input (`--input`), either
- the official ALBEF grounding files: `refcoco+_train.json` = [{"image": "train2014/...jpg", "text"}]
  (image-text pairs for the retrieval-style fine-tuning), `refcoco+_val.json` / `refcoco+_test.json`
  = [{"image", "text", "ref_id"}] (one record per expression; test = testA + testB); or
- the native REFER `refs(unc).p` (a pickle of refs: ref_id, ann_id, image_id, split, sentences[].sent),
  whose expressions of `--split` are used (test = testA + testB).
`--split` train writes image-caption samples (one per image, its expressions as `captions`), as the
official training reads them. `--split` val|test writes evaluation samples and needs, as the official
evaluation (Grounding.py: REFER + dets.json):
  --refs refs(unc).p (unless it is the --input): each ref's annotation and split (val/testA/testB);
  --instances instances.json (REFER's COCO subset): the ref's GT box [x, y, w, h] and the image size;
  --dets dets.json: {image_id: [[x, y, w, h, ...], ...]} the detection proposals ranked per ref.
The official `cocos.json` is passed to `grounding_eval` but never read there: it is not needed.
Native input for `--split train` needs --instances (image file names; REFER's images are train2014).
Images are local COCO files under `--image_root` (holding `train2014/`) or an http(s) base URL.

Evaluation samples: one per image, `captions` = its expressions, `labels` = one object per expression
{"ref_id", "split", "box", "proposals", "image_hw"}: the GT box, the proposals and the original
(height, width) travel with each expression, so scoring one needs nothing outside the sample (the
proposals are repeated per expression of an image: a few hundred bytes). Boxes stay in the original
image's pixels; the evaluation upsamples its Grad-CAM map to `image_hw`, as the official code does, so
any img2dataset resize that keeps the whole image (keep_ratio, keep_ratio_largest, no) keeps them
right; `center_crop` and `border` would not and are refused for val/test.

Skipped and counted: an expression cleaned to nothing (`empty_caption`), a ref_id unknown to the refs
(`unknown_ref`), a ref whose annotation or image is absent from instances.json (`unknown_annotation`),
an image without proposals in dets.json (`no_proposals`), a name escaping --image_root.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_prep.errors import PrepInputError, PrepOptionsError
from data_prep.image_root import ImageRoot
from data_prep.options import PrepOptions
from data_prep.records import RowCollector, SourceRows, require_file
from data_prep.sources._json import load_json

EVAL_SPLITS = {"val": ("val",), "test": ("testA", "testB")}  # --split -> REFER ref splits
WHOLE_IMAGE_RESIZES = ("no", "keep_ratio", "keep_ratio_largest")  # boxes stay right under these
IMAGE_FOLDER = "train2014"  # REFER's images are COCO train2014 images


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles plain data only (dict, list, str, numbers): refs(unc).p is a file we did not write,
    and a pickle naming any class or function could run code."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refs file references {module}.{name}: only plain data is accepted")


def load_refs(path: Path) -> list[dict]:
    """REFER refs from `refs(unc).p` (plain data only; latin-1 for Python 2 byte strings)."""
    require_file(path, "--refs")
    try:
        with open(path, "rb") as fh:
            refs = _PlainUnpickler(fh, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise PrepInputError(str(path), f"not a REFER refs pickle ({err})") from None
    if not isinstance(refs, list) or not all(isinstance(r, dict) and "ref_id" in r for r in refs):
        raise PrepInputError(str(path), "expected a list of refs (objects with ref_id)")
    return refs


def _instances(path: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """(image id -> image, annotation id -> annotation) of a COCO-style instances.json."""
    data = load_json(path, "--instances")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise PrepInputError(str(path), "expected COCO instances: an object with `images` and `annotations`")
    images = {int(im["id"]): im for im in data["images"]}
    anns = {int(a["id"]): a for a in data.get("annotations", [])}
    return images, anns


def _records(path: Path, opts: PrepOptions) -> Iterator[tuple[str, dict]]:
    """(where, {"image"?, "text", "ref_id"?}) per expression, from an ALBEF json or native refs."""
    if path.suffix.lower() in (".p", ".pkl", ".pickle"):
        assert opts.split is not None
        wanted = EVAL_SPLITS.get(opts.split, ("train",))
        for i, ref in enumerate(load_refs(path)):
            if ref.get("split") in wanted:
                for k, sentence in enumerate(ref.get("sentences", [])):
                    yield f"{path}: ref {i} sentence {k}", {"text": sentence.get("sent"), "ref_id": ref["ref_id"]}
        return
    data = load_json(path, "--input (ALBEF refcoco+ json)")
    if not isinstance(data, list):
        raise PrepInputError(str(path), f"expected a list of objects, got {type(data).__name__}")
    for i, record in enumerate(data):
        if not isinstance(record, dict) or "text" not in record:
            raise PrepInputError(f"{path}: entry {i}", "expected an object with `text`")
        yield f"{path}: entry {i}", record


def _image_id(name: str) -> str:
    """COCO id from a file name (COCO_train2014_000000581857.jpg -> 581857), else the name's stem."""
    stem = Path(name).stem
    tail = stem.rsplit("_", 1)[-1]
    return str(int(tail)) if tail.isdigit() else stem


def _ref_id(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit():
        raise PrepInputError(where, f"ref_id must be an integer, got {value!r}")
    return int(value)


def read(path: Path, opts: PrepOptions) -> SourceRows:
    assert opts.image_root is not None and opts.split is not None  # parse_options requires them
    native = path.suffix.lower() in (".p", ".pkl", ".pickle")
    evaluation = opts.split in EVAL_SPLITS
    if evaluation and opts.resize_mode not in WHOLE_IMAGE_RESIZES:
        raise PrepOptionsError(
            f"--resize_mode {opts.resize_mode} cuts or pads the image: the boxes of refcoco+ val/test would "
            f"no longer fit; use one of {', '.join(WHOLE_IMAGE_RESIZES)}"
        )
    for flag, needed in (("refs", evaluation and not native), ("instances", evaluation or native), ("dets", evaluation)):  # fmt: skip
        if needed and getattr(opts, flag) is None:
            raise PrepOptionsError(f"refcoco+ --split {opts.split} needs --{flag}")
    refs = {int(r["ref_id"]): r for r in load_refs(Path(opts.refs or path))} if evaluation or native else {}
    images, anns = _instances(Path(opts.instances)) if opts.instances else ({}, {})
    dets = load_json(Path(opts.dets), "--dets") if evaluation and opts.dets else {}
    if not isinstance(dets, dict):
        raise PrepInputError(str(opts.dets), "expected an object {image_id: [[x, y, w, h], ...]}")
    root = ImageRoot(opts.image_root)
    collector = RowCollector()
    grouped: dict[str, tuple[str, str, list[str], list[dict]]] = {}  # image id -> (where, name, texts, labels)
    skipped = 0

    def skip(reason: str, where: str) -> None:
        nonlocal skipped
        collector.skip(reason, where)
        skipped += 1

    for where, record in _records(path, opts):
        text = record.get("text")
        if not isinstance(text, str) or not text.strip():
            skip("empty_caption", where)
            continue
        label = None
        if evaluation or native:
            ref = refs.get(_ref_id(record.get("ref_id"), where))
            if ref is None:
                skip("unknown_ref", where)
                continue
            image, ann = images.get(int(ref["image_id"])), anns.get(int(ref["ann_id"]))
            if image is None or ann is None:
                skip("unknown_annotation", where)
                continue
            name = record.get("image") or f"{IMAGE_FOLDER}/{image['file_name']}"
            if evaluation:
                proposals = [[float(v) for v in det[:4]] for det in dets.get(str(ref["image_id"]), [])]
                if not proposals:
                    skip("no_proposals", where)
                    continue
                box = [float(v) for v in ann["bbox"]]
                hw = [int(image["height"]), int(image["width"])]
                label = {"ref_id": int(ref["ref_id"]), "split": str(ref["split"]), "box": box,
                         "proposals": proposals, "image_hw": hw}  # fmt: skip
        else:
            name = record.get("image")
            if not isinstance(name, str) or not name:
                raise PrepInputError(where, "missing `image` (path under --image_root)")
        entry = grouped.setdefault(_image_id(name), (where, name, [], []))
        entry[2].append(text.strip())
        if label is not None:
            entry[3].append(label)
    for image_id, (where, name, texts, labels) in grouped.items():
        extra = {"labels": labels} if evaluation else None
        collector.add_named(root, name, texts, image_id, where=where, extra=extra)
    result = collector.result()
    result.input_rows = skipped + sum(len(t) for _, _, t, _ in grouped.values())  # expressions, not images
    return result
