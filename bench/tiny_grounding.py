"""Does the tiny grounding fine-tuning learn? A lean, measurable loop (no DeepSpeed, no loader
processes) over the pieces `albef finetune grounding` runs, for issue 14.

Uses the repo's real pieces: data_prep.synthetic_grounding (train images with one expression per
shape; held-out testA/testB images with the GT box and the shape boxes as proposals), the retrieval
model (model/retrieval.py: ITC with image-id positives + ITM, momentum_update() before / enqueue()
after each step), pipeline.data.transforms (the fine-tuning TrainTransform: crop scale 0.5-1 + flip +
RandAugment; EvalTransform for the held-out images), pipeline.train.schedule (lr_at, alpha_at),
pipeline.train.trainer.weight_decay_groups + torch AdamW, and the grounding evaluation of
pipeline/tasks/grounding.py (grounding_gradcams + score_ref: Grad-CAM of the ITM logit on the last
fusion layer's cross-attention, proposals ranked by map mass / area ** 0.5, hit at IoU >= 0.5).

--scene_steps N first trains N steps on whole-scene captions (scene_train.json: "a red circle, a blue
square and a green cross"), the model then fine-tunes on the expressions: a stand-in for
starting from `albef pretrain` on the same images (measured here without MLM).

    # the README's measurements (1,000 train images, 60 held-out; ~0.11 s/step on one core)
    B="python bench/tiny_grounding.py --n_train 1000 --n_test 60 --eval_every 100"
    PYTHONPATH=. $B --name m_full --steps 800 --itm_neg mixed      # from random weights
    PYTHONPATH=. $B --name r_full --steps 800 --itm_neg random
    PYTHONPATH=. $B --name scene_m --scene_steps 500 --steps 500 --itm_neg mixed
    PYTHONPATH=. $B --name scene_r --scene_steps 500 --steps 500 --itm_neg mixed --ft_itm_neg random
    PYTHONPATH=. python bench/tiny_grounding.py --help

Writes /tmp/ground/<name>.json (args, per-eval-point metrics) and prints one line per eval point:
train losses (mean since the last point), held-out grounding accuracy (chance = 1 / shapes per image),
ITM P(match(image, its expression) > match(image, another image's expression)).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.synthetic_grounding import write_synthetic_grounding  # noqa: E402
from model.config import ALBEFConfig  # noqa: E402
from model.heads.grounding import official_gradcam_blocks  # noqa: E402
from model.retrieval import build_retrieval  # noqa: E402
from pipeline.data.text import build_tokenizer, bundled_vocab_path, pre_caption, tokenize  # noqa: E402
from pipeline.data.transforms import EvalTransform, TrainTransform, normalize_images, open_image  # noqa: E402
from pipeline.tasks.grounding import GroundingEvalConfig, grounding_gradcams, score_ref  # noqa: E402
from pipeline.train.schedule import alpha_at, lr_at  # noqa: E402
from pipeline.train.trainer import weight_decay_groups  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--name", default="run")
    a("--out_dir", default="/tmp/ground")
    a("--seed", type=int, default=0)
    a("--data_seed", type=int, default=0)
    a("--n_train", type=int, default=600)
    a("--n_test", type=int, default=60, help="held-out images (half testA, half testB), 3 refs each")
    a("--shapes", type=int, default=3)
    a("--steps", type=int, default=600)
    a("--scene_steps", type=int, default=0, help="steps on whole-scene captions before --steps on expressions")
    a("--eval_every", type=int, default=100)
    a("--batch", type=int, default=32)
    a("--queue", type=int, default=64)
    a("--lr", type=float, default=3e-4)
    a("--ft_lr", type=float, default=None, help="LR of the expression phase after --scene_steps (default --lr)")
    a("--ft_itm_neg", default=None, choices=["hard", "random", "mixed"], help="expression phase (default --itm_neg)")
    a("--warmup_lr", type=float, default=1e-5)
    a("--warmup", type=int, default=10)
    a("--wd", type=float, default=0.02)
    a("--alpha", type=float, default=0.4)
    a("--alpha_ramp", type=int, default=60, help="steps")
    a("--itm_neg", default="mixed", choices=["hard", "random", "mixed"])
    a("--aug", default="full", choices=["full", "crop_flip", "none"])
    a("--crop_scale", type=float, default=0.5)
    a("--max_tokens", type=int, default=30)
    return p.parse_args()


def load_data(args: argparse.Namespace) -> tuple[list, list]:
    """train: [(jpeg bytes, [expression], [scene caption])]; test: [(jpeg bytes, [(expression, label)])]."""
    root = Path(args.out_dir) / f"data_{args.n_train}_{args.n_test}_{args.shapes}_{args.data_seed}"
    half = args.n_test // 2
    splits = {"train": args.n_train, "testA": half, "testB": args.n_test - half}
    synth = write_synthetic_grounding(root, splits=splits, seed=args.data_seed, shapes_per_image=args.shapes)
    refs = pickle.loads(synth.files["refs"].read_bytes())
    instances = json.loads(synth.files["instances"].read_text())
    dets = json.loads(synth.files["dets"].read_text())
    scenes = {
        e["url"].split("/")[-1]: [pre_caption(c) for c in e["caption"]]
        for e in json.loads(synth.files["scene_json"].read_text())
    }
    hw = {im["id"]: [im["height"], im["width"]] for im in instances["images"]}
    by_image: dict[int, list] = {}
    for ref in refs:
        by_image.setdefault(ref["image_id"], []).append(ref)
    train, test = [], []
    for image_id, rs in by_image.items():
        data = (synth.image_root / "train2014" / rs[0]["file_name"]).read_bytes()
        texts = [pre_caption(s["raw"]) for r in rs for s in r["sentences"]]
        if rs[0]["split"] == "train":
            train.append((data, texts, scenes[rs[0]["file_name"]]))
        else:
            labels = [
                {"ref_id": r["ref_id"], "split": r["split"], "box": synth.boxes[r["ref_id"]],
                 "proposals": dets[str(image_id)], "image_hw": hw[image_id]}
                for r in rs for _ in r["sentences"]
            ]  # fmt: skip
            test.append((data, list(zip(texts, labels))))
    return train, test


class TrainStream:
    """Shuffled epochs over the train images; one random expression per image per draw (as the loader)."""

    def __init__(self, train: list, args: argparse.Namespace) -> None:
        self.train, self.batch = train, args.batch
        self.rng = random.Random(args.seed)
        self.order: list[int] = []
        self.tf = TrainTransform(64, (args.crop_scale, 1.0), randaugment=(args.aug == "full"))
        self.aug = args.aug
        self.eval_tf = EvalTransform(64)

    def next(self, scene: bool) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        imgs, caps, idx = [], [], []
        for _ in range(self.batch):
            if not self.order:
                self.order = list(range(len(self.train)))
                self.rng.shuffle(self.order)
            i = self.order.pop()
            data, texts, scene_caps = self.train[i]
            img = open_image(data)
            imgs.append(self.eval_tf(img) if self.aug == "none" else self.tf(img, self.rng))
            caps.append(self.rng.choice(scene_caps if scene else texts))
            idx.append(i)
        return normalize_images(torch.stack(imgs)), caps, torch.tensor(idx)


def evaluate(model, tok, test: list, blocks: dict[str, tuple[str, int]]) -> dict:
    """Held-out grounding accuracy (the pipeline's Grad-CAM + ranking) per named (mode, block), and ITM
    discriminability: P(match logit of (image, its expression) > that of (another image, it))."""
    cfg = GroundingEvalConfig()
    tf = EvalTransform(64)
    images = normalize_images(torch.stack([tf(open_image(d)) for d, _ in test]))
    refs = [(i, text, label) for i, (_, rs) in enumerate(test) for text, label in rs]
    was = model.training
    model.eval()
    hits: dict[str, dict[str, list[bool]]] = {name: {} for name in blocks}
    pos, neg = [], []
    g = torch.Generator().manual_seed(0)
    for s in range(0, len(refs), 32):
        chunk = refs[s : s + 32]
        ids, mask = tokenize(tok, [t for _, t, _ in chunk], 512, "longest")
        index = torch.tensor([i for i, _, _ in chunk])
        for name, (mode, block) in blocks.items():
            cams = grounding_gradcams(model, images[index], ids, mask, mode, block)  # type: ignore[arg-type]
            for (_, _, label), cam in zip(chunk, cams):
                r = score_ref(cam, label, cfg)
                hits[name].setdefault(label["split"], []).append((r.iou or 0.0) >= 0.5)
        with torch.no_grad():
            other = (index + torch.randint(1, len(test), index.shape, generator=g)) % len(test)
            img_embeds, _ = model.encode_image(images[index])
            other_embeds, _ = model.encode_image(images[other])
            txt, _ = model.encode_text(ids, mask)
            pos.append(model.itm_logits(txt, mask, img_embeds)[:, 1])
            neg.append(model.itm_logits(txt, mask, other_embeds)[:, 1])
    model.train(was)
    sp, sn = torch.cat(pos), torch.cat(neg)
    out: dict = {"itm_auc_random": (sp > sn).float().mean().item(), "n_refs": len(refs)}
    for name, per_split in hits.items():
        every = [h for v in per_split.values() for h in v]
        out[f"acc_{name}"] = 100.0 * sum(every) / len(every)
        for split, v in sorted(per_split.items()):
            out[f"acc_{name}_{split}"] = 100.0 * sum(v) / len(v)
    return out


def main() -> None:
    args = parse()
    torch.set_num_threads(1)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    train, test = load_data(args)
    tok = build_tokenizer(bundled_vocab_path())
    cfg = ALBEFConfig.tiny(image_size=64, embed_dim=32, queue_size=args.queue, momentum_dropout=False,
                           itm_negatives=args.itm_neg, queue_seed=args.seed)  # fmt: skip
    model = build_retrieval(cfg)
    model.train()
    official = official_gradcam_blocks(cfg)
    # itm: the official block (the last fusion layer of the tiny model) and the first fusion layer; itc
    blocks = {
        "itm": ("itm", official["itm"]),
        "itm_b2": ("itm", cfg.text.fusion_layer),
        "itc": ("itc", official["itc"]),
    }
    opt = torch.optim.AdamW(weight_decay_groups(model, args.wd), lr=args.lr)
    stream = TrainStream(train, args)
    total = args.scene_steps + args.steps
    eval_steps = set(range(args.eval_every, total + 1, args.eval_every)) | {0, args.scene_steps, total}
    history, window, t_train = [], [], 0.0
    print(f"[{args.name}] {vars(args)} chance {100 / args.shapes:.1f}", flush=True)
    for step in range(total + 1):
        if step in eval_steps:
            te = time.perf_counter()
            ev = evaluate(model, tok, test, blocks)
            rec = {"step": step, "s_per_step": t_train / max(step, 1), "eval_s": time.perf_counter() - te}
            for key in {k for w in window for k in w}:
                rec[key] = sum(w[key] for w in window) / len(window)
            rec.update(ev)
            history.append(rec)
            window = []
            print(
                f"[{args.name}] step {step:4d} itc {rec.get('itc', float('nan')):.3f} itm {rec.get('itm', float('nan')):.3f} "
                f"itc_acc {rec.get('itc_acc', float('nan')):.3f} temp {rec.get('temp', float('nan')):.4f} | "
                f"ground acc itm {ev['acc_itm']:.1f} (A {ev['acc_itm_testA']:.1f} B {ev['acc_itm_testB']:.1f}) "
                f"itm_b2 {ev['acc_itm_b2']:.1f} itc {ev['acc_itc']:.1f} (n {ev['n_refs']}) "
                f"itm auc {ev['itm_auc_random']:.2f} | {rec['s_per_step']:.3f} s/step eval {rec['eval_s']:.1f}s",
                flush=True,
            )
        if step == total:
            break
        t0 = time.perf_counter()
        phase_step = step if step < args.scene_steps else step - args.scene_steps
        peak = args.lr if step < args.scene_steps or args.ft_lr is None else args.ft_lr
        if step == args.scene_steps and args.ft_itm_neg is not None:
            model.config = dataclasses.replace(model.config, itm_negatives=args.ft_itm_neg)
        lr = lr_at(phase_step, lr=peak, warmup_lr=args.warmup_lr, min_lr=peak, warmup_steps=args.warmup,
                   total_steps=total)  # fmt: skip
        for group in opt.param_groups:
            group["lr"] = lr
        alpha = alpha_at(step, alpha=args.alpha, ramp_steps=args.alpha_ramp)
        img, caps, idx = stream.next(scene=step < args.scene_steps)
        ids, mask = tokenize(tok, caps, args.max_tokens)
        model.momentum_update()
        out = model(img, ids, mask, idx, alpha)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        model.enqueue(**out.queue_update())
        t_train += time.perf_counter() - t0
        window.append({"itc": out.itc_loss.item(), "itm": out.itm_loss.item(), "itc_acc": out.itc_acc.item(),
                       "temp": out.temp.item()})  # fmt: skip
    (out_dir / f"{args.name}.json").write_text(json.dumps({"args": vars(args), "history": history}, indent=1))


if __name__ == "__main__":
    main()
