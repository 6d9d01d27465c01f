"""Helpers shared by the pipeline tests: learnable shards in the `albef prep` layout, launching
ranks, reading checkpoints and TensorBoard files. The fixtures built on them are in conftest.py.

Shards are written directly with webdataset's TarWriter from data_prep.synthetic's coloured-shape
images (captions describe colour, shape, size and position; a test split's captions never occur in
train), in the manifest format of the shared contract; running img2dataset here would only add
start-up time (the data_prep tests cover it).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import webdataset as wds
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from data_prep.sources.nlvr2 import image_names
from data_prep.synthetic import write_synthetic
from pipeline.config import REPO_ROOT
from pipeline.runtime.io import torch_load_weights_only


def write_split(root: Path, images: list, images_dir: Path, split: str, per_shard: int = 64) -> Path:
    """`root/shards/NNNNN.tar` + `root/manifest.json` for `images` (SyntheticImage list)."""
    (root / "shards").mkdir(parents=True, exist_ok=True)
    entries = []
    for s in range(0, len(images), per_shard):
        chunk, shard = images[s : s + per_shard], s // per_shard
        name = f"shards/{shard:05d}.tar"
        with wds.TarWriter(str(root / name)) as sink:
            for k, im in enumerate(chunk):
                meta = {"captions": list(im.captions), "image_id": im.image_id, "status": "success"}
                sink.write(
                    {
                        "__key__": f"{shard:05d}{k:04d}",
                        "jpg": (images_dir / im.relpath).read_bytes(),
                        "txt": im.captions[0].encode(),
                        "json": json.dumps(meta).encode(),
                    }
                )
        entries.append({"path": name, "samples": len(chunk)})
    manifest = {
        "format_version": 1,
        "source": "synthetic",
        "split": split,
        "shards": entries,
        "num_samples": len(images),
        "num_captions": sum(len(im.captions) for im in images),
        "input_rows": len(images),
        "skipped": {},
        "failures": {},
        "successes": len(images),
        "settings": {},
        "elapsed_s": 0.0,
        "created": "1970-01-01T00:00:00Z",
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def make_synthetic_splits(
    root: Path,
    *,
    n_train: int = 256,
    n_val: int = 0,
    n_test: int = 64,
    image_size: int = 64,
    captions_per_image: int = 3,
    seed: int = 0,
) -> dict[str, Path]:
    """Generate the synthetic set once and write one `albef prep`-style folder per split."""
    raw = root / "raw"
    synth = write_synthetic(
        raw,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        seed=seed,
        image_size=image_size,
        captions_per_image=captions_per_image,
    )
    return {
        split: write_split(root / split, synth.split(split), raw, split)
        for split, n in (("train", n_train), ("val", n_val), ("test", n_test))
        if n > 0
    }


def make_shards(root: Path, *, n_train: int = 256, per_shard: int = 64, image_size: int = 64, seed: int = 0) -> Path:
    """`root/shards/NNNNN.tar` + `root/manifest.json` of a learnable synthetic training set."""
    raw = root / "raw"
    synth = write_synthetic(raw, n_train=n_train, n_test=0, seed=seed, image_size=image_size)
    return write_split(root, synth.split("train"), raw, "train", per_shard=per_shard)


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
    return torch_load_weights_only(ckpt_dir / tag / "mp_rank_00_model_states.pt")


def tb_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _cli_env() -> dict[str, str]:
    """One plain process outside any launcher, the checkout's code first."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run_cli(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m pipeline.cli ARGS` as one process outside any launcher; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        env=_cli_env(),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_cli_logged(args: list[str], log: Path, timeout: float = 900) -> None:
    """`python -m pipeline.cli ARGS` with its output in `log`; fails the test (log tail shown) unless it exits 0."""
    with open(log, "w") as fh:
        code = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", *args],
            env=_cli_env(),
            cwd=REPO_ROOT,
            stdout=fh,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        ).returncode
    assert code == 0, log.read_text()[-4000:]


def tiny_pretrain_checkpoint(path: Path) -> Path:
    """An exported-style pretraining checkpoint of the tiny ALBEF (random init, seed 0): what the task
    fine-tuning tests start from."""
    import torch

    from model import ALBEFConfig, build_albef

    torch.manual_seed(0)
    cfg = ALBEFConfig.tiny(image_size=64, embed_dim=32, queue_size=64)
    torch.save({"model": build_albef(cfg).state_dict(), "model_config": cfg.to_dict()}, path)
    return path


def assert_one_error_line(proc: subprocess.CompletedProcess, code: int, *names: str) -> str:
    """Exit `code`, no traceback, and exactly one logged error line, which holds every one of `names`."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, f"rc {proc.returncode}:\n{out[-3000:]}"
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in out.splitlines() if " ERROR " in line]
    assert len(errors) == 1, out[-3000:]
    assert all(name in errors[0] for name in names), errors[0]
    return errors[0]


def write_nlvr_split(root: Path, jsonl: Path, image_root: Path, per_shard: int = 4) -> Path:
    """An `albef prep nlvr2`-layout folder (pair shards + manifest) written directly from a synthetic jsonl."""
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    (root / "pairs").mkdir(parents=True)
    entries = []
    for s in range(0, len(records), per_shard):
        name = f"pairs/{s // per_shard:05d}.tar"
        with wds.TarWriter(str(root / name)) as sink:
            for k, r in enumerate(records[s : s + per_shard]):
                left, right = image_names(r["identifier"], r.get("directory"))
                meta = {"identifier": r["identifier"], "captions": [r["sentence"]], "labels": [r["label"]],
                        "image_id": r["identifier"], "images": [left, right]}  # fmt: skip
                sink.write(
                    {
                        "__key__": f"{s + k:09d}",
                        "left.png": (image_root / left).read_bytes(),
                        "right.png": (image_root / right).read_bytes(),
                        "json": json.dumps(meta).encode(),
                    }
                )
        entries.append({"path": name, "samples": len(records[s : s + per_shard])})
    manifest = {"format_version": 1, "source": "nlvr2", "split": "test", "shards": entries, "sample_layout": "pair",
                "num_samples": len(records), "num_captions": len(records)}  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root
