"""Does the tiny ALBEF learn? A lean, measurable pretraining loop (no DeepSpeed) for issue 11.

Uses the repo's real pieces: data_prep.synthetic (train + held-out test split whose captions/scenes
differ, as pipeline/demo.py builds them), pipeline.transforms (TrainTransform = the real ALBEF train
transform: RandomResizedCrop(0.2-1) + flip + RandAugment, or a cheaper subset; EvalTransform for test),
pipeline.text (pre_caption, bundled bert-base-uncased vocab, tokenize), model.masking.mask_tokens,
model.albef.build_albef(ALBEFConfig.tiny(...)) with momentum_update() before / enqueue() after each
step, pipeline.schedule (lr_at, alpha_at), pipeline.trainer.weight_decay_groups + torch AdamW, and
pipeline.retrieval_metrics for zero-shot retrieval on the held-out split (ITC, ITM re-ranking of the
top k, ITM+ITC).

JPEG bytes are held in memory; each step decodes the batch (64 px, ~0.1 ms/image) and augments it.

    PYTHONPATH=. python bench/tiny_learning.py --name old --steps 400 --patch 16 --init bert  # the old recipe
    # the recipe of pipeline/configs/pretrain_tiny_cpu.yaml (its 3-seed curves: --seed 0/1/2)
    PYTHONPATH=. python bench/tiny_learning.py --name recipe_s0 --seed 0 --steps 600 --eval_every 100 \
        --batch 32 --queue 64 --lr 3e-4 --const_lr --itm_neg mixed
    python bench/tiny_learning_table.py --curve /tmp/learn/recipe_s*.json
    PYTHONPATH=. python bench/tiny_learning.py --help

The model is ALBEFConfig.tiny (8-px patches, fan-in init; --patch / --init undo them); the other defaults
are the old shipped recipe (batch 8, lr 1e-3 cosine, queue 256, hard ITM negatives).

Writes /tmp/learn/<name>.json (args, per-eval-point metrics) and prints one line per eval point.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.synthetic import write_synthetic  # noqa: E402
from model.albef import build_albef  # noqa: E402
from model.config import ALBEFConfig  # noqa: E402
from model.masking import mask_tokens  # noqa: E402
from pipeline.data.text import build_tokenizer, bundled_vocab_path, pre_caption, tokenize  # noqa: E402
from pipeline.data.transforms import EvalTransform, TrainTransform, normalize_images, open_image  # noqa: E402
from pipeline.retrieval.metrics import chance_metrics, retrieval_metrics  # noqa: E402
from pipeline.train.schedule import alpha_at, lr_at  # noqa: E402
from pipeline.train.trainer import weight_decay_groups  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--name", default="run")
    a("--out_dir", default="/tmp/learn")
    a("--seed", type=int, default=0)
    a("--data_seed", type=int, default=0)
    a("--n_train", type=int, default=2000)
    a("--n_test", type=int, default=200)
    a("--steps", type=int, default=400)
    a("--eval_every", type=int, default=50)
    a("--eval_at", default="", help="extra comma-separated eval steps (e.g. 100,300)")
    # shipped recipe = pipeline/configs/pretrain_tiny_cpu.yaml
    a("--batch", type=int, default=8)
    a("--image_res", type=int, default=64)
    a("--patch", type=int, default=8)
    a("--vit_width", type=int, default=64, help="ViT width (the fusion layers' encoder_width follows it)")
    a("--vit_depth", type=int, default=2, help="ViT blocks")
    a("--vit_heads", type=int, default=2, help="ViT attention heads")
    a("--max_tokens", type=int, default=25)
    a("--embed_dim", type=int, default=32)
    a("--queue", type=int, default=256)
    a("--temp", type=float, default=0.07)
    a("--temp_lr_mult", type=float, default=1.0, help="0 = temperature frozen (not a config field)")
    a("--momentum", type=float, default=0.995)
    a("--alpha", type=float, default=0.4)
    a("--alpha_ramp_epochs", type=float, default=1.0)
    a("--lr", type=float, default=1e-3)
    a("--warmup_lr", type=float, default=1e-5)
    a("--min_lr", type=float, default=1e-5)
    a("--warmup", type=int, default=10)
    a("--const_lr", action="store_true", help="no cosine decay after warm-up")
    a("--wd", type=float, default=0.02)
    a("--w_itc", type=float, default=1.0)
    a("--w_itm", type=float, default=1.0)
    a("--w_mlm", type=float, default=1.0)
    a("--aug", default="full", choices=["full", "crop_flip", "none"])
    a("--crop_scale", type=float, default=0.2)
    a("--hflip", type=int, default=1, help="0 = no horizontal flip in crop_flip / full")
    a("--queue_warm", action="store_true", help="fill the queue with momentum features of real batches at step 0")
    a(
        "--init",
        default="fanin",
        help="fanin = the tiny preset (weight_init fan_in in both towers); bert = HF BERT / "
        "timm std 0.02; a float = that std for the Linear weights of --init_towers (not a config field)",
    )
    a("--init_towers", default="text,vision", help="which towers --init applies to")
    a(
        "--itm_neg",
        default="hard",
        choices=["hard", "random", "mixed", "hard_after"],
        help="ITM negatives: hard (ALBEF: drawn by ITC similarity), random (uniform in-batch), mixed (each "
        "one hard or uniform by a coin; the shipped recipe), hard_after (random for the first "
        "--itm_random_steps steps, then hard)",
    )
    a("--itm_random_steps", type=int, default=0)
    a("--fusion_lr_mult", type=float, default=1.0, help="LR multiplier of the fusion layers + itm_head")
    a("--k_test", type=int, default=16)
    a("--grad_norms", action="store_true", help="per-loss grad norms at eval points (3 extra backwards)")
    a("--save", action="store_true", help="write <out_dir>/<name>.pt (config + weights) for bench/tiny_probe.py")
    return p.parse_args()


# ------------------------------------------------------------------------------------------------ data
def load_data(args: argparse.Namespace) -> tuple[list, list]:
    root = Path(args.out_dir) / f"data_{args.n_train}_{args.n_test}_{args.data_seed}"
    done = root / "done"
    if not done.exists():
        write_synthetic(root, n_train=args.n_train, n_test=args.n_test, seed=args.data_seed, image_size=64,
                        captions_per_image=3)  # fmt: skip
        done.write_text("ok")
    meta = json.loads((root / "dataset_synthetic.json").read_text())
    splits: dict[str, list] = {"train": [], "test": []}
    for im in meta["images"]:
        if im["split"] in splits:
            data = (root / im["filepath"] / im["filename"]).read_bytes()
            splits[im["split"]].append((data, [pre_caption(s["raw"]) for s in im["sentences"]]))
    return splits["train"], splits["test"]


class TrainStream:
    """Shuffled epochs over the train images; one random caption per image per draw (as the loader)."""

    def __init__(
        self, train: list, batch: int, res: int, aug: str, scale: float, seed: int, hflip: bool = True
    ) -> None:
        self.train, self.batch = train, batch
        self.rng = random.Random(seed)
        self.order: list[int] = []
        self.tf = TrainTransform(res, (scale, 1.0), randaugment=(aug == "full"), hflip=hflip)
        self.aug = aug
        self.eval_tf = EvalTransform(res)

    def next(self) -> tuple[torch.Tensor, list[str]]:
        imgs, caps = [], []
        for _ in range(self.batch):
            if not self.order:
                self.order = list(range(len(self.train)))
                self.rng.shuffle(self.order)
            data, captions = self.train[self.order.pop()]
            img = open_image(data)
            t = self.eval_tf(img) if self.aug == "none" else self.tf(img, self.rng)
            imgs.append(t)
            caps.append(self.rng.choice(captions))
        return normalize_images(torch.stack(imgs)), caps


# ------------------------------------------------------------------------------------------------ eval
@torch.no_grad()
def evaluate(model, tok, test: list, res: int, k: int) -> dict:
    model.eval()
    tf = EvalTransform(res)
    images = normalize_images(torch.stack([tf(open_image(d)) for d, _ in test]))
    texts, txt2img, img2txt = [], [], []
    for i, (_, caps) in enumerate(test):
        img2txt.append(list(range(len(texts), len(texts) + len(caps))))
        for c in caps:
            texts.append(c)
            txt2img.append(i)
    ids, mask = tokenize(tok, texts, 30)
    img_embeds, img_feat = model.encode_image(images)
    txt_hidden, txt_feat = model.encode_text(ids, mask)
    sims = img_feat @ txt_feat.t()  # [N_img, N_txt]
    out: dict = {}
    itc = retrieval_metrics(sims, sims.t(), img2txt, txt2img)
    out["itc_txt_r1"], out["itc_img_r1"] = itc["txt_r1"], itc["img_r1"]
    out["itc_txt_r5"], out["itc_img_r5"] = itc["txt_r5"], itc["img_r5"]

    def itm_scores(img_idx: torch.Tensor, txt_idx: torch.Tensor) -> torch.Tensor:
        scores = []
        for s in range(0, img_idx.numel(), 2048):
            ii, tt = img_idx[s : s + 2048], txt_idx[s : s + 2048]
            scores.append(model.itm_logits(txt_hidden[tt], mask[tt], img_embeds[ii])[:, 1])
        return torch.cat(scores)

    # ITM re-ranking of the top k (official score: the ITM "match" logit; LAVIS: + ITC cosine)
    mats = {}
    for side, s in (("i2t", sims), ("t2i", sims.t())):
        topv, topi = s.topk(min(k, s.shape[1]), dim=1)
        q = torch.arange(s.shape[0]).repeat_interleave(topi.shape[1])
        c = topi.reshape(-1)
        img_idx, txt_idx = (q, c) if side == "i2t" else (c, q)
        itm = itm_scores(img_idx, txt_idx).view_as(topv)
        m_itm = torch.full_like(s, -math.inf).scatter(1, topi, itm)
        m_both = torch.full_like(s, -math.inf).scatter(1, topi, itm + topv)
        mats[side] = (m_itm, m_both)
    r_itm = retrieval_metrics(mats["i2t"][0], mats["t2i"][0], img2txt, txt2img)
    r_both = retrieval_metrics(mats["i2t"][1], mats["t2i"][1], img2txt, txt2img)
    out["itm_txt_r1"], out["itm_img_r1"] = r_itm["txt_r1"], r_itm["img_r1"]
    out["itmitc_txt_r1"], out["itmitc_img_r1"] = r_both["txt_r1"], r_both["img_r1"]
    # ITM discriminability: P(ITM(pos) > ITM(random other image)) over all captions (AUC-like)
    t_all = torch.arange(len(texts))
    pos_img = torch.tensor(txt2img)
    g = torch.Generator().manual_seed(0)
    neg_img = (pos_img + torch.randint(1, len(test), (len(texts),), generator=g)) % len(test)
    sp, sn = itm_scores(pos_img, t_all), itm_scores(neg_img, t_all)
    out["itm_auc_random"] = (sp > sn).float().mean().item()
    # hard: the top ITC-ranked wrong image
    hard = sims.t().masked_fill(F.one_hot(pos_img, len(test)).bool(), -math.inf).argmax(1)
    out["itm_auc_hard"] = (sp > itm_scores(hard, t_all)).float().mean().item()

    # collapse indicators: mean off-diagonal cosine
    def mean_cos(f: torch.Tensor) -> float:
        n = f.shape[0]
        g_ = f @ f.t()
        return ((g_.sum() - g_.diag().sum()) / (n * n - n)).item()

    out["cos_img"], out["cos_txt"] = mean_cos(img_feat), mean_cos(txt_feat)
    out["cos_pos"] = (img_feat[pos_img] * txt_feat).sum(1).mean().item()
    ch = chance_metrics(img2txt, len(texts))
    out["chance_txt_r1"], out["chance_img_r1"] = ch["txt_r1"], ch["img_r1"]
    model.train()
    return out


def grad_norms(model, out, groups: dict) -> dict:
    res = {}
    for lname in ("itc_loss", "itm_loss", "mlm_loss"):
        loss = getattr(out, lname)
        for gname, params in groups.items():
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            sq = sum(float(g.pow(2).sum()) for g in grads if g is not None)
            res[f"g_{lname[:3]}_{gname}"] = math.sqrt(sq)
    return res


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    args = parse()
    torch.set_num_threads(1)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    train, test = load_data(args)
    tok = build_tokenizer(bundled_vocab_path())
    special = sorted({tok.pad_token_id, tok.cls_token_id, tok.sep_token_id})

    cfg = ALBEFConfig.tiny(image_size=args.image_res, embed_dim=args.embed_dim, queue_size=args.queue,
                           temp=args.temp, momentum=args.momentum, queue_seed=args.seed)  # fmt: skip
    # the tiny preset is 8-px patches + fan-in init (model/config.py); --patch / --init undo either
    if args.patch != cfg.vision.patch_size:
        cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, patch_size=args.patch))
    vit = {"width": args.vit_width, "depth": args.vit_depth, "num_heads": args.vit_heads}
    if any(getattr(cfg.vision, k) != v for k, v in vit.items()):  # a bigger/deeper ViT than the preset's
        cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, **vit),
                                  text=dataclasses.replace(cfg.text, encoder_width=args.vit_width))  # fmt: skip
    if args.init == "bert":
        cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, weight_init="timm"),
                                  text=dataclasses.replace(cfg.text, weight_init="bert"))  # fmt: skip
    if args.itm_neg in ("random", "mixed"):
        cfg = dataclasses.replace(cfg, itm_negatives=args.itm_neg)
    model = build_albef(cfg)
    if args.init not in ("bert", "fanin"):  # a fixed std for every Linear weight of both towers
        for name in args.init_towers.split(","):
            for m in {"text": model.text_encoder, "vision": model.visual_encoder}[name].modules():
                if isinstance(m, torch.nn.Linear):
                    torch.nn.init.normal_(m.weight, std=float(args.init))
        model.copy_params()  # momentum twins <- the re-initialised weights
    model.train()
    groups = weight_decay_groups(model, args.wd)
    if args.temp_lr_mult != 1.0:  # temperature in its own group (lr x mult; 0 = frozen)
        for g in groups:
            g["params"] = [p for p in g["params"] if p is not model.temp]
        groups.append({"params": [model.temp], "weight_decay": 0.0, "name": "temp"})
    if args.fusion_lr_mult != 1.0:  # fusion layers + itm_head in their own groups (lr x mult)
        fl_ = cfg.text.fusion_layer
        fus = [p for layer in model.text_encoder.encoder.layer[fl_:] for p in layer.parameters()]
        fus += list(model.itm_head.parameters())
        fus_ids = {id(p) for p in fus}
        for g in groups:
            g["params"] = [p for p in g["params"] if id(p) not in fus_ids]
        groups.append({"params": [p for p in fus if p.ndim > 1], "weight_decay": args.wd, "name": "fus"})
        groups.append({"params": [p for p in fus if p.ndim <= 1], "weight_decay": 0.0, "name": "fus_nd"})
    for g in groups:
        g["lr_mult"] = {"temp": args.temp_lr_mult, "fus": args.fusion_lr_mult, "fus_nd": args.fusion_lr_mult}.get(
            g["name"], 1.0
        )
    opt = torch.optim.AdamW(groups, lr=args.lr)
    stream = TrainStream(train, args.batch, args.image_res, args.aug, args.crop_scale, args.seed, bool(args.hflip))
    ramp = round(args.alpha_ramp_epochs * len(train) / args.batch)
    fl = cfg.text.fusion_layer
    gn_groups = {
        "vis": list(model.visual_encoder.parameters()) + list(model.vision_proj.parameters()),
        "txt": list(model.text_encoder.embeddings.parameters())
        + [p for layer in model.text_encoder.encoder.layer[:fl] for p in layer.parameters()]
        + list(model.text_proj.parameters()),
        "fus": [p for layer in model.text_encoder.encoder.layer[fl:] for p in layer.parameters()],
    }

    if args.queue_warm:  # queue <- momentum features of real (augmented) training batches
        with torch.no_grad():
            for _ in range(args.queue // args.batch):
                img, caps = stream.next()
                ids, mask = tokenize(tok, caps, args.max_tokens)
                model.enqueue(model.encode_image_m(img)[1], model.encode_text_m(ids, mask)[1])

    eval_steps = set(range(args.eval_every, args.steps + 1, args.eval_every)) | {0, args.steps}
    eval_steps |= {int(s) for s in args.eval_at.split(",") if s}
    history, window = [], []
    t_train = 0.0
    print(f"[{args.name}] {vars(args)}", flush=True)
    for step in range(args.steps + 1):
        if step in eval_steps:
            te = time.perf_counter()
            ev = evaluate(model, tok, test, args.image_res, args.k_test)
            rec = {"step": step, "s_per_step": t_train / max(step, 1), "eval_s": time.perf_counter() - te}
            if window:
                for key in {k for w in window for k in w}:
                    vals = [w[key] for w in window if key in w]
                    rec[key] = sum(vals) / len(vals)
            rec.update(ev)
            history.append(rec)
            window = []
            print(
                f"[{args.name}] step {step:4d} itc {rec.get('itc', float('nan')):.3f} itm {rec.get('itm', float('nan')):.3f} "
                f"mlm {rec.get('mlm', float('nan')):.3f} acc {rec.get('itc_acc', float('nan')):.3f} "
                f"itmacc {rec.get('itm_acc', float('nan')):.2f} negu {rec.get('neg_uniq', float('nan')):.2f} temp {rec.get('temp', args.temp):.4f} | "
                f"R@1 txt itc {ev['itc_txt_r1']:.1f} itm {ev['itm_txt_r1']:.1f} it+ {ev['itmitc_txt_r1']:.1f} "
                f"img itc {ev['itc_img_r1']:.1f} itm {ev['itm_img_r1']:.1f} it+ {ev['itmitc_img_r1']:.1f} "
                f"(chance {ev['chance_txt_r1']:.2f}/{ev['chance_img_r1']:.2f}) | auc rnd {ev['itm_auc_random']:.2f} "
                f"hard {ev['itm_auc_hard']:.2f} | cos img {ev['cos_img']:.4f} txt {ev['cos_txt']:.4f} pos {ev['cos_pos']:.2f}"
                + ("".join(f" {k} {v:.3g}" for k, v in rec.items() if k.startswith("g_") or k == "qmass"))
                + f" | {rec['s_per_step']:.3f} s/step",
                flush=True,
            )
        if step == args.steps:
            break
        t0 = time.perf_counter()
        lr = (lr_at(step, lr=args.lr, warmup_lr=args.warmup_lr, min_lr=args.min_lr, warmup_steps=args.warmup,
                    total_steps=args.steps if not args.const_lr else 0))  # fmt: skip
        if args.const_lr and step >= args.warmup:
            lr = args.lr
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_mult"]
        alpha = alpha_at(step, alpha=args.alpha, ramp_steps=ramp)
        img, caps = stream.next()
        ids, mask = tokenize(tok, caps, args.max_tokens)
        mlm_ids, mlm_labels = mask_tokens(ids, vocab_size=tok.vocab_size, mask_token_id=tok.mask_token_id,
                                          special_token_ids=special, probability=cfg.mlm_probability)  # fmt: skip
        model.momentum_update()
        negs = {}
        if args.itm_neg == "hard_after" and step < args.itm_random_steps:  # ("random" is the config field)
            b_ = img.shape[0]  # uniform over the other in-batch items (never the positive)
            negs = {"neg_image_idx": (torch.arange(b_) + torch.randint(1, b_, (b_,))) % b_,
                    "neg_text_idx": (torch.arange(b_) + torch.randint(1, b_, (b_,))) % b_}  # fmt: skip
        out = model(img, ids, mask, mlm_ids, mlm_labels, alpha, **negs)
        loss = args.w_itc * out.itc_loss + args.w_itm * out.itm_loss + args.w_mlm * out.mlm_loss
        extra = {}
        if args.grad_norms and (step + 1) in eval_steps:
            extra = grad_norms(model, out, gn_groups)
            with torch.no_grad():  # softmax mass of the i2t ITC denominator on queue entries
                s = model.encode_image(img)[1] @ torch.cat([out.text_feat_m.t(), model.text_queue], 1) / out.temp
                extra["qmass"] = F.softmax(s, 1)[:, args.batch :].sum(1).mean().item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.enqueue(out.image_feat_m, out.text_feat_m)
        t_train += time.perf_counter() - t0
        window.append({"itc": out.itc_loss.item(), "itm": out.itm_loss.item(), "mlm": out.mlm_loss.item(),
                       "itc_acc": out.itc_acc.item(), "itm_acc": out.itm_acc.item(), "temp": out.temp.item(),
                       "alpha": alpha, "lr": lr, **extra,
                       # distinct images / texts among the B ITM negatives (uniform draws: ~0.64 at B=32)
                       "neg_uniq": (out.neg_image_idx.unique().numel() + out.neg_text_idx.unique().numel())
                       / (2 * img.shape[0])})  # fmt: skip
    if args.save:
        torch.save({"config": cfg.to_dict(), "model": model.state_dict()}, out_dir / f"{args.name}.pt")
    (out_dir / f"{args.name}.json").write_text(json.dumps({"args": vars(args), "history": history}, indent=1))


if __name__ == "__main__":
    main()
