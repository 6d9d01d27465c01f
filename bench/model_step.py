"""Benchmark one ALBEF pretraining step on synthetic data, fp32 and bf16 side by side: time, peak memory, FLOPs.

    python bench/model_step.py                       # tiny and base on the CPU, fp32 and bf16 autocast
    python bench/model_step.py --configs base --batch-base 8 --image-size 64 --seq-len 16 --threads 1
    python bench/model_step.py --configs base --batch-base 8 --image-size 64 --seq-len 16 --threads 1 \
        --precisions fp32 --code /tmp/albef_base     # the model code of another checkout (a baseline)
    python bench/model_step.py --configs base --batch-base 4 --peak-tflops 2.0 --device cuda

A step = EMA of the momentum encoders + forward + backward + AdamW step + enqueue (`--no-optimizer`:
forward + backward only, the EMA timed separately), model only: no DeepSpeed (bench/pretrain.py runs
the real trainer step). bf16 = fp32 weights, forward under torch.autocast(bfloat16), as the CPU configs
train (ds_configs/cpu_bf16.json).

Each config runs in a fresh child process so its memory numbers are its own. Memory on the CPU is the
process's peak resident set size (`resource.getrusage(...).ru_maxrss`): reported as the peak after the
steps and as the growth over the peak right after building the model (= what the step itself added:
activations, gradients, temporaries). On CUDA, `torch.cuda.max_memory_allocated`. FLOPs are counted with
`torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions, attention) over one forward+backward;
MFU = achieved FLOP/s / --peak-tflops when given. The step excludes the optimizer; the EMA update is timed
separately. Data is always synthetic (random images and token ids).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

if "--code" in sys.argv:  # the model package of another checkout (before the repo's own)
    sys.path.insert(0, str(Path(sys.argv[sys.argv.index("--code") + 1]).resolve()))
else:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import ALBEFConfig, build_albef, mask_tokens  # noqa: E402

SEQ_LEN = 25  # pretraining max tokens (default of --seq-len)


def _config(name: str, image_size: int | None) -> ALBEFConfig:
    if name == "tiny":
        return ALBEFConfig.tiny(image_size=image_size or 32)
    if name == "base":
        return ALBEFConfig.base(image_size=image_size or 256)
    raise ValueError(f"unknown config {name!r} (tiny, base)")


def _batch(cfg: ALBEFConfig, batch: int, device: torch.device, seq_len: int = SEQ_LEN) -> dict:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, cfg.text.vocab_size, (batch, seq_len), generator=gen)
    ids[:, 0] = 101
    mlm_ids, labels = mask_tokens(
        ids, vocab_size=cfg.text.vocab_size, mask_token_id=103, special_token_ids=[0, 101, 102], generator=gen
    )
    size = cfg.vision.image_size
    data = {
        "image": torch.randn(batch, 3, size, size, generator=gen),
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mlm_input_ids": mlm_ids,
        "mlm_labels": labels,
    }
    return {k: v.to(device) for k, v in data.items()} | {"alpha": 0.4}


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_one(
    name: str,
    batch: int,
    image_size: int | None,
    steps: int,
    device_name: str,
    threads: int | None = None,
    precision: str = "fp32",
    seq_len: int = SEQ_LEN,
    optimizer: bool = True,
) -> dict:
    """Child-process body: build, warm up, time `steps` training steps, count FLOPs once."""
    import contextlib

    from torch.utils.flop_counter import FlopCounterMode

    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device_name)
    torch.manual_seed(0)
    cfg = _config(name, image_size)
    if cfg.queue_size % batch:
        cfg = dataclasses.replace(cfg, queue_size=batch * (cfg.queue_size // batch or 1))
    model = build_albef(cfg).to(device).train()
    data = _batch(cfg, batch, device, seq_len)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5) if optimizer else None
    rss_built = _max_rss_mib()

    def autocast():
        if precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision])

    def step() -> None:
        if opt is not None:
            model.momentum_update()
        with autocast():
            out = model(**data)
        out.loss.backward()
        if opt is not None:
            opt.step()
            if hasattr(out, "queue_update"):
                model.enqueue(**out.queue_update())
            else:  # a baseline checkout from before `queue_update` (--code)
                model.enqueue(out.image_feat_m, out.text_feat_m)
        model.zero_grad(set_to_none=True)

    step()  # warm-up (allocator, lazy init)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, cpu_times = [], []
    for _ in range(steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    start = time.perf_counter()
    model.momentum_update()
    _sync(device)
    ema_s = time.perf_counter() - start
    with FlopCounterMode(display=False) as counter:
        step()
    result = {
        "config": name,
        "device": device_name,
        "precision": precision,
        "step": "ema+fwd+bwd+adamw+enqueue" if optimizer else "fwd+bwd",
        "batch": batch,
        "image_size": cfg.vision.image_size,
        "threads": torch.get_num_threads(),
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "step_s": statistics.median(times),
        "step_cpu_s": statistics.median(cpu_times),  # CPU seconds of this process: steadier on a shared machine
        "ema_s": ema_s,
        "flops": counter.get_total_flops(),
    }
    if device.type == "cuda":
        result["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["step_mib"] = float("nan")
    else:
        result["peak_mib"] = _max_rss_mib()
        result["step_mib"] = result["peak_mib"] - rss_built
    return result


def _print_table(rows: list[dict], peak_tflops: float | None) -> None:
    header = (
        f"{'config':6} {'prec':5} {'device':6} {'batch':>5} {'px':>4} {'thr':>3} {'params':>8} {'fwd+bwd s':>10} "
        f"{'samples/s':>9} {'GFLOP':>8} {'TFLOP/s':>8} {'MFU':>6} {'peak MiB':>9} {'step MiB':>9} {'EMA s':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        tflops = r["flops"] / r["step_s"] / 1e12
        mfu = f"{tflops / peak_tflops:6.1%}" if peak_tflops else "   n/a"
        print(
            f"{r['config']:6} {r['precision']:5} {r['device']:6} {r['batch']:5d} {r['image_size']:4d} {r['threads']:3d} "
            f"{r['params_m']:7.1f}M {r['step_s']:10.3f} {r['batch'] / r['step_s']:9.2f} {r['flops'] / 1e9:8.1f} "
            f"{tflops:8.3f} {mfu} {r['peak_mib']:9.0f} {r['step_mib']:9.0f} {r['ema_s']:7.3f}  cpu-s {r['step_cpu_s']:.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="tiny,base", help="comma-separated: tiny, base")
    parser.add_argument("--batch-tiny", type=int, default=8)
    parser.add_argument("--batch-base", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=None, help="override the config's resolution (px)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="hardware peak for the MFU column")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16 (autocast), fp16")
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN, help="caption tokens")
    parser.add_argument("--no-optimizer", action="store_true", help="time forward+backward only (no EMA/AdamW/enqueue)")
    parser.add_argument("--code", default=None, help="repo root whose `model` package to benchmark (a baseline)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-precision", default="fp32", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:  # inside the fresh process: one config, result as JSON on the last stdout line
        batch = args.batch_tiny if args.child == "tiny" else args.batch_base
        row = run_one(
            args.child,
            batch,
            args.image_size,
            args.steps,
            args.device,
            args.threads,
            args.child_precision,
            args.seq_len,
            not args.no_optimizer,
        )
        print(json.dumps(row))
        return
    rows = []
    for name, precision in ((n, p) for n in args.configs.split(",") for p in args.precisions.split(",")):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            name,
            "--batch-tiny",
            str(args.batch_tiny),
            "--batch-base",
            str(args.batch_base),
            "--steps",
            str(args.steps),
            "--device",
            args.device,
            "--child-precision",
            precision,
            "--seq-len",
            str(args.seq_len),
        ]
        if args.no_optimizer:
            cmd.append("--no-optimizer")
        if args.code:
            cmd += ["--code", args.code]
        if args.image_size:
            cmd += ["--image-size", str(args.image_size)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    _print_table(rows, args.peak_tflops)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
