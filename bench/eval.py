"""Retrieval evaluation wall time: our batched ITM re-ranking vs the official one-query-at-a-time loop.

    python bench/eval.py                       # 1k images x 5k captions, tiny model, k 128, CPU
    python bench/eval.py --device cuda --preset base --image_size 384 --pairs_per_batch 2048

Both paths re-rank the same top-k candidates of the same encoded features (encoding is timed once,
it is shared); the scores are checked to agree before the times are printed. Ours = many queries per
fusion forward + captions in length buckets + last fusion layer for [CLS] only (pipeline/retrieval/rerank.py,
ALBEFRetrieval.itm_logits_cls); `--exact` keeps only the batching (bit-identical on the CPU).
Data are random images and random token ids with caption lengths uniform in [6, seq_len]: the
cost of re-ranking does not depend on the pixels.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import ALBEFConfig  # noqa: E402
from model.retrieval import build_retrieval  # noqa: E402
from pipeline.retrieval.rerank import EncodedSplit, rerank_block, rerank_naive  # noqa: E402


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
    return EncodedSplit(torch.cat(embeds), torch.cat(feats), torch.cat(hidden), mask.to(device), torch.cat(tfeats))


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
    ap.add_argument(
        "--exact", action="store_true", help="batching only: no length buckets, full last layer (bit-exact)"
    )
    ap.add_argument(
        "--naive_queries",
        type=int,
        default=None,
        help="time the naive loop on this many queries per side and extrapolate",
    )
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

    def itm_fn(img, txt, mask):  # the official computation (reference loop)
        return model.itm_logits(txt, mask, img)

    def itm_fast(img, txt, mask):  # ours: last fusion layer for [CLS] only
        return model.itm_logits_cls(txt, mask, img)

    sims = enc.similarity()
    result = {
        "images": args.images,
        "captions": n_txt,
        "k_test": args.k_test,
        "preset": args.preset,
        "image_size": args.image_size,
        "device": str(device),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "pairs_per_batch": args.pairs_per_batch,
        "exact": args.exact,
        "encode_s": t_encode,
    }
    for side, s in (("i2t", sims), ("t2i", sims.T)):
        rows = torch.arange(s.shape[0], device=device)
        batched, t_b = timed(
            lambda s=s, rows=rows, side=side: rerank_block(
                enc,
                s,
                rows,
                args.k_test,
                side,
                itm_fn if args.exact else itm_fast,
                args.pairs_per_batch,
                trim_padding=not args.exact,
            ),
            device,
        )
        n_naive = min(args.naive_queries or s.shape[0], s.shape[0])
        naive, t_n = timed(
            lambda s=s, n=n_naive, side=side: rerank_naive(enc, s[:n], args.k_test, side, itm_fn), device
        )
        t_n_full = t_n * s.shape[0] / n_naive
        diff = (batched.itm[:n_naive] - naive.itm).abs().max().item()
        assert torch.equal(batched.topk_idx[:n_naive], naive.topk_idx), "candidate sets differ"
        assert diff <= (0.0 if args.exact and device.type == "cpu" else 1e-3), f"scores differ by {diff}"
        result[side] = {
            "queries": int(s.shape[0]),
            "batched_s": t_b,
            "naive_s": t_n_full,
            "naive_measured_queries": n_naive,
            "speedup": t_n_full / t_b,
            "max_abs_score_diff": diff,
        }
    total_b = result["i2t"]["batched_s"] + result["t2i"]["batched_s"]
    total_n = result["i2t"]["naive_s"] + result["t2i"]["naive_s"]
    result.update(
        {
            "rerank_batched_s": total_b,
            "rerank_naive_s": total_n,
            "speedup": total_n / total_b,
            "eval_batched_s": t_encode + total_b,
            "eval_naive_s": t_encode + total_n,
        }
    )
    print(json.dumps(result, indent=2))
    print(
        f"\n{args.images} images x {n_txt} captions, k {args.k_test}, {args.preset} on {device} ({args.dtype}): "
        f"encode {t_encode:.1f} s; re-rank batched {total_b:.1f} s vs naive {total_n:.1f} s "
        f"({total_n / total_b:.1f}x); whole eval {t_encode + total_b:.1f} s vs {t_encode + total_n:.1f} s"
    )


if __name__ == "__main__":
    main()
