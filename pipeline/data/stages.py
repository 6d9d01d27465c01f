"""Small webdataset pipeline stages: shard choice, tar expansion, decoding, batching, collation.

Each stage is a generator over the previous one; the comment on each says what holds after it.
Every random choice draws from a `random.Random` passed in, never from global state, so a
stream is a pure function of its seeds (see pipeline.data.loaders for how seeds are derived).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
import webdataset as wds

from pipeline.data.manifest import Shard
from pipeline.data.text import pre_caption, tokenize
from pipeline.data.transforms import TooManyPixels, normalize_images, open_image

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
_LOG_FIRST = 5  # per reason and worker, then one line every _LOG_EVERY
_LOG_EVERY = 1000
_SHARDS_NAMED = 5  # shards listed in a TooManyBadSamples message


def stable_id(source: int, image_id: str) -> int:
    """63-bit integer id of (source, image_id), the same in every process (for idx queues)."""
    digest = hashlib.blake2b(f"{source}\x00{image_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class TooManyBadSamples(RuntimeError):
    """A loader worker skipped more samples in a row than `data.max_consecutive_bad_samples`."""

    @staticmethod
    def one_line(err: BaseException) -> str:
        """The message without the worker traceback the DataLoader wraps around it."""
        text = str(err).strip()
        last = text.splitlines()[-1] if text else type(err).__name__
        return last.split(f"{TooManyBadSamples.__name__}: ", 1)[-1]


class SkipCounter:
    """Counts skipped samples by reason inside one stream (one worker); batches carry the increments.

    `take()` returns the counts since the last call and resets them, so each batch reports the
    bad samples met while it was assembled and the trainer's sum over batches is the total.

    With `max_consecutive`, the stream fails (TooManyBadSamples, naming the shards) once that many
    skips happened in a row without a kept sample: a stream whose every sample is bad would
    otherwise search forever and never finish a batch. A failed shard read counts as one skip there
    (not its lost samples: one truncated 10k-sample shard among good ones is no reason to stop).
    """

    def __init__(self, max_consecutive: int | None = None, key: str = "data.max_consecutive_bad_samples") -> None:
        assert max_consecutive is None or max_consecutive >= 1, max_consecutive
        self.counts: Counter[str] = Counter()
        self.totals: Counter[str] = Counter()
        self.max_consecutive, self.key = max_consecutive, key
        self.consecutive = 0
        self.recent: Counter[str] = Counter()  # reasons of the current run of skips
        self.recent_shards: dict[str, None] = {}  # shards of the current run of skips (ordered set)
        self.failed_shards: set[str] = set()  # shards whose failed read was already counted

    def add(self, reason: str, detail: str = "", n: int = 1, log: bool = True, shard: str | None = None) -> None:
        self.counts[reason] += n
        self.totals[reason] += n
        seen = self.totals[reason]
        if log and (seen <= _LOG_FIRST or seen % _LOG_EVERY == 0):
            logger.warning("skipped (%s, %d so far in this worker): %s", reason, seen, detail[:300])
        self.skipped(reason, shard)

    def skipped(self, reason: str, shard: str | None) -> None:
        """One more skip in the current run (counted or not); raises past `max_consecutive`."""
        self.consecutive += 1
        self.recent[reason] += 1
        if shard is not None and len(self.recent_shards) < _SHARDS_NAMED:
            self.recent_shards[shard] = None
        if self.max_consecutive is not None and self.consecutive > self.max_consecutive:
            reasons = ", ".join(f"{r} {n}" for r, n in self.recent.most_common())
            raise TooManyBadSamples(
                f"{self.key}: {self.consecutive} samples in a row were skipped in one loader worker ({reasons}; "
                f"limit {self.max_consecutive}); shards: {', '.join(self.recent_shards) or 'unknown'}. "
                f"Check or re-prep these shards, or raise {self.key}"
            )

    def kept(self) -> None:
        """A sample made it through: the run of skips is over."""
        if self.consecutive:
            self.consecutive = 0
            self.recent.clear()
            self.recent_shards.clear()

    def shard_failed(self, url: str, read: int, listed: int, why: str) -> None:
        """A shard read that raised or came up short. Counted once per stream (`bad_shard` + its
        `lost_samples`): a resampled stream draws the same truncated shard again and again, and
        each re-read would add the same lost samples once more."""
        if url in self.failed_shards:
            self.skipped("bad_shard", url)
            return
        self.failed_shards.add(url)
        if read < listed:
            self.counts["lost_samples"] += listed - read
            self.totals["lost_samples"] += listed - read
        self.add("bad_shard", f"{url}: read {read} of {listed} samples ({why})", shard=url)

    def take(self) -> dict[str, int]:
        out = dict(self.counts)
        self.counts.clear()
        return out


def resampled_shards(shards: Sequence[Shard], probs: Sequence[float], rng: random.Random) -> Iterator[Shard]:
    """Endless shard draws with replacement. After: any shard, P(shard) = probs[i]."""
    cum = list(np.cumsum(probs))
    while True:
        yield rng.choices(shards, cum_weights=cum, k=1)[0]


def partitioned_shards(shards: Sequence[Shard], slot: int, num_slots: int, rng: random.Random) -> list[Shard]:
    """Shards of one (rank, worker) slot: a shuffle identical on every slot, then every num_slots-th.

    After: the slots' lists are disjoint and together hold every shard exactly once.
    """
    order = list(shards)
    rng.shuffle(order)
    return order[slot::num_slots]


def expand_shards(shards: Iterable[Shard], counter: SkipCounter) -> Iterator[dict]:
    """Shards -> raw samples {__key__, __url__, __source__, jpg, json, ...} (bytes, undecoded).

    A shard that raises a read error (truncated/corrupt/unreadable tar) or ends with fewer
    samples than its manifest lists (tarfile does not always raise on a cut tar) counts once per
    stream as `bad_shard`, and the missing samples as `lost_samples` (see SkipCounter.shard_failed);
    reading goes on with the next shard.
    """
    for shard in shards:
        errors: list[Exception] = []
        n = 0
        for sample in wds.tarfile_samples(iter([{"url": shard.url}]), handler=_collect_into(errors)):
            sample["__source__"] = shard.source
            n += 1
            yield sample
        if errors or n < shard.samples:
            counter.shard_failed(shard.url, n, shard.samples, repr(errors[0]) if errors else "no read error")


def _collect_into(errors: list[Exception]) -> Callable[[Exception], bool]:
    def handler(exn: Exception) -> bool:  # webdataset handler: note the error, keep going
        errors.append(exn)
        return True

    return handler


def _captions(sample: dict) -> tuple[list[str], str, list | None]:
    """Raw captions (json["captions"], else the txt file), image_id (json, else the key) and the
    per-caption labels (json["labels"], e.g. SNLI-VE's classes; None when the json has none)."""
    meta = json.loads(sample["json"]) if "json" in sample else {}
    if not isinstance(meta, dict):
        raise ValueError("json is not an object")
    caps = meta.get("captions")
    if isinstance(caps, str):
        caps = [caps]
    if not caps and "txt" in sample:
        caps = [sample["txt"].decode("utf-8")]
    labels = meta.get("labels")
    if labels is not None:
        # Labels index the stored captions one to one: a non-string caption would shift them.
        if not isinstance(labels, list) or not all(isinstance(c, str) for c in caps or []):
            raise ValueError("labels must be a list aligned with a list of string captions")
        if len(labels) != len(caps or []):
            raise ValueError(f"{len(labels)} labels for {len(caps or [])} captions")
    caps = [c for c in (caps or []) if isinstance(c, str)]
    return caps, str(meta.get("image_id", sample["__key__"])), labels


Parsed = tuple[bytes | tuple[bytes, bytes], list[str], str, list | None]
PAIR_SIDES = ("left", "right")  # two-image samples (`albef prep nlvr2`): <key>.left.jpg, <key>.right.jpg


def _image_bytes(sample: dict) -> bytes | tuple[bytes, bytes] | None:
    """The image of a sample, or (left, right) of a two-image sample; None when missing (one of a pair too)."""
    image = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if image is not None:
        return image
    left, right = (
        next((sample[f"{side}.{k}"] for k in IMAGE_KEYS if f"{side}.{k}" in sample), None) for side in PAIR_SIDES
    )
    return (left, right) if left is not None and right is not None else None


def _parse(sample: dict, counter: SkipCounter, max_words: int) -> Parsed | None:
    """Image bytes (a (left, right) pair for two-image samples), cleaned captions, image_id, per-caption
    labels (or None); None (counted) when a part is missing or bad. A caption cleaned to "" stays in
    place (labels keep their index)."""
    shard = sample.get("__url__")
    where = f"{shard}:{sample.get('__key__')}"
    image = _image_bytes(sample)
    if image is None:
        counter.add("missing_image", where, shard=shard)
        return None
    try:
        raw, image_id, labels = _captions(sample)
    except (ValueError, UnicodeDecodeError) as exn:
        counter.add("bad_json", f"{where}: {exn}", shard=shard)
        return None
    caps = [pre_caption(c, max_words) for c in raw]
    if not any(caps):
        counter.add("missing_caption", where, shard=shard)
        return None
    return image, caps, image_id, labels


def _decode_image(
    data: bytes | tuple[bytes, bytes],
    transform: Callable,
    rng: random.Random | None,
    counter: SkipCounter,
    sample: dict,
):
    """uint8 [3, R, R], or [2, 3, R, R] for a (left, right) pair (each image its own random crop, as the
    official NLVR dataset transforms the two separately); None (counted) when a decode fails."""
    shard = sample["__url__"]
    try:
        if isinstance(data, tuple):
            image = torch.stack([transform(open_image(side), rng) for side in data])
        else:
            image = transform(open_image(data), rng)
    except TooManyPixels as exn:
        counter.add("too_many_pixels", f"{shard}:{sample['__key__']}: {exn}", shard=shard)
        return None
    except Exception as exn:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        counter.add("bad_image", f"{shard}:{sample['__key__']}: {exn!r}", shard=shard)
        return None
    counter.kept()
    return image


def decode_train(
    samples: Iterable[dict], transform: Callable, rng: random.Random, counter: SkipCounter, max_words: int
):
    """Raw -> {image [3,R,R], caption (one cleaned caption drawn with rng), ids[, label of that
    caption when the json has labels]}. Bad ones counted."""
    for sample in samples:
        parsed = _parse(sample, counter, max_words)
        if parsed is None:
            continue
        data, caps, image_id, labels = parsed
        index = rng.choice([i for i, c in enumerate(caps) if c])  # the same draw as choosing the caption
        image = _decode_image(data, transform, rng, counter, sample)
        if image is not None:
            out = {
                "image": image,
                "caption": caps[index],
                "image_id": image_id,
                "key": sample["__key__"],
                "source": sample["__source__"],
            }
            if labels is not None:
                out["label"] = labels[index]
            yield out


def decode_eval(samples: Iterable[dict], transform: Callable, counter: SkipCounter, max_words: int):
    """Raw -> {image, captions (ALL cleaned captions, stored order; "" where cleaning left nothing),
    ids[, labels aligned with the captions when the json has them]}. Bad ones counted."""
    for sample in samples:
        parsed = _parse(sample, counter, max_words)
        if parsed is None:
            continue
        data, caps, image_id, labels = parsed
        image = _decode_image(data, transform, None, counter, sample)
        if image is not None:
            out = {
                "image": image,
                "captions": caps,
                "image_id": image_id,
                "key": sample["__key__"],
                "source": sample["__source__"],
            }
            if labels is not None:
                out["labels"] = labels
            yield out


def batch_samples(samples: Iterable[dict], batch_size: int, collate: Callable[[list[dict]], dict], partial: bool):
    """Samples -> collated batches of batch_size; with `partial` the last one may be smaller.

    Endless streams (partial=False) emit a batch as soon as it is full: no look-ahead sample is
    decoded, so the skip counts a batch carries are exactly those met while assembling it, on
    resume too. Finite streams (partial=True) hold a full batch until the next sample exists, so
    the counts met at the very end still ride on the last batch.
    """
    batch: list[dict] = []
    for sample in samples:
        if partial and len(batch) == batch_size:
            yield collate(batch)
            batch = []
        batch.append(sample)
        if not partial and len(batch) == batch_size:
            yield collate(batch)
            batch = []
    if batch and partial:
        yield collate(batch)


def _common(samples: list[dict], counter: SkipCounter, normalize: bool) -> dict:
    sources = [s["source"] for s in samples]
    images = torch.stack([s["image"] for s in samples])  # uint8 [B, 3, R, R]
    return {
        "image": normalize_images(images) if normalize else images,
        "image_id": [s["image_id"] for s in samples],
        "image_idx": torch.tensor(
            [stable_id(src, s["image_id"]) for src, s in zip(sources, samples)], dtype=torch.long
        ),
        "key": [s["key"] for s in samples],
        "source": torch.tensor(sources, dtype=torch.long),
        "bad_samples": counter.take(),
    }


def collate_train(
    samples: list[dict],
    tokenizer: Any,
    max_len: int,
    padding: Literal["longest", "max_length"],
    counter: SkipCounter,
    normalize: bool = True,
) -> dict:
    """Training batch: image [B,3,R,R] ([B,2,3,R,R] for two-image samples; float normalised, or uint8),
    input_ids / attention_mask [B,L]."""
    out = _common(samples, counter, normalize)
    captions = [s["caption"] for s in samples]
    out["input_ids"], out["attention_mask"] = tokenize(tokenizer, captions, max_len, padding)
    out["caption"] = captions
    if all("label" in s for s in samples):
        out["label"] = [s["label"] for s in samples]  # raw labels of the drawn captions (the task maps them)
    return out


def collate_eval(samples: list[dict], counter: SkipCounter, normalize: bool = True) -> dict:
    """Eval batch: image [B,3,R,R], captions: list (per image) of lists of cleaned captions, ids."""
    out = _common(samples, counter, normalize)
    out["captions"] = [s["captions"] for s in samples]
    if all("labels" in s for s in samples):
        out["labels"] = [s["labels"] for s in samples]
    return out
