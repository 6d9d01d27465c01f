"""Pretraining step benchmark: images/s, peak memory and (given a peak FLOP/s) an MFU estimate.

The real Trainer step (DeepSpeed engine, EMA, forward, backward, enqueue, optimizer step) on
synthetic batches by default (`--data synthetic`: the loader is out of the measurement), or on
real shards (`--data DIR`, an `albef prep` output folder). One process, or N ranks spawned on
this machine with `--nproc N` (gloo on the CPU, as the tests).

    python bench/pretrain.py --config pretrain_tiny_cpu --nproc 1
    python bench/pretrain.py --config pretrain_4m --batch_size 2 --image_res 256 --steps 3 --ds ds_configs/cpu.json
    python bench/pretrain.py --config pretrain_4m --ds ds_configs/zero2_fp16.json --peak_tflops 989   # H100/H200 bf16 dense
    python bench/pretrain.py --config pretrain_4m --batch_size 8 --image_res 64 --text_len 16 --threads 1 \
        --ds ds_configs/cpu.json,ds_configs/cpu_bf16.json,ds_configs/cpu_ds_bf16.json --repeats 3   # CPU precisions
    python bench/pretrain.py --config pretrain_4m --batch_size 8 --image_res 64 --text_len 16 --threads 1 \
        --ds ds_configs/cpu_bf16.json --steps 3 --profile 25   # + the top 25 ops of those steps (stderr)

`--ds A,B,...` runs each config in turn (fresh processes), `--repeats N` times interleaved, and prints
one JSON line per run then the median step time per config (the machine may be shared).

Prints one JSON line per run: {"config", "nproc", "batch_per_rank", "images_per_s", "step_s",
"peak_mem_gib" (per rank: CUDA max allocated on GPUs, max RSS on the CPU), "loss_scale", "mfu",
"ops_per_step" (with `--count_ops`: computing aten ops per step, about the GPU kernel launches)}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def flops_per_image(mcfg, text_len: int) -> float:
    """Training FLOPs per image-text pair, counting matmuls only (2 FLOPs per MAC).

    Trainable passes cost 3x their forward (forward + backward), momentum passes 1x:
      ViT on the image: trainable + momentum;
      text layers on the caption: trainable + momentum (ITC), + trainable + momentum again on the
      masked caption (MLM runs all 12 layers);
      fusion layers (self + cross attention + FFN): 3 pairs for ITM (trainable) and the MLM pass
      (trainable + momentum).
    Attention score matmuls are ignored (short sequences); good to ~10%.
    """
    v, t = mcfg.vision, mcfg.text
    img_tokens = v.grid_size**2 + 1
    vit = 2 * img_tokens * v.depth * (4 * v.width**2 + 2 * v.width * int(v.width * v.mlp_ratio))
    h, ff = t.hidden_size, t.intermediate_size
    layer_text = 2 * text_len * (4 * h * h + 2 * h * ff)
    layer_cross = 2 * (text_len * 2 * h * h + img_tokens * 2 * h * v.width)  # q,o on text; k,v on image tokens
    n_text, n_fus = t.fusion_layer, t.num_layers - t.fusion_layer
    text = n_text * layer_text
    fusion = n_fus * (layer_text + layer_cross)
    trainable = vit + 2 * text + 3 * fusion + fusion
    momentum = vit + 2 * text + fusion
    return 3 * trainable + momentum


class SyntheticBatches:
    """Endless batches in the training loader's format (uint8 images, token ids), drawn once.

    A small pool is generated up front and cycled: drawing a fresh [64, 3, 256, 256] random batch on
    the CPU every step took ~90 ms, 18% of an H200 step, and the real loader runs in worker processes
    anyway. Images are uint8 as the training loaders hand them over (normalised on the device)."""

    def __init__(self, batch_size: int, image_res: int, text_len: int, seed: int, pool: int = 4) -> None:
        import torch

        g = torch.Generator().manual_seed(seed)
        self.batches = []
        for _ in range(pool):
            ids = torch.randint(1000, 30000, (batch_size, text_len), generator=g)
            ids[:, 0], ids[:, -1] = 101, 102
            image = torch.randint(0, 256, (batch_size, 3, image_res, image_res), dtype=torch.uint8, generator=g)
            self.batches.append(
                {"image": image, "input_ids": ids, "attention_mask": torch.ones_like(ids), "bad_samples": {}}
            )

    def __iter__(self):
        while True:
            yield from self.batches


class OpCounter:
    """Counts the aten ops that compute (views excluded) while active: on a GPU each is about one
    kernel launch, so this is the launch count of a step measured on any machine."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        self.by_op: Counter[str] = Counter()
        by_op = self.by_op

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if not func.is_view:
                    by_op[func.__name__] += 1
                return func(*args, **(kwargs or {}))

        self.mode = _Mode()


def build(args: argparse.Namespace) -> tuple:
    """The real PretrainTask + Trainer (engine set up) and the batch iterator for this rank."""
    from pipeline.config import load_config
    from pipeline.runtime.distributed import dist_info_from_env, init_distributed
    from pipeline.runtime.ds_config import build_ds_config, resolve_device
    from pipeline.runtime.logs import setup_logging
    from pipeline.stages.pretrain import PretrainConfig, PretrainTask
    from pipeline.train.geometry import derive_geometry
    from pipeline.train.trainer import Trainer

    data = args.data if args.data != "synthetic" else "/unused"
    overrides = {"data.train": f"[{data}]", "model.image_res": args.image_res, "train.batch_size": args.batch_size}
    # Speed does not depend on the initial weights: random init, no DeiT/BERT download on the bench machine.
    overrides.update({"model.init": "scratch", "model.vision_weights": None, "model.text_weights": None})
    if args.ds:
        overrides["deepspeed.config"] = args.ds
    if args.queue_size:
        overrides["model.queue_size"] = args.queue_size
    cfg = load_config(PretrainConfig, args.config, overrides)
    info = dist_info_from_env()
    setup_logging(info.rank)
    device = resolve_device(cfg.train.device)
    task = PretrainTask(cfg)
    if args.data == "synthetic":
        task.samples_per_epoch = lambda: 10**6  # type: ignore[method-assign]
    geometry = derive_geometry(
        cfg.train,
        cfg.optim,
        world_size=info.world_size,
        samples_per_epoch=task.samples_per_epoch(),
        queue_size=task.queue_size(),
    )
    ds = build_ds_config(cfg.deepspeed.config, geometry=geometry, optim=cfg.optim, device=device)
    init_distributed(info, device)
    if args.data == "synthetic":
        batches = iter(SyntheticBatches(cfg.train.batch_size, cfg.model.image_res, args.text_len, seed=info.rank))
    else:
        batches = iter(
            task.train_batches(start_micro_step=0, segment_steps=1000, rank=info.rank, world_size=info.world_size)
        )
    trainer = Trainer(
        task,
        train=cfg.train,
        optim=cfg.optim,
        logging_cfg=cfg.logging,
        ds_config=ds,
        dist_info=info,
        device=device,
        run_dir=Path("/tmp/albef_bench"),
        geometry=geometry,
    )
    trainer.setup()
    if args.compile:
        # torch.compile of the wrapped module (DeepSpeed's engine.compile); the data-dependent parts
        # (hard-negative sampling, masked-token selection) graph-break and run eagerly
        trainer.engine.compile()
    return cfg, info, device, task, trainer, batches


def run_rank(args: argparse.Namespace) -> dict:
    """One rank: time `args.steps` optimizer steps after `args.warmup`, report throughput and memory."""
    import torch

    from pipeline.config import build_model_config

    cfg, info, device, task, trainer, batches = build(args)
    last: dict[str, float] = {}
    forward = task.forward

    def recording_forward(engine, batch, ctx):  # keep the last loss for the report (a NaN shows here)
        out = forward(engine, batch, ctx)
        last["loss"] = float(out.loss.detach())
        return out

    task.forward = recording_forward  # type: ignore[method-assign]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    profiler = None
    counter = OpCounter() if args.count_ops else None
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            sync()
            if counter is not None:
                counter.mode.__enter__()
            if args.profile and info.rank == 0:  # where a step's time goes (ops by self time)
                profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)
                profiler.__enter__()
            t0, c0 = time.perf_counter(), time.process_time()
        trainer.train_step(batches)
        trainer.state.step += 1
    sync()
    elapsed, cpu_elapsed = time.perf_counter() - t0, time.process_time() - c0
    if counter is not None:
        counter.mode.__exit__(None, None, None)
        top = counter.by_op.most_common(15)
        print("ops per step by op:", {k: round(v / args.steps) for k, v in top}, file=sys.stderr)
    if profiler is not None:
        profiler.__exit__(None, None, None)
        averages = profiler.key_averages()
        print(averages.table(sort_by="self_cpu_time_total", row_limit=args.profile), file=sys.stderr)
        by_shape = profiler.key_averages(group_by_input_shape=True)  # which copies / concatenations
        print(by_shape.table(sort_by="self_cpu_time_total", row_limit=args.profile), file=sys.stderr)
    images = args.steps * cfg.train.batch_size * cfg.train.grad_accum_steps * info.world_size
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    result = {
        "config": args.config, "preset": cfg.model.preset, "image_res": cfg.model.image_res, "device": device,
        "precision": trainer.precision, "nproc": info.world_size,
        "batch_per_rank": cfg.train.batch_size * cfg.train.grad_accum_steps, "steps": args.steps,
        "step_s": elapsed / args.steps, "step_cpu_s": cpu_elapsed / args.steps, "images_per_s": images / elapsed,
        "images_per_s_per_rank": images / elapsed / info.world_size, "peak_mem_gib": round(peak, 3),
        "ops_per_step": round(counter.by_op.total() / args.steps) if counter is not None else None,
        "loss_scale": trainer.loss_scale(), "skipped_steps": int(trainer.engine.skipped_steps), "loss": last.get("loss"),
    }  # fmt: skip
    if args.peak_tflops:
        achieved = flops_per_image(build_model_config(cfg.model, cfg.train.seed), args.text_len) * images / elapsed
        result["mfu"] = achieved / (args.peak_tflops * 1e12 * info.world_size)
    return result


def _argv_without(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """argv minus `--opt VALUE` / `--opt=VALUE` for each of `options`."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in options:
            skip = True
        elif not a.startswith(tuple(f"{o}=" for o in options)):
            out.append(a)
    return out


def spawn(args: argparse.Namespace, ds: str | None = None) -> list[dict]:
    """Run `--nproc` ranks of this script (torchrun-style env) and collect their JSON lines."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, __file__, *_argv_without(sys.argv[1:], ("--ds", "--repeats")), "--_rank_child"]
    if ds:
        argv += ["--ds", ds]
    procs = []
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.nproc)
    for rank in range(args.nproc):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE=str(args.nproc),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(args.nproc),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS=str(threads),
        )
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True))
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a rank failed: exit codes {[p.returncode for p in procs]}")
    return [json.loads(next(line for line in out.splitlines() if line.startswith("{"))) for out in outs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="pretrain_tiny_cpu")
    parser.add_argument("--ds", default=None, help="DeepSpeed JSON (default: the config's)")
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--image_res", type=int, default=64)
    parser.add_argument("--queue_size", type=int, default=None)
    parser.add_argument("--text_len", type=int, default=25)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--data", default="synthetic", help="'synthetic' or an `albef prep` output folder")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per rank (default: cores / nproc)")
    parser.add_argument("--peak_tflops", type=float, default=None, help="per-device peak, for the MFU estimate")
    parser.add_argument("--repeats", type=int, default=1, help="runs per --ds config, interleaved")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (engine.compile())")
    parser.add_argument(
        "--profile", type=int, default=0, help="rank 0: torch.profiler table of the top N ops over the timed steps"
    )
    parser.add_argument(
        "--count_ops", action="store_true", help="count computing aten ops per timed step (~ GPU kernel launches)"
    )
    parser.add_argument("--_rank_child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._rank_child or ("RANK" in os.environ and args.nproc == 1):
        print(json.dumps(run_rank(args)), flush=True)
        return
    configs = args.ds.split(",") if args.ds else [None]
    steps: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for ds in configs:
            results = spawn(args, ds)
            summary = dict(results[0], ds=ds or "(config's)")
            summary["peak_mem_gib"] = max(r["peak_mem_gib"] for r in results)  # worst rank
            print(json.dumps(summary), flush=True)
            steps.setdefault(summary["ds"], []).append(summary["step_s"])
    if len(configs) > 1 or args.repeats > 1:
        medians = {ds: statistics.median(t) for ds, t in steps.items()}
        first = next(iter(medians.values()))
        for ds, m in medians.items():
            print(f"# {ds}: median step {m:.3f} s over {len(steps[ds])} runs ({m / first:.3f}x the first)", flush=True)


if __name__ == "__main__":
    main()
