"""Retrieval evaluation wall time: the official one-query loop vs today's batched re-ranking vs the
grouped re-ranking with cached image keys/values.

    python bench/eval.py --threads 1 --naive_queries 200      # 1k images x 5k captions, tiny, k 128, CPU
    python bench/eval.py --device cuda --preset base --image_size 384 --pairs_per_batch 2048

All paths re-rank the same top-k candidates of the same encoded features (encoding is timed once, it
is shared); their scores are asserted to agree before the times are printed:
  naive    the official loop: one fusion forward per query on its k candidates, captions padded to
           one length, the full last layer (`rerank_naive`, `itm_logits`);
  batched  many queries per fusion forward, captions in length buckets, [CLS]-only last layer
           (`rerank_block` + `itm_logits_cls`; with `--exact`: batching only, bit-identical on the CPU);
  grouped  both sides' pairs merged and grouped by image, each image's cross-attention keys/values
           projected once per fusion layer, captions packed without padding, the first fusion
           self-attention once per caption (`score_matrices_grouped`, the default of `albef evaluate`).
`--repeats N` interleaves the three N times and reports medians (the machine may be shared).
The naive loop is timed on `--naive_queries` queries per side and extrapolated (all when unset).
Data are random images and random token ids with caption lengths uniform in [6, seq_len]: the cost
of re-ranking does not depend on the pixels.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import ALBEFConfig  # noqa: E402
from model.retrieval import build_retrieval  # noqa: E402
from pipeline.retrieval.rerank import (  # noqa: E402
    EncodedSplit,
    pair_set,
    rerank_block,
    rerank_naive,
    score_matrices_grouped,
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def encode(
    model, n_img: int, n_txt: int, image_size: int, seq_len: int, device: torch.device, dtype: torch.dtype
) -> EncodedSplit:
    g = torch.Generator().manual_seed(0)
    embeds, feats, hidden, tfeats = [], [], [], []
    for s in range(0, n_img, 64):
        images = torch.randn(min(64, n_img - s), 3, image_size, image_size, generator=g)
        e, f = model.encode_image(images.to(device, dtype))
        embeds.append(e)
        feats.append(f)
    ids = torch.randint(1000, 30000, (n_txt, seq_len), generator=g)
    lengths = torch.randint(6, seq_len + 1, (n_txt,), generator=g)
    mask = (torch.arange(seq_len)[None] < lengths[:, None]).long()
    ids = ids * mask
    for s in range(0, n_txt, 256):
        h, f = model.encode_text(ids[s : s + 256].to(device), mask[s : s + 256].to(device))
        hidden.append(h)
        tfeats.append(f)
    return EncodedSplit(
        torch.cat(embeds),
        torch.cat(feats),
        torch.cat(hidden),
        mask.to(device),
        torch.cat(tfeats),
        float(model.clamped_temp()),
    )


def timed(fn, device: torch.device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--captions_per_image", type=int, default=5)
    ap.add_argument("--k_test", type=int, default=128)
    ap.add_argument("--pairs_per_batch", type=int, default=1024)
    ap.add_argument("--preset", choices=["tiny", "base"], default="tiny")
    ap.add_argument("--image_size", type=int, default=64)
    ap.add_argument("--seq_len", type=int, default=30)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved batched/grouped runs (medians)")
    ap.add_argument("--exact", action="store_true", help="batched path: no length buckets, full last layer")
    ap.add_argument("--naive_queries", type=int, default=None, help="time the naive loop on this many queries per side")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    preset = ALBEFConfig.tiny if args.preset == "tiny" else ALBEFConfig.base
    model = build_retrieval(preset(image_size=args.image_size, queue_size=256)).to(device, dtype).eval()
    n_txt = args.images * args.captions_per_image
    enc, t_encode = timed(
        lambda: encode(model, args.images, n_txt, args.image_size, args.seq_len, device, dtype), device
    )

    def itm_full(img, txt, mask):  # the official computation
        return model.itm_logits(txt, mask, img)

    def itm_cls(img, txt, mask):  # [CLS]-only last layer
        return model.itm_logits_cls(txt, mask, img)

    sims = enc.similarity()
    sides = (("i2t", sims), ("t2i", sims.T))
    tol = 0.0 if args.exact and device.type == "cpu" and dtype == torch.float32 else 1e-5
    tol = tol if dtype == torch.float32 else 5e-2

    def batched() -> dict:
        out = {}
        for side, s in sides:
            rows = torch.arange(s.shape[0], device=device)
            fn = itm_full if args.exact else itm_cls
            out[side] = rerank_block(enc, s, rows, args.k_test, side, fn, args.pairs_per_batch, not args.exact)
        return out

    def grouped() -> dict:
        return score_matrices_grouped(enc, args.k_test, model, pairs_per_batch=args.pairs_per_batch)

    def naive() -> tuple[dict, float]:
        out, total = {}, 0.0
        for side, s in sides:
            n = min(args.naive_queries or s.shape[0], s.shape[0])
            out[side], t = timed(
                lambda s=s, n=n, side=side: rerank_naive(enc, s[:n], args.k_test, side, itm_full), device
            )
            total += t * s.shape[0] / n  # extrapolated to every query
        return out, total

    t_b, t_g, t_n = [], [], []
    for _ in range(args.repeats):  # interleaved: a shared machine slows all three alike
        blocks, t = timed(batched, device)
        t_b.append(t)
        matrices, t = timed(grouped, device)
        t_g.append(t)
        naive_blocks, t = naive()
        t_n.append(t)
    result: dict = {
        "images": args.images, "captions": n_txt, "k_test": args.k_test, "preset": args.preset,
        "image_size": args.image_size, "device": str(device), "dtype": args.dtype,
        "threads": torch.get_num_threads(), "pairs_per_batch": args.pairs_per_batch, "exact": args.exact,
        "encode_s": t_encode, "unique_pairs": int(pair_set(sims, args.k_test).image.numel()),
    }  # fmt: skip
    t_naive = statistics.median(t_n)
    for i, (side, s) in enumerate(sides):
        n = min(args.naive_queries or s.shape[0], s.shape[0])
        naive = naive_blocks[side]
        block = blocks[side]
        assert torch.equal(block.topk_idx[:n], naive.topk_idx), "candidate sets differ"
        diff_b = (block.itm[:n] - naive.itm).abs().max().item()
        grouped_rows = matrices["itm"][i][:n].to(naive.itm.device).gather(1, naive.topk_idx)
        diff_g = (grouped_rows - naive.itm).abs().max().item()
        assert diff_b <= tol and diff_g <= tol, f"{side}: scores differ by {diff_b} (batched), {diff_g} (grouped)"
        result[side] = {"queries": int(s.shape[0]), "naive_measured_queries": n, "max_abs_diff": [diff_b, diff_g]}
    med_b, med_g = statistics.median(t_b), statistics.median(t_g)
    result.update(
        {
            "rerank_naive_s": t_naive,
            "rerank_batched_s": med_b,
            "rerank_grouped_s": med_g,
            "batched_runs_s": t_b,
            "grouped_runs_s": t_g,
            "naive_runs_s": t_n,
            "eval_naive_s": t_encode + t_naive,
            "eval_batched_s": t_encode + med_b,
            "eval_grouped_s": t_encode + med_g,
            "eval_ratio_batched_vs_naive": (t_encode + med_b) / (t_encode + t_naive),
            "eval_ratio_grouped_vs_naive": (t_encode + med_g) / (t_encode + t_naive),
            "grouped_vs_batched": med_g / med_b,
        }
    )
    print(json.dumps(result, indent=2))
    print(
        f"\n{args.images} images x {n_txt} captions, k {args.k_test}, {args.preset} on {device} ({args.dtype}, "
        f"{torch.get_num_threads()} threads): encode {t_encode:.1f} s; re-rank naive {t_naive:.1f} s, batched "
        f"{med_b:.1f} s, grouped {med_g:.1f} s; whole eval vs the official loop: batched "
        f"{result['eval_ratio_batched_vs_naive']:.3f}x, grouped {result['eval_ratio_grouped_vs_naive']:.3f}x"
    )


if __name__ == "__main__":
    main()
