"""Training and evaluation loaders over WebDataset shards described by manifests.

Training stream = a pure function of (seed, global step)
---------------------------------------------------------
Steps are grouped in segments of K = `segment_steps` steps: segment s covers global steps
[s*K, (s+1)*K). Inside a segment, on rank r, step s*K + i belongs to slot v = i mod W (W = number
of DataLoader workers, 1 when num_workers=0), and slot v's batches are, in order, those of the
independent stream

    per source: its shards resampled by size -> tar samples -> its shuffle buffer  (one sub-stream each)
    -> per sample: source drawn by weight, next sample of that sub-stream -> decode+augment -> batch

whose every random draw comes from generators seeded by derive_seed(seed, s, r, v). Drawing the source
sample by sample (not shard by shard) makes every batch a mix of the sources in proportion to their
weights, as the official code's globally shuffled per-caption list does, so in-batch and hard negatives
come from all sources; each source's buffer holds its weight's share of `shuffle_buffer`. So the batch at
global step g is fixed by (seed, g, rank) and the set-up (manifests, weights, world size, workers,
batch size, K, buffer size, transforms). A loader started at any `start_step` g0 reproduces exactly
what an uninterrupted run yields from g0 on: DataLoader worker w serves steps g0 + w, g0 + w + W, ...
(the DataLoader's round-robin order), i.e. in segment s the slot v = (g0 + w - s*K) mod W; in the
first segment it decodes and drops the slot's batches before g0 (at most K/W per worker; none when
g0 is a multiple of K, so checkpoint every K steps for a free resume). Each segment starts a fresh
shuffle buffer (raw bytes, cheap to refill). Every batch carries its global "step" so the trainer
can assert alignment.

Skipped samples: every stream owns a `SkipCounter`. Reasons: bad_shard (a tar that raised a read
error or held fewer samples than its manifest lists) + lost_samples (how many it was short), both
counted once per visit of the shard, i.e. once per stream (a finite epoch's partition, or one
segment of one resampled slot, which may draw the same shard many times); bad_image (does not
decode), too_many_pixels, missing_image, missing_caption (no caption left after pre_caption),
bad_json. Each batch carries `bad_samples`, the counts met while it was assembled (an increment,
{} when clean): the trainer sums them (and all-reduces them for logging). Batches dropped while
fast-forwarding drop their counts too, matching what the uninterrupted run had already reported
before the checkpoint. A training stream that skips more than `max_consecutive_bad` samples in a
row (all shards corrupt, say) raises `TooManyBadSamples` naming the shards instead of searching
forever.

Workers: each DataLoader worker asks Linux to kill it when its parent dies (PR_SET_PDEATHSIG), so
a SIGKILLed trainer leaves no worker spinning on its own.

Finite mode (`resampled=False`, and the eval loader): shards are ordered (shuffled with
(seed, epoch) for training, manifest order for eval) identically on every rank, and global slot
rank*W + w takes every (world_size*W)-th shard, so all ranks' workers together yield every sample
once. Batch counts then differ across ranks/workers (the last batch is partial): the caller must
tolerate uneven ends (e.g. all-reduce a "has data" flag). Resume inside a finite epoch is not
supported (start at step 0 of an epoch).
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
import random
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data import stages
from pipeline.data.manifest import Source, load_sources, shard_distribution, source_shares
from pipeline.data.transforms import EvalTransform, build_train_transform, limit_threads
from pipeline.runtime.seeds import derive_seed

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    if info is None:
        return 0, 1
    limit_threads()
    return info.id, info.num_workers


@dataclass(frozen=True)
class StreamConfig:
    """What a stream needs besides its seeds; shared by the train and eval datasets."""

    sources: tuple[Source, ...]
    batch_size: int
    rank: int
    world_size: int
    transform: Callable
    max_words: int = 30
    shuffle_buffer: int = 1000  # raw samples held per worker for shuffling (0 = no shuffle)
    normalize: bool = True  # float32 CLIP-normalised images; False = uint8, normalise on the device
    max_consecutive_bad: int | None = None  # skips in a row before a stream fails; None = no limit

    def __post_init__(self) -> None:
        assert self.batch_size > 0, self.batch_size
        assert 0 <= self.rank < self.world_size, (self.rank, self.world_size)
        assert self.max_consecutive_bad is None or self.max_consecutive_bad >= 1, self.max_consecutive_bad


class TrainStream(IterableDataset):
    """Per-rank training batches; resampled (endless, resumable) or finite (one exact epoch)."""

    def __init__(
        self,
        cfg: StreamConfig,
        *,
        tokenizer,
        max_len: int,
        padding: Literal["longest", "max_length"],
        seed: int,
        start_step: int,
        num_steps: int | None,
        segment_steps: int,
        resampled: bool,
        epoch: int,
    ) -> None:
        assert segment_steps > 0 and start_step >= 0, (segment_steps, start_step)
        assert resampled or start_step == 0, "finite mode starts at the beginning of an epoch"
        self.cfg, self.seed, self.start_step, self.num_steps = cfg, seed, start_step, num_steps
        self.segment_steps, self.resampled, self.epoch = segment_steps, resampled, epoch
        self.tokenizer, self.max_len, self.padding = tokenizer, max_len, padding

    def __iter__(self) -> Iterator[dict]:
        w, num_workers = _worker()
        return self._resampled(w, num_workers) if self.resampled else self._finite(w, num_workers)

    def _collate(self, counter: stages.SkipCounter) -> Callable:
        return partial(
            stages.collate_train,
            tokenizer=self.tokenizer,
            max_len=self.max_len,
            padding=self.padding,
            counter=counter,
            normalize=self.cfg.normalize,
        )

    def _slot_batches(self, segment: int, slot: int) -> Iterator[dict]:
        cfg = self.cfg
        base = derive_seed(self.seed, segment, cfg.rank, slot)
        mix_rng, aug_rng = random.Random(derive_seed(base, 3)), random.Random(derive_seed(base, 2))
        counter = stages.SkipCounter(cfg.max_consecutive_bad)
        shares = source_shares(cfg.sources)
        streams = [self._source_samples(base, i, share, counter) for i, share in enumerate(shares)]
        pipeline = wds.DataPipeline(
            lambda: mix_sources(streams, shares, mix_rng),  # raw samples, each one's source drawn by weight
            partial(
                stages.decode_train, transform=cfg.transform, rng=aug_rng, counter=counter, max_words=cfg.max_words
            ),  # decoded + augmented, bad samples dropped
            partial(
                stages.batch_samples, batch_size=cfg.batch_size, collate=self._collate(counter), partial=False
            ),  # full batches only
        )
        return iter(pipeline)

    def _source_samples(self, base: int, index: int, share: float, counter: stages.SkipCounter) -> Iterator[dict]:
        """Endless raw samples of source `index`: its shards drawn by size (every sample of the source
        equally likely), read in turn, mixed in a buffer of the source's share of `shuffle_buffer`."""
        source = self.cfg.sources[index]
        # Source 0 keeps the seeds of the former one-stream layout: a single-source stream is unchanged.
        seeds = (
            (derive_seed(base, 0), derive_seed(base, 1))
            if index == 0
            else (derive_seed(base, 3, index, 0), derive_seed(base, 3, index, 1))
        )
        shard_rng, shuffle_rng = (random.Random(seed) for seed in seeds)
        probs = [shard.samples / source.num_samples for shard in source.shards]
        samples = stages.expand_shards(stages.resampled_shards(source.shards, probs, shard_rng), counter)
        for stage in _shuffle_stage(max(1, round(self.cfg.shuffle_buffer * share)), shuffle_rng):
            samples = stage(samples)
        return samples

    def _resampled(self, w: int, num_workers: int) -> Iterator[dict]:
        k, g0 = self.segment_steps, self.start_step
        end = None if self.num_steps is None else g0 + self.num_steps
        segment = g0 // k
        while end is None or segment * k < end:
            first = segment * k
            slot = (g0 + w - first) % num_workers
            lo, hi = max(g0 - first, 0), k if end is None else min(k, end - first)
            # zip stops on the range first, so no batch beyond `hi` is decoded.
            for i, batch in zip(range(slot, hi, num_workers), self._slot_batches(segment, slot)):
                if i >= lo:
                    batch["step"] = first + i
                    yield batch
            segment += 1

    def _finite(self, w: int, num_workers: int) -> Iterator[dict]:
        cfg = self.cfg
        shards, _ = shard_distribution(cfg.sources)
        order_rng = random.Random(derive_seed(self.seed, self.epoch))  # same on every rank
        mine = stages.partitioned_shards(shards, cfg.rank * num_workers + w, cfg.world_size * num_workers, order_rng)
        base = derive_seed(self.seed, self.epoch, cfg.rank, w)
        shuffle_rng, aug_rng = random.Random(derive_seed(base, 1)), random.Random(derive_seed(base, 2))
        counter = stages.SkipCounter(cfg.max_consecutive_bad)
        pipeline = wds.DataPipeline(
            lambda: iter(mine),  # this slot's shards (a bare list would be flattened into stages)
            partial(stages.expand_shards, counter=counter),
            *_shuffle_stage(cfg.shuffle_buffer, shuffle_rng),
            partial(
                stages.decode_train, transform=cfg.transform, rng=aug_rng, counter=counter, max_words=cfg.max_words
            ),
            partial(stages.batch_samples, batch_size=cfg.batch_size, collate=self._collate(counter), partial=True),
        )
        for batch in pipeline:
            batch["step"] = -1  # no global step in finite mode
            yield batch


class EvalStream(IterableDataset):
    """Each image once (finite partition over ranks x workers), with all its captions in order."""

    def __init__(self, cfg: StreamConfig) -> None:
        self.cfg = cfg

    def __iter__(self) -> Iterator[dict]:
        cfg = self.cfg
        w, num_workers = _worker()
        shards, _ = shard_distribution(cfg.sources)
        mine = shards[cfg.rank * num_workers + w :: cfg.world_size * num_workers]  # manifest order
        counter = stages.SkipCounter()
        return iter(
            wds.DataPipeline(
                lambda: iter(mine),  # this slot's shards, manifest order
                partial(stages.expand_shards, counter=counter),
                partial(stages.decode_eval, transform=cfg.transform, counter=counter, max_words=cfg.max_words),
                partial(
                    stages.batch_samples,
                    batch_size=cfg.batch_size,
                    collate=partial(stages.collate_eval, counter=counter, normalize=cfg.normalize),
                    partial=True,
                ),
            )
        )


def mix_sources(streams: Sequence[Iterator[dict]], probs: Sequence[float], rng: random.Random) -> Iterator[dict]:
    """Endless samples, each taken from stream i with probability probs[i] (one seeded draw per sample).

    After: the source of every sample is an independent draw, so the source counts of a batch of B
    follow a multinomial(B, probs).
    """
    cum = list(itertools.accumulate(probs))
    indices = range(len(streams))
    while True:
        yield next(streams[rng.choices(indices, cum_weights=cum, k=1)[0]])


def _shuffle_stage(bufsize: int, rng: random.Random) -> list:
    return [wds.shuffle(bufsize, initial=bufsize, rng=rng)] if bufsize > 1 else []


def die_with_parent(worker_id: int, parent_pid: int) -> None:
    """DataLoader `worker_init_fn`: the kernel SIGKILLs this worker when its parent dies (Linux).

    Without it a worker whose trainer was SIGKILLed (OOM killer, scancel --signal=KILL) keeps
    running, e.g. spinning over corrupt shards at full CPU, until someone kills it by hand. The
    parent is the thread that started the workers: the trainer's main thread, which lives as long
    as the process.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        logger.warning("loader worker %d: prctl(PR_SET_PDEATHSIG) failed (errno %d)", worker_id, ctypes.get_errno())
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def _data_loader(dataset: IterableDataset, num_workers: int, pin_memory: bool | None, seed: int = 0) -> DataLoader:
    # An own generator: DataLoader draws its workers' base seed from it instead of consuming the
    # trainer's global torch RNG each time a loader is iterated.
    generator = torch.Generator().manual_seed(seed)
    if num_workers > 0:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizer runs inside forked workers
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        generator=generator,  # default prefetch (2 batches per worker): batches are large
        worker_init_fn=partial(die_with_parent, parent_pid=os.getpid()) if num_workers > 0 else None,
    )


def build_train_loader(
    manifests: Sequence[str | Path],
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    num_workers: int,
    seed: int,
    start_step: int,
    image_res: int,
    tokenizer,
    max_len: int,
    weights: Sequence[float] | None = None,
    num_steps: int | None = None,
    segment_steps: int = 1000,
    finetune: bool = False,
    resampled: bool = True,
    epoch: int = 0,
    shuffle_buffer: int = 1000,
    max_words: int = 30,
    padding: Literal["longest", "max_length"] = "longest",
    pin_memory: bool | None = None,
    draft: bool = True,
    normalize: bool = True,
    max_consecutive_bad: int | None = 1000,
) -> DataLoader:
    """Per-rank training batches for global steps start_step, start_step+1, ... (see module doc).

    Batch fields: image float32 [B,3,R,R] CLIP-normalised (uint8 with normalize=False: the trainer
    then calls pipeline.data.transforms.normalize_images on the device), input_ids / attention_mask int64 [B,L]
    (L <= max_len; MLM masking is the trainer's), image_idx int64 [B] (stable hash of source and
    image_id, for fine-tuning's idx queue), source int64 [B] (manifest index), image_id / key /
    caption lists, bad_samples dict[str, int] (increment), step int (global step; -1 in finite mode),
    label list (only when the samples' json has per-caption `labels`: the drawn caption's label).
    Two-image samples (`albef prep nlvr2`: <key>.left.jpg + <key>.right.jpg) give image [B,2,3,R,R],
    each image with its own random crop.
    `num_steps` None = endless. `finetune` selects the (0.5, 1) crop scale. A worker that skips more
    than `max_consecutive_bad` samples in a row raises TooManyBadSamples (None = never).
    """
    cfg = StreamConfig(
        tuple(load_sources(manifests, weights)),
        batch_size,
        rank,
        world_size,
        build_train_transform(image_res, finetune=finetune, draft=draft),
        max_words,
        shuffle_buffer,
        normalize,
        max_consecutive_bad,
    )
    dataset = TrainStream(
        cfg,
        tokenizer=tokenizer,
        max_len=max_len,
        padding=padding,
        seed=seed,
        start_step=start_step,
        num_steps=num_steps,
        segment_steps=segment_steps,
        resampled=resampled,
        epoch=epoch,
    )
    return _data_loader(dataset, num_workers, pin_memory, seed)


def build_eval_loader(
    manifests: Sequence[str | Path],
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    image_res: int = 384,
    max_words: int = 30,
    pin_memory: bool | None = None,
    draft: bool = True,
    normalize: bool = True,
) -> DataLoader:
    """Every image of the manifests once, over ranks x workers (see module doc).

    Batch fields: image float32 [B,3,R,R] (uint8 with normalize=False), captions list[list[str]]
    (all cleaned captions of each image, stored order), image_id / key lists, image_idx / source
    int64 [B], bad_samples dict, labels list[list] (only with per-caption `labels` in the json); image
    [B,2,3,R,R] for two-image samples (`albef prep nlvr2`).
    Texts are tokenised by the caller (see `caption_index`) as retrieval needs them all at once.
    """
    cfg = StreamConfig(
        tuple(load_sources(manifests)),
        batch_size,
        rank,
        world_size,
        EvalTransform(image_res, draft=draft),
        max_words,
        0,
        normalize,
    )
    return _data_loader(EvalStream(cfg), num_workers, pin_memory)


@dataclass(frozen=True)
class CaptionIndex:
    """Flat text list for retrieval with the maps between texts and images."""

    texts: list[str]
    txt2img: torch.Tensor  # int64 [T]: image index of each text
    img2txt: list[list[int]]  # text indices of each image


def caption_index(captions_per_image: Sequence[Sequence[str]]) -> CaptionIndex:
    """Flatten per-image caption lists (image index = position) as the official re_eval_dataset."""
    texts: list[str] = []
    txt2img: list[int] = []
    img2txt: list[list[int]] = []
    for img, caps in enumerate(captions_per_image):
        img2txt.append(list(range(len(texts), len(texts) + len(caps))))
        texts.extend(caps)
        txt2img.extend([img] * len(caps))
    return CaptionIndex(texts, torch.tensor(txt2img, dtype=torch.long), img2txt)
