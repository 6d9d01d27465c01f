"""Loader throughput: our WebDataset training pipeline vs a plain PIL-from-files baseline.

Generates `--num_images` synthetic photos-like JPEGs of `--image_size` px (the stored size
img2dataset would write), as WebDataset shards + manifest and as loose files, then measures
samples/s (and per core = per worker process, or the main process when --workers 0) of:
  ours      build_train_loader (resampled shards, shuffle, draft decode, ALBEF train transform,
            pre_caption, tokenisation, batching in workers)
  ours_u8   the same with normalize=False (uint8 batches; the trainer normalises on the GPU)
  baseline  map-style Dataset (the official layout): PIL open + convert from files, the same
            TrainTransform (full decode, no draft), per-sample ToTensor+Normalize, same caption
            cleaning + tokenisation, default DataLoader batching

    python bench/loader.py --image_size 256 --res 256 --workers 0
    python bench/loader.py --image_size 512 --res 256 --workers 2
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipeline.data import build_train_loader
from pipeline.data.text import build_tokenizer, bundled_vocab_path, pre_caption, tokenize
from pipeline.data.transforms import EvalTransform, build_train_transform, limit_threads, normalize_images, open_image


def synthetic_jpeg(rng: np.random.Generator, size: int) -> bytes:
    """Smooth colour fields + mild noise: compresses like a photo (tens of KB at 256 px)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    f = rng.uniform(2, 9, 6)
    arr = np.stack([np.sin(f[0] * x + f[1] * y), np.cos(f[2] * x - f[3] * y), np.sin(f[4] * x * y + f[5])], -1)
    arr = 127 + 90 * arr + rng.normal(0, 12, arr.shape)
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_data(root: Path, n: int, size: int, per_shard: int = 256) -> list[tuple[Path, str]]:
    rng = np.random.default_rng(0)
    (root / "shards").mkdir(parents=True)
    (root / "files").mkdir()
    files, entries, sink = [], [], None
    for i in range(n):
        if i % per_shard == 0:
            if sink:
                sink.close()
            name = f"shards/{i // per_shard:05d}.tar"
            sink = wds.TarWriter(str(root / name))
            entries.append({"path": name, "samples": 0})
        data, caption = synthetic_jpeg(rng, size), f"A photo, number {i}: a dog-like shape on grass!"
        sink.write(
            {"__key__": f"{i:09d}", "jpg": data, "txt": caption, "json": {"captions": [caption], "image_id": str(i)}}
        )
        entries[-1]["samples"] += 1
        path = root / "files" / f"{i:09d}.jpg"
        path.write_bytes(data)
        files.append((path, caption))
    sink.close()
    manifest = {"format_version": 1, "source": "bench", "split": "train", "shards": entries, "num_samples": n}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return files


class FileDataset(Dataset):
    """The baseline: one JPEG file per sample, full decode, same transform."""

    def __init__(self, files: list[tuple[Path, str]], res: int) -> None:
        # PIL's resize as the official torchvision transform (ours enlarges crops with OpenCV)
        self.files, self.transform = files, build_train_transform(res, draft=False, resize="pil")

    def __len__(self) -> int:
        return 100 * len(self.files)  # several passes, like the endless stream it is compared with

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        path, caption = self.files[i % len(self.files)]
        img = Image.open(path).convert("RGB")
        return normalize_images(self.transform(img, random.Random(i))), pre_caption(caption)


def measure(batches, n_batches: int, batch_size: int, to_batch=lambda b: b, repeats: int = 3) -> tuple[float, float]:
    """(samples per wall second, samples per CPU second of this process), best of `repeats` windows.

    With --workers 0 all loading runs in this process, so samples per CPU second is the per-core
    throughput and, unlike wall time, barely moves when the machine is shared.
    """
    it = iter(batches)
    to_batch(next(it))  # start-up (worker fork, shuffle buffer fill) is not throughput
    wall, cpu = 0.0, 0.0
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n_batches):
            to_batch(next(it))
        n = n_batches * batch_size
        wall, cpu = max(wall, n / (time.perf_counter() - w0)), max(cpu, n / (time.process_time() - c0))
    return wall, cpu


def transform_rate(images: list[bytes], transform) -> float:
    """Images per CPU second of one transform (decode included), best of 3 passes."""
    best = 0.0
    for _ in range(3):
        c0 = time.process_time()
        for i, data in enumerate(images):
            transform(open_image(data), random.Random(i))
        best = max(best, len(images) / (time.process_time() - c0))
    return best


def draft_table(size: int, res: int, n: int = 24) -> None:
    """Decode-at-reduced-size gain: same transform with and without PIL draft."""
    rng = np.random.default_rng(1)
    images = [synthetic_jpeg(rng, size) for _ in range(n)]
    makers = {"train": lambda d: build_train_transform(res, draft=d), "eval": lambda d: EvalTransform(res, draft=d)}
    for name, make in makers.items():
        fast, full = transform_rate(images, make(True)), transform_rate(images, make(False))
        print(
            f"{name} transform {size}px -> {res}: draft {fast:6.1f} img/CPU-s, full decode {full:6.1f} ({fast / full:4.2f}x)"
        )


def _cpu_rate(fn, items: list, repeats: int = 3) -> float:
    """Items per CPU second of fn over items, best of `repeats` passes."""
    best = 0.0
    for _ in range(repeats):
        c0 = time.process_time()
        for i, item in enumerate(items):
            fn(i, item)
        best = max(best, len(items) / max(time.process_time() - c0, 1e-9))
    return best


def stage_table(size: int, res: int, batch_size: int, n: int = 64) -> None:
    """Samples per CPU second of each stage of one worker, PIL resize (before) vs OpenCV (after)."""
    from pipeline.data.transforms import RandAugment, decode_region, random_resized_crop_box, to_chw_tensor

    rng = np.random.default_rng(2)
    images = [synthetic_jpeg(rng, size) for _ in range(n)]
    boxes = [random_resized_crop_box(size, size, (0.2, 1.0), random.Random(i)) for i in range(n)]
    decoded = []
    for data, box in zip(images, boxes):
        img = open_image(data)
        img.draft("RGB", (size * res // box[2], size * res // box[3]))
        img.load()
        decoded.append(img)
    crops = [decode_region(img, box, res, False, "pil") for img, box in zip(decoded, boxes)]
    ra = RandAugment()
    tok = build_tokenizer(bundled_vocab_path())
    tensors = [to_chw_tensor(c) for c in crops]
    caps = [pre_caption("A photo, number 7: a dog-like shape on grass!")] * batch_size

    def decode(i, data):
        img = open_image(data)
        img.draft("RGB", (size * res // boxes[i][2], size * res // boxes[i][3]))
        img.load()

    rows = {
        "decode (JPEG, draft)": _cpu_rate(decode, images),
        "crop+resize PIL (before)": _cpu_rate(lambda i, img: decode_region(img, boxes[i], res, False, "pil"), decoded),
        "crop+resize cv2 (after)": _cpu_rate(
            lambda i, img: decode_region(img, boxes[i], res, False, "cv2_upscale"), decoded
        ),
        "flip + RandAugment": _cpu_rate(lambda i, c: ra(c, random.Random(i)), crops),
        "to uint8 CHW tensor": _cpu_rate(lambda i, c: to_chw_tensor(c), crops),
        "collate uint8 (stack)": _cpu_rate(lambda i, t: torch.stack(tensors[:batch_size]), tensors[:8]) * batch_size,
        "collate + normalise fp32": _cpu_rate(
            lambda i, t: normalize_images(torch.stack(tensors[:batch_size])), tensors[:8]
        )
        * batch_size,
        "tokenise captions": _cpu_rate(lambda i, c: tokenize(tok, caps, 25), tensors[:8]) * batch_size,
    }
    print(f"per-stage samples/CPU-s (stored {size}px -> res {res}):")
    for name, rate in rows.items():
        print(f"  {name:28s} {rate:9.1f}   ({1e3 / rate:6.3f} ms/sample)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num_images", type=int, default=1024)
    p.add_argument("--image_size", type=int, default=256, help="stored JPEG side, px")
    p.add_argument("--res", type=int, default=256, help="training resolution, px")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--batches", type=int, default=12, help="timed batches per run")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--draft_size", type=int, default=1024, help="stored side for the draft table (0 = skip)")
    p.add_argument("--stages", action="store_true", help="also print samples/CPU-s per stage of one worker")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    limit_threads()
    cores = max(1, args.workers)
    tok = build_tokenizer(bundled_vocab_path())
    with tempfile.TemporaryDirectory() as tmp:
        files = make_data(Path(tmp), args.num_images, args.image_size)
        results = {}
        for name, normalize in (("ours", True), ("ours_u8", False)):
            loader = build_train_loader(
                [tmp],
                batch_size=args.batch_size,
                rank=0,
                world_size=1,
                num_workers=args.workers,
                seed=0,
                start_step=0,
                image_res=args.res,
                tokenizer=tok,
                max_len=25,
                shuffle_buffer=500,
                pin_memory=False,
                normalize=normalize,
            )
            results[name] = measure(loader, args.batches, args.batch_size)
        base = DataLoader(
            FileDataset(files, args.res),
            batch_size=args.batch_size,
            shuffle=True,
            num_workers=args.workers,
            drop_last=True,
        )
        results["baseline"] = measure(base, args.batches, args.batch_size, lambda b: tokenize(tok, b[1], 25))
    print(f"stored {args.image_size}px -> res {args.res}, batch {args.batch_size}, workers {args.workers}")
    for name, (wall, cpu) in results.items():
        per_core = (
            f"{cpu:7.1f} samples/CPU-s (main process)" if args.workers == 0 else f"{wall / cores:7.1f} samples/s/worker"
        )
        ratio = wall / results["baseline"][0]
        print(f"{name:9s} {wall:7.1f} samples/s wall  {per_core}  {ratio:5.2f}x baseline (wall)")
    if args.stages:
        stage_table(args.image_size, args.res, args.batch_size)
    if args.draft_size:
        draft_table(args.draft_size, args.res)


if __name__ == "__main__":
    main()
