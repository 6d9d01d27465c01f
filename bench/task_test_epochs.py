"""How many fine-tuning epochs the slow task tests need: their own runs over seeds, read epoch by epoch.

tests/pipeline/stages/test_{ve,vqa,nlvr}_stages.py fine-tune a tiny model for a few epochs and then
evaluate the `best` checkpoint on the split they validate on. The tiny configs keep the LR constant
and nothing else depends on the run length, so a run of E epochs is the first E epochs of a longer one;
and the evaluation of `best` after E epochs is the best validation accuracy of those E epochs (same
model, same split). One long run per seed therefore gives every shorter test's numbers: per epoch,
the validation accuracy, the best so far, and the test's loss statistic (mean of the first K logged
training losses minus the mean of the last K up to that epoch).

`retrieval` (tests/pipeline/stages/test_finetune_retrieval.py) validates on another split than it tests
on: there every epoch's checkpoint is kept and evaluated on the test split, and the line of epoch E shows
the test's margins for the `best` of the first E epochs (r_mean / chance, R@10 minus chance, worst score).

    PYTHONPATH=. python bench/task_test_epochs.py --workdir /tmp/task_epochs ve:0 ve:1 ve:2 nlvr:0 retrieval:0

Each argument is TASK:SEED (train.seed; the data, the initial checkpoint and, for nlvr, the TA run are
the test's own, seed 0). Prints one line per run and epoch; the runs stay under WORKDIR.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests" / "pipeline")]

from pipeline_testutils import (  # noqa: E402
    make_synthetic_splits,
    run_cli_logged,
    tb_scalars,
    tiny_pretrain_checkpoint,
    write_split,
)

# task -> (epochs the test ran before this change, training-loss scalar, K of the test's loss statistic)
TASKS = {"ve": (4, "train/loss_cls", 5), "vqa": (3, "train/loss_vqa", 5), "nlvr": (4, "train/loss_cls", 4)}


def prepare(task: str, root: Path) -> tuple[list[str], Path]:
    """The test's data through `albef prep` (once per workdir); returns the fine-tuning args and checkpoint."""
    common = ["--processes=1", "--threads=4"]
    if task == "ve":
        from data_prep.synthetic_ve import write_synthetic_ve

        synth = write_synthetic_ve(root / "raw", splits={"train": 200, "heldout": 40}, image_size=64, per_label=2)
        inputs, source, extra = synth.jsonl, "snli_ve", ["--image_root", str(synth.image_root), "--image_size=64",
                                                         "--samples_per_shard=64"]  # fmt: skip
    elif task == "vqa":
        from data_prep.synthetic_vqa import write_synthetic_vqa

        synth = write_synthetic_vqa(root / "raw", splits={"train": 300, "heldout": 50}, image_size=64, per_image=4)
        inputs, source = synth.questions, "vqa"
        extra = ["--image_root", str(synth.image_root), "--image_size=64", "--samples_per_shard=100"]
    else:
        from data_prep.synthetic import SyntheticImage
        from data_prep.synthetic_nlvr import write_synthetic_nlvr

        synth = write_synthetic_nlvr(root / "raw", splits={"train": 300, "heldout": 60}, image_size=32)
        inputs, source = synth.jsonl, "nlvr2"
        extra = ["--image_root", str(synth.image_root), "--image_size=32", "--samples_per_shard=256"]
    prep = {}
    for split in ("train", "heldout"):
        prep[split] = root / f"{task}_{split}"
        answers = ["--annotations", str(synth.annotations[split])] if task == "vqa" else []
        run_cli_logged(["prep", source, "--input", str(inputs[split]), *answers, "--output", str(prep[split]),
                        *extra, *common], root / f"prep_{split}.log")  # fmt: skip
    checkpoint = tiny_pretrain_checkpoint(root / "init.pth")
    args = [f"--data.train=[{prep['train']}]", f"--data.val={prep['heldout']}"]
    if task == "nlvr":  # the test's ta_run fixture
        images = [SyntheticImage("train", str(p.relative_to(synth.image_root)), p.stem, caps, ())
                  for p, caps in synth.image_captions["train"]]  # fmt: skip
        shards = write_split(root / "captions", images, synth.image_root, "train")
        run_cli_logged(["pretrain", "--config", "nlvr_ta_tiny_cpu", "--checkpoint", str(checkpoint), "--output_dir",
                        str(root / "ta"), f"--data.train=[{shards}]", "--model.image_res=32",
                        "--logging.progress_bar=off"], root / "ta.log")  # fmt: skip
        checkpoint = root / "ta"
        args.append("--model.image_res=32")
    return args, checkpoint


def retrieval(root: Path, seed: str) -> None:
    """The retrieval test's pretrain (once) and fine-tuning (seed), each epoch's checkpoint on its test split."""
    if not (root / "data" / "test").exists():
        make_synthetic_splits(root / "data", n_train=256, n_val=32, n_test=64, image_size=64)
    data, pre, run = root / "data", root / "pre", root / f"s{seed}"
    if not (pre / "checkpoints" / "latest").exists():
        run_cli_logged(["pretrain", "--config", "pretrain_tiny_cpu", "--output_dir", str(pre),
                        f"--data.train=[{data / 'train'}]", "--train.max_steps=40", "--train.save_every_steps=40",
                        "--model.queue_size=32", "--logging.progress_bar=off"], root / "pre.log")  # fmt: skip
    run_cli_logged(["finetune", "retrieval", "--config", "retrieval_tiny_cpu", "--checkpoint", str(pre),
                    "--output_dir", str(run), f"--data.train=[{data / 'train'}]", f"--data.val={data / 'val'}",
                    "--data.samples_per_epoch=6720", "--train.epochs=4", f"--train.seed={seed}",
                    "--train.save_every_steps=210", "--train.keep_last=4", "--logging.progress_bar=off"],
                   root / f"s{seed}.log")  # fmt: skip
    val = tb_scalars(run / "tensorboard")["val/r_mean"]
    margins = []
    for step, _ in val:
        out = run / "eval" / f"step{step}"
        run_cli_logged(["evaluate", "retrieval", "--checkpoint", str(run / "checkpoints" / f"global_step{step}"),
                        "--data", str(data / "test"), "--output_dir", str(out), "--k_test", "16",
                        "--num_workers=0", "--device=cpu"], root / f"s{seed}_eval{step}.log")  # fmt: skip
        report = json.loads((out / "eval" / "retrieval_synthetic_test.json").read_text())
        chance = report["chance"]
        m = report["metrics"]
        margins.append((
            min(m[n]["r_mean"] / chance["r_mean"] for n in m),  # the test: > 2.5
            min(min(m[n]["img_r10"] - chance["img_r10"], m[n]["txt_r10"] - chance["txt_r10"]) for n in m),  # > 20
        ))  # fmt: skip
    for epoch in range(1, len(val) + 1):
        scores = [v for _, v in val[:epoch]]
        best = scores.index(max(scores))
        ratio, r10 = margins[best]
        print(f"retrieval seed {seed} epoch {epoch}: best = epoch {best + 1} (step {val[best][0]}), worst score "
              f"r_mean/chance {ratio:.2f} (test > 2.5), R@10 - chance {r10:.1f} (test > 20)", flush=True)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="TASK:SEED, e.g. ve:0")
    p.add_argument("--workdir", default="/tmp/task_test_epochs")
    args = p.parse_args()
    prepared: dict[str, tuple[list[str], Path]] = {}
    for spec in args.runs:
        task, seed = spec.split(":")
        if task == "retrieval":
            retrieval(Path(args.workdir) / task, seed)
            continue
        epochs, loss_tag, k = TASKS[task]
        root = Path(args.workdir) / task
        if task not in prepared:
            root.mkdir(parents=True, exist_ok=True)
            prepared[task] = prepare(task, root)
        extra, checkpoint = prepared[task]
        run = root / f"s{seed}"
        run_cli_logged(["finetune", task, "--config", f"{task}_tiny_cpu", "--checkpoint", str(checkpoint),
                        "--output_dir", str(run), *extra, f"--train.epochs={epochs}", f"--train.seed={seed}",
                        "--logging.progress_bar=off"], root / f"s{seed}.log")  # fmt: skip
        scalars = tb_scalars(run / "tensorboard")
        losses, val = scalars[loss_tag], scalars["val/accuracy"]
        best = 0.0
        for epoch, (step, accuracy) in enumerate(val, start=1):
            best = max(best, accuracy)
            upto = [v for s, v in losses if s <= step]
            fall = sum(upto[:k]) / k - sum(upto[-k:]) / k
            print(f"{task} seed {seed} epoch {epoch} (step {step}): val {accuracy:.1f}, best so far {best:.1f}, "
                  f"loss first-{k} minus last-{k} {fall:.3f} over {len(upto)} logged", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
