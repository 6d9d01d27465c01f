"""How far is ITM re-ranking from ITC on a pretraining run, and how much of it is noise? (issue 11)

For each run (an `albef pretrain` output folder, e.g. from bench/tiny_recipe_seeds.py) this scores EVERY
(image, caption) pair of a held-out split with ITM (the pipeline's own eval pieces: checkpoint reader,
eval loader, encoders, grouped re-ranking path; checked against the padded exact path on 300 pairs), then
re-derives, without further forwards:

- R@1 (mean of text and image retrieval) of ITC, ITM re-ranking and ITM+ITC re-ranking (the LAVIS sum of
  the ITM match logit and the cosine, as `albef evaluate retrieval`) for several top-k sizes;
- d = ITM+ITC minus ITC at k_test with its standard error over queries (paired: the same queries, each
  either changes its top-1 hit or not), per side;
- the within-top-k AUC per side: over queries whose positive is among ITC's top k, the share of
  (positive, negative) candidate pairs that the score orders right (0.5 = no information beyond ITC's
  shortlist; ITC's own is ~0.5 by the selection). This is what re-ranking can gain;
- ITM alone as a retriever over the whole split, and score variants (match logit vs log-odds
  logit1 - logit0; + cosine; + cosine / temperature);
- per caption, ITM's P(match) of its own image, of ITC's top-ranked wrong image and of a random wrong
  image, and the ITM loss on a 1:1:1 mix of the three (what `itm_negatives: mixed` trains on).

    PYTHONPATH=. python bench/itm_rerank_noise.py --data /tmp/pl/data/test /tmp/pl/mixed_s0 /tmp/pl/mixed_s1

~20 s per run of 400 images on one core.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.text import PackedTokens  # noqa: E402
from pipeline.data.text import build_tokenizer  # noqa: E402
from pipeline.retrieval.evaluate import EvalConfig, build_eval_model, encode_split, read_eval_checkpoint  # noqa: E402
from pipeline.retrieval.metrics import retrieval_metrics  # noqa: E402
from pipeline.retrieval.rerank import packed_text_prefix  # noqa: E402


@torch.no_grad()
def full_itm(run: Path, data: Path) -> dict:
    """ITC cosine [N_img, N_txt], ITM logits [N_img, N_txt, 2] of every pair, index maps, temperature."""
    cfg = EvalConfig(num_workers=0, device="cpu")
    loaded, model_cfg = read_eval_checkpoint(run, cfg)
    model = build_eval_model(loaded, model_cfg, cfg, torch.device("cpu"))
    split = encode_split(model, data, cfg, torch.device("cpu"), build_tokenizer(None))
    enc = split.encoded
    n_img, n_txt = enc.image_feat.shape[0], enc.text_feat.shape[0]
    prefix, query, first, lengths = packed_text_prefix(model, enc)
    offsets = torch.cumsum(lengths, 0) - lengths
    rows = first.repeat_interleave(lengths) + torch.arange(int(lengths.sum())) - offsets.repeat_interleave(lengths)
    tokens = PackedTokens.from_mask(enc.text_mask)
    logits = torch.empty(n_img, n_txt, 2)
    for i in range(n_img):  # every caption against image i, packed
        kv = model.itm_image_kv(enc.image_embeds[i : i + 1])
        logits[i] = model.itm_logits_one_image(prefix[rows], tokens, kv, query[rows]).float()
    g = torch.Generator().manual_seed(0)
    ii, tt = torch.randint(0, n_img, (300,), generator=g), torch.randint(0, n_txt, (300,), generator=g)
    exact = model.itm_logits(enc.text_hidden[tt], enc.text_mask[tt], enc.image_embeds[ii]).float()
    gap = (exact - logits[ii, tt]).abs().max().item()
    if gap > 1e-4:
        raise AssertionError(f"grouped and exact ITM logits differ by {gap}")
    temp = float(model.clamped_temp())
    return {"sims": enc.similarity(), "itm": logits, "img2txt": split.img2txt, "txt2img": split.txt2img, "temp": temp}


def rerank(sims: torch.Tensor, score: torch.Tensor, k: int) -> torch.Tensor:
    """`score` on each row's top k of `sims`, -inf elsewhere (as pipeline/retrieval/rerank.py)."""
    top = sims.topk(min(k, sims.shape[1]), dim=1).indices
    return torch.full_like(sims, -math.inf).scatter(1, top, score.gather(1, top))


def r1(d: dict, i2t: torch.Tensor, t2i: torch.Tensor) -> float:
    m = retrieval_metrics(i2t, t2i, d["img2txt"], d["txt2img"])
    return (m["txt_r1"] + m["img_r1"]) / 2


def within_topk_auc(sims: torch.Tensor, score: torch.Tensor, pos: torch.Tensor, k: int) -> float:
    top = sims.topk(k, dim=1).indices
    s, p = score.gather(1, top), pos.gather(1, top)
    keep = p.any(1) & (~p).any(1)
    s, p = s[keep], p[keep]
    right = ((s[:, :, None] > s[:, None, :]) & p[:, :, None] & ~p[:, None, :]).sum((1, 2)).float()
    return (right / (p.sum(1) * (~p).sum(1))).mean().item()


def report(name: str, d: dict, k_test: int, ks: tuple[int, ...]) -> None:
    sims, l1 = d["sims"], d["itm"][..., 1]
    logodds = l1 - d["itm"][..., 0]
    n_img, n_txt = sims.shape
    pos = torch.zeros(n_img, n_txt, dtype=torch.bool)
    pos[torch.as_tensor(d["txt2img"]), torch.arange(n_txt)] = True
    base = r1(d, sims, sims.T)
    print(f"== {name}: ITC R@1 {base:.2f}, ITM alone over the whole split {r1(d, l1, l1.T):.2f}, temp {d['temp']:.4f}")
    variants = {
        "itm": l1,
        "itm+itc": l1 + sims,
        "logodds": logodds,
        "logodds+itc": logodds + sims,
        "itm+itc/temp": l1 + sims / d["temp"],
    }
    for k in ks:
        deltas = [f"{v} {r1(d, rerank(sims, s, k), rerank(sims.T, s.T, k)) - base:+.2f}" for v, s in variants.items()]
        print(f"   k={k:3d} minus ITC: " + " | ".join(deltas))

    def hits(scores: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return p.gather(1, scores.argmax(1, keepdim=True)).squeeze(1).float()

    both = l1 + sims
    d_txt = hits(rerank(sims, both, k_test), pos) - hits(sims, pos)  # per image query
    d_img = hits(rerank(sims.T, both.T, k_test), pos.T) - hits(sims.T, pos.T)  # per caption query
    se = math.sqrt(d_txt.var() / n_img + d_img.var() / n_txt) / 2 * 100
    print(
        f"   k={k_test} ITM+ITC minus ITC: text {d_txt.mean() * 100:+.2f} image {d_img.mean() * 100:+.2f} "
        f"mean {(d_txt.mean() + d_img.mean()) * 50:+.2f} (SE {se:.2f}; top-1 changed for "
        f"{int((d_txt != 0).sum())}/{n_img} images, {int((d_img != 0).sum())}/{n_txt} captions)"
    )
    auc = {
        side: {n: within_topk_auc(s_, x, p_, k_test) for n, x in (("itc", s_), ("itm", m_))}
        for side, s_, m_, p_ in (("text", sims, l1, pos), ("image", sims.T, l1.T, pos.T))
    }
    print(
        f"   within-top{k_test} AUC: text retrieval itc {auc['text']['itc']:.3f} itm {auc['text']['itm']:.3f} | "
        f"image retrieval itc {auc['image']['itc']:.3f} itm {auc['image']['itm']:.3f}"
    )
    # per caption: P(match) of its image, of ITC's top-ranked wrong image and of a random wrong image
    txt2img, t = torch.as_tensor(d["txt2img"]), torch.arange(n_txt)
    prob = d["itm"].softmax(-1)[..., 1]
    hardest = sims.T.masked_fill(pos.T, -math.inf).argmax(1)
    g = torch.Generator().manual_seed(0)
    other = (txt2img + torch.randint(1, n_img, (n_txt,), generator=g)) % n_img
    pp, ph, pr = prob[txt2img, t], prob[hardest, t], prob[other, t]
    ce = -((pp.log().mean() + (1 - ph).log().mean() + (1 - pr).log().mean()) / 3).item()
    print(
        f"   P(match): own image {pp.mean():.3f}, ITC's hardest wrong image {ph.mean():.3f}, random wrong image "
        f"{pr.mean():.3f}; AUC own > hardest {(pp > ph).float().mean():.3f}, own > random {(pp > pr).float().mean():.3f}; "
        f"ITM loss on 1:1:1 of the three {ce:.3f} (2/3 ln 2 = 0.462 = random negatives told apart, hard ones a coin flip)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="albef pretrain output folders")
    p.add_argument("--data", type=Path, required=True, help="held-out split (an `albef prep` folder)")
    p.add_argument("--k_test", type=int, default=16)
    p.add_argument("--ks", default="2,4,8,16,32,64")
    args = p.parse_args()
    torch.set_num_threads(1)
    for run in args.runs:
        report(run.name, full_itm(run, args.data), args.k_test, tuple(int(k) for k in args.ks.split(",")))


if __name__ == "__main__":
    main()
