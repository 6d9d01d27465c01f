"""Where does shape get lost in the tiny ALBEF? Probes of a bench/tiny_learning.py run (issue 11).

ITM re-ranking of the tiny recipe stays within noise of ITC because ITC's top wrong image shares the
caption's colours but not its shapes (bench/itm_rerank_noise.py). This asks which stage drops shape, on
the held-out split of the run's synthetic data (a run saved with `--save`):

1. linear probes of the shape and the colour of the left (top) shape of two-shape scenes (multinomial
   logistic regression, L2 picked on a fifth of the train images) from the ViT's patch tokens
   (concatenated), its CLS token and the ITC embedding, for the trained model, and (--controls) the same
   architecture at random init (what the probe gets without training) and raw pixels (16x16 average);
2. MLM through the fusion layers: held-out captions with ONE shape (or colour) word masked, accuracy of
   the argmax over the shape (colour) words, with the caption's own image and with another image
   (the gap is what the image tells the fusion layers; the rest comes from the caption's other words);
3. swapped captions: per held-out caption, the same caption with its shape (colour) word replaced by
   another shape (colour): the share of captions whose own image scores them above the swapped one,
   by ITC cosine and by ITM match logit (0.5 = blind to that attribute).

    PYTHONPATH=. python bench/tiny_probe.py /tmp/learn/base_s0.pt /tmp/learn/vitd4_s0.pt

Data: /tmp/learn/data_<n_train>_<n_test>_<data_seed> as the run wrote it (its args are in the .json).
Prints one block per run; ~1 min per run on one core.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from tiny_learning import load_data  # noqa: E402

from data_prep.synthetic import COLORS, SHAPES  # noqa: E402
from model.albef import ALBEF, build_albef  # noqa: E402
from model.config import ALBEFConfig  # noqa: E402
from pipeline.config.loader import from_dict  # noqa: E402
from pipeline.data.text import build_tokenizer, bundled_vocab_path, tokenize  # noqa: E402
from pipeline.data.transforms import EvalTransform, normalize_images, open_image  # noqa: E402
from pipeline.runtime.io import torch_load_weights_only  # noqa: E402

WORDS = {"shape": list(SHAPES), "colour": list(COLORS)}


def load_run(path: Path) -> tuple[ALBEF, argparse.Namespace]:
    """The saved model (eval mode) and the args of the run that wrote it."""
    saved = torch_load_weights_only(path)
    model = build_albef(from_dict(ALBEFConfig, saved["config"], "config"))
    model.load_state_dict(saved["model"])
    args = json.loads(path.with_suffix(".json").read_text())["args"]
    return model.eval(), argparse.Namespace(**args)


def labels_of(captions: list[str]) -> tuple[int, int] | None:
    """(shape, colour) index of the left (or top) shape of a two-shape scene, else None.

    Read from a caption that names the shapes in scene order (all pair templates but "... to the right
    of / below ..."; 3 captions of 4 templates hold at least one). The held-out split is almost only
    two-shape scenes (single-shape captions are few, and the train split uses most of them)."""
    for c in captions:
        if "right of" in c or "below" in c:
            continue
        words = c.split()
        colours = [w for w in words if w in COLORS]
        shapes = [w for w in words if w in SHAPES]
        if len(colours) == 2 and len(shapes) == 2:
            return SHAPES.index(shapes[0]), list(COLORS).index(colours[0])
    return None


def labelled(split: list) -> list[tuple[str, tuple[int, int]]]:
    """The (image, (shape, colour)) rows of a split whose captions name a two-shape scene in order."""
    return [(d, lab) for d, captions in split if (lab := labels_of(captions)) is not None]


@torch.no_grad()
def image_features(model: ALBEF, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Feature sets of the probes, each [N, D]."""
    feats: dict[str, list[torch.Tensor]] = {}
    for s in range(0, images.shape[0], 256):
        embeds, itc = model.encode_image(images[s : s + 256])
        for name, f in (
            ("patches", embeds[:, 1:].flatten(1)),
            ("cls", embeds[:, 0]),
            ("itc", itc),
        ):
            feats.setdefault(name, []).append(f.float())
    return {k: torch.cat(v) for k, v in feats.items()}


def probe(x_tr: torch.Tensor, y_tr: torch.Tensor, x_te: torch.Tensor, y_te: torch.Tensor) -> float:
    """Test accuracy of an L2 logistic regression; L2 chosen on the last fifth of the train rows."""
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    x_tr, x_te = (x_tr - mu) / sd, (x_te - mu) / sd
    n_cls = int(y_tr.max()) + 1

    def fit(x: torch.Tensor, y: torch.Tensor, l2: float) -> torch.Tensor:
        w = torch.zeros(x.shape[1] + 1, n_cls, requires_grad=True)
        xb = F.pad(x, (0, 1), value=1.0)
        opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(xb @ w, y) + l2 * w[:-1].pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return w.detach()

    def acc(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
        return (F.pad(x, (0, 1), value=1.0) @ w).argmax(1).eq(y).float().mean().item()

    n_fit = x_tr.shape[0] * 4 // 5
    best = max(
        (1e-4, 1e-3, 1e-2, 1e-1), key=lambda l2: acc(fit(x_tr[:n_fit], y_tr[:n_fit], l2), x_tr[n_fit:], y_tr[n_fit:])
    )
    return acc(fit(x_tr, y_tr, best), x_te, y_te)


def probes(model: ALBEF, fresh: ALBEF | None, train: list, test: list, res: int) -> dict[str, float]:
    """Probe accuracies (%) of shape and colour per feature set; `fresh` = the same model at random init."""
    tf = EvalTransform(res)
    out = {}
    sets = []
    for split in (train, test):
        keep = labelled(split)
        images = normalize_images(torch.stack([tf(open_image(d)) for d, _ in keep]))
        y = torch.tensor([lab for _, lab in keep])  # [N, 2]: shape, colour
        feats = {f"trained {k}": v for k, v in image_features(model, images).items()}
        if fresh is not None:
            feats |= {f"init {k}": v for k, v in image_features(fresh, images).items()}
            feats["pixels 16x16"] = F.avg_pool2d(images, res // 16).flatten(1)
        sets.append((feats, y))
    (f_tr, y_tr), (f_te, y_te) = sets
    for name in f_tr:
        for j, attr in enumerate(("shape", "colour")):
            out[f"{name} {attr}"] = 100 * probe(f_tr[name], y_tr[:, j], f_te[name], y_te[:, j])
    return out


@torch.no_grad()
def mlm_and_swaps(model: ALBEF, test: list, res: int, seed: int = 0) -> dict[str, float]:
    """MLM accuracy on one masked shape/colour word (own vs other image) and the swapped-caption tests."""
    tok = build_tokenizer(bundled_vocab_path())
    rng = random.Random(seed)
    tf = EvalTransform(res)
    images = normalize_images(torch.stack([tf(open_image(d)) for d, _ in test]))
    img_embeds, img_feat = model.encode_image(images)
    rows: dict[str, list] = {"shape": [], "colour": []}  # (image index, caption words, word position)
    for i, (_, caps) in enumerate(test):
        for c in caps:
            words = c.split()
            for attr, vocab in WORDS.items():
                for pos, w in enumerate(words):
                    if w in vocab:
                        rows[attr].append((i, words, pos))
    out: dict[str, float] = {}
    n_img = len(test)
    for attr, vocab in WORDS.items():
        ids_of = tok.convert_tokens_to_ids(vocab)
        assert all(len(tok.tokenize(w)) == 1 for w in vocab), vocab  # one WordPiece each
        r = rows[attr]
        img_idx = torch.tensor([i for i, _, _ in r])
        other = (
            img_idx + torch.randint(1, n_img, img_idx.shape, generator=torch.Generator().manual_seed(seed))
        ) % n_img
        masked = [" ".join("[MASK]" if k == p else w for k, w in enumerate(ws)) for _, ws, p in r]
        truth = torch.tensor([vocab.index(ws[p]) for _, ws, p in r])
        swapped = []
        for _, ws, p in r:
            alt = rng.choice([v for v in vocab if v != ws[p]])
            swapped.append(" ".join(alt if k == p else w for k, w in enumerate(ws)))
        orig = [" ".join(ws) for _, ws, _ in r]
        ids, mask = tokenize(tok, masked, 30)
        mpos = ids.eq(tok.mask_token_id)
        assert int(mpos.sum()) == len(r)
        for which, idx in (("own", img_idx), ("other", other)):
            hits = []
            for s in range(0, len(r), 512):
                sl = slice(s, s + 512)
                hidden = model.text_encoder(ids[sl], mask[sl], image_embeds=img_embeds[idx[sl]], mode="full")
                logits = model.text_encoder.mlm_head(hidden[mpos[sl]])[:, ids_of]
                hits.append(logits.argmax(1).eq(truth[sl]))
            out[f"mlm {attr} {which} image"] = 100 * torch.cat(hits).float().mean().item()
        scores = {}
        for kind, texts in (("orig", orig), ("swap", swapped)):
            t_ids, t_mask = tokenize(tok, texts, 30)
            cos, itm = [], []
            for s in range(0, len(r), 512):
                sl = slice(s, s + 512)
                t_emb, t_feat = model.encode_text(t_ids[sl], t_mask[sl])
                cos.append((t_feat * img_feat[img_idx[sl]]).sum(1))
                itm.append(model.itm_logits(t_emb, t_mask[sl], img_embeds[img_idx[sl]])[:, 1])
            scores[kind] = (torch.cat(cos), torch.cat(itm))
        for j, score in enumerate(("itc", "itm")):
            out[f"swap {attr} {score}"] = 100 * (scores["orig"][j] > scores["swap"][j]).float().mean().item()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="<name>.pt files of bench/tiny_learning.py --save")
    p.add_argument("--skip_probes", action="store_true", help="MLM and swap tests only")
    p.add_argument("--controls", action="store_true", help="also probe the random-init model and pixels")
    a = p.parse_args()
    torch.set_num_threads(1)
    for path in a.runs:
        model, args = load_run(path)
        torch.manual_seed(args.seed)
        fresh = build_albef(model.config).eval() if a.controls else None
        train, test = load_data(args)
        res = {} if a.skip_probes else probes(model, fresh, train, test, args.image_res)
        res |= mlm_and_swaps(model, test, args.image_res)
        print(f"== {path.stem}", flush=True)
        for k, v in res.items():
            print(f"  {k:32s} {v:5.1f}", flush=True)


if __name__ == "__main__":
    main()
