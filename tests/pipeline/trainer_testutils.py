"""Helpers for the trainer tests: learnable shards in the `albef prep` layout, launching ranks,
reading checkpoints and TensorBoard files.

Shards are written directly with webdataset's TarWriter from data_prep.synthetic's coloured-shape
images (captions describe colour, shape, size and position), in the manifest format of the shared
contract; running img2dataset here would only add start-up time (its own tests cover it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import webdataset as wds

REPO_ROOT = Path(__file__).resolve().parents[2]


def make_shards(root: Path, *, n_train: int = 256, per_shard: int = 64, image_size: int = 64, seed: int = 0) -> Path:
    """Write `root/shards/NNNNN.tar` + `root/manifest.json` of a learnable synthetic set."""
    from data_prep.synthetic import write_synthetic

    images_dir = root / "raw"
    synth = write_synthetic(images_dir, n_train=n_train, n_test=0, seed=seed, image_size=image_size)
    (root / "shards").mkdir(parents=True, exist_ok=True)
    train = synth.split("train")
    entries = []
    for s in range(0, len(train), per_shard):
        chunk = train[s : s + per_shard]
        name = f"shards/{s // per_shard:05d}.tar"
        with wds.TarWriter(str(root / name)) as sink:
            for k, im in enumerate(chunk):
                meta = {"captions": list(im.captions), "image_id": im.image_id, "status": "success"}
                sink.write(
                    {
                        "__key__": f"{s // per_shard:05d}{k:04d}",
                        "jpg": (images_dir / im.relpath).read_bytes(),
                        "txt": im.captions[0].encode(),
                        "json": json.dumps(meta).encode(),
                    }
                )
        entries.append({"path": name, "samples": len(chunk)})
    manifest = {
        "format_version": 1,
        "source": "synthetic",
        "split": "train",
        "shards": entries,
        "num_samples": len(train),
        "num_captions": sum(len(im.captions) for im in train),
        "input_rows": len(train),
        "skipped": {},
        "failures": {},
        "successes": len(train),
        "settings": {},
        "elapsed_s": 0.0,
        "created": "1970-01-01T00:00:00Z",
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        }
    )
    return env


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pretrain_cmd(run_dir: Path, data_dir: Path, *extra: str, resume: str = "auto") -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline.cli",
        "pretrain",
        "--config",
        "pretrain_tiny_cpu",
        "--output_dir",
        str(run_dir),
        "--resume",
        resume,
        f"--data.train=[{data_dir}]",
        "--logging.progress_bar=off",
        *extra,
    ]


def launch(cmd: list[str], world_size: int, log_dir: Path, tag: str) -> list[subprocess.Popen]:
    """Start `world_size` ranks (one process each, torchrun-style env, as srun would) on gloo."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        log = open(log_dir / f"{tag}.rank{rank}.log", "w")
        procs.append(
            subprocess.Popen(
                cmd, env=rank_env(rank, world_size, port), cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT
            )
        )
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float = 600) -> list[int]:
    deadline = time.time() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.time())))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    return codes


def read_log(log_dir: Path, tag: str, rank: int = 0) -> str:
    return (log_dir / f"{tag}.rank{rank}.log").read_text()


def model_states(ckpt_dir: Path, tag: str) -> dict:
    return torch.load(ckpt_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)


def optim_states(ckpt_dir: Path, tag: str, rank: int) -> dict:
    return torch.load(
        ckpt_dir / tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", map_location="cpu", weights_only=False
    )


def tb_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# ------------------------------------------------------------------------------------------------
# A toy task: exercises the generic Trainer (accumulation hooks, validation/best, NaN stop) fast.
# Run as `python tests/pipeline/trainer_testutils.py RUN_DIR [--nan_at N] ...` (one process).
# ------------------------------------------------------------------------------------------------
def _toy_main(argv: list[str]) -> int:
    import argparse

    from torch import nn

    from pipeline.config import DeepSpeedSection, LoggingConfig, OptimConfig, TrainConfig
    from pipeline.runtime.distributed import dist_info_from_env, init_distributed
    from pipeline.runtime.ds_config import build_ds_config
    from pipeline.runtime.logs import setup_logging
    from pipeline.train.geometry import derive_geometry
    from pipeline.train.task import StepOutput, TrainTask
    from pipeline.train.trainer import NonFiniteLossError, Trainer

    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--nan_at", type=int, default=-1)
    parser.add_argument("--max_steps", type=int, default=12)
    parser.add_argument("--save_every", type=int, default=4)
    parser.add_argument("--grad_accum", type=int, default=2)
    args = parser.parse_args(argv)

    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 1))
            self.scale = nn.Parameter(torch.ones([]))  # 0-d, like ALBEF's temp
            self.register_buffer("begin_calls", torch.zeros((), dtype=torch.long))
            self.register_buffer("micro_calls", torch.zeros((), dtype=torch.long))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x).squeeze(-1) * self.scale

        def enqueue(self, count: torch.Tensor) -> None:  # the trainer's queue update, all-gathered
            assert count.shape[0] == dist_info_from_env().world_size
            self.micro_calls += 1

    class ToyTask(TrainTask):
        name, best_metric = "toy", "score"
        w = torch.randn(8, generator=torch.Generator().manual_seed(1))

        def build_model(self) -> nn.Module:
            return Toy()

        def samples_per_epoch(self) -> int:
            return 4 * args.grad_accum * 3  # 3 optimizer steps per epoch

        def train_batches(self, *, start_micro_step, segment_steps, rank, world_size):
            g = start_micro_step
            while True:
                x = torch.randn(4, 8, generator=torch.Generator().manual_seed(g))
                yield {"x": x, "y": x @ self.w, "step": g, "bad_samples": {"bad_image": 1} if g % 5 == 0 else {}}
                g += 1

        def begin_step(self, model, ctx) -> None:
            model.begin_calls += 1

        def forward(self, engine, batch, ctx) -> StepOutput:
            loss = ((engine(batch["x"]) - batch["y"]) ** 2).mean()
            if ctx.step == args.nan_at:
                loss = loss * float("nan")
            return StepOutput(loss=loss, scalars={"loss_mse": loss}, num_samples=4, queue_update={"count": torch.ones(1)})

        def validate(self, model, ctx) -> dict[str, float]:
            x = torch.randn(64, 8, generator=torch.Generator().manual_seed(-1 % 2**31))
            with torch.no_grad():
                return {"score": -float(((model(x) - x @ self.w) ** 2).mean())}

    info = dist_info_from_env()
    setup_logging(info.rank)
    train = TrainConfig(
        batch_size=4,
        grad_accum_steps=args.grad_accum,
        max_steps=args.max_steps,
        save_every_steps=args.save_every,
        keep_last=2,
        seed=3,
        device="cpu",
    )
    optim = OptimConfig(lr=1e-2, warmup_lr=1e-3, min_lr=1e-3, warmup_steps=2)
    task = ToyTask()
    geometry = derive_geometry(train, optim, world_size=info.world_size, samples_per_epoch=task.samples_per_epoch())
    ds = build_ds_config(DeepSpeedSection(config="ds_configs/cpu.json").config, geometry=geometry, optim=optim, device="cpu")
    init_distributed(info, "cpu")
    trainer = Trainer(
        task,
        train=train,
        optim=optim,
        logging_cfg=LoggingConfig(log_every_steps=1, progress_bar="off"),
        ds_config=ds,
        dist_info=info,
        device="cpu",
        run_dir=args.run_dir,
        geometry=geometry,
    )
    try:
        return trainer.fit("auto")
    except NonFiniteLossError as err:
        print(f"NonFiniteLossError: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    sys.exit(_toy_main(sys.argv[1:]))
