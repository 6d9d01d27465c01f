"""NLVR2 stages end to end on the CPU: `albef prep nlvr2` (real img2dataset) -> `albef pretrain` with
`task: text_assignment` -> `albef finetune nlvr` -> `albef evaluate nlvr` on a held-out split, the
text-assignment stage on its own, an official-layout NLVR checkpoint through `albef evaluate nlvr`, and
the stages' config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data_prep.synthetic import SyntheticImage
from data_prep.synthetic_nlvr import SyntheticNLVR, write_synthetic_nlvr
from model.config import ALBEFConfig
from model.heads.nlvr import build_nlvr
from model.heads.ve import ClassifierConfig
from pipeline.runtime.io import read_checkpoint
from pipeline.stages.evaluate_nlvr import evaluate_nlvr
from pipeline.stages.finetune_nlvr import finetune_nlvr
from pipeline.stages.pretrain import pretrain

from pipeline_testutils import run_cli_logged, tb_scalars, tiny_pretrain_checkpoint, write_nlvr_split, write_split

TA_TINY = "nlvr_ta_tiny_cpu"


def _caption_shards(synth: SyntheticNLVR, split: str, out: Path) -> Path:
    """Image-text shards (the `albef prep` layout) of the split's pictures with their single-image captions:
    the data text assignment trains on."""
    images = [SyntheticImage(split, str(p.relative_to(synth.image_root)), p.stem, caps, ())
              for p, caps in synth.image_captions[split]]  # fmt: skip
    return write_split(out, images, synth.image_root, split)


def test_config_and_input_errors_exit_2(tmp_path: Path, capfd) -> None:
    ckpt = tiny_pretrain_checkpoint(tmp_path / "init.pth")
    run = str(tmp_path / "run")
    code = finetune_nlvr("nlvr_tiny_cpu", str(ckpt), run, overrides={"data.train": f"[{tmp_path}/no]"})
    assert code == 2 and "data.train[0]" in capfd.readouterr().err
    code = finetune_nlvr("nlvr_tiny_cpu", str(ckpt), run, overrides={"model.teacher_from_ckpt": False})
    assert code == 2 and "model.teacher_from_ckpt" in capfd.readouterr().err
    data = {"data.train": f"[{tmp_path}]"}
    assert pretrain(TA_TINY, run, overrides=data) == 2  # text assignment needs --checkpoint
    assert "checkpoint" in capfd.readouterr().err
    assert pretrain("pretrain_tiny_cpu", run, overrides=data, checkpoint=str(ckpt)) == 2  # ALBEF takes none
    assert "'checkpoint'" in capfd.readouterr().err
    assert pretrain(TA_TINY, run, overrides={**data, "task": "nlvr"}, checkpoint=str(ckpt)) == 2
    assert "'task'" in capfd.readouterr().err
    assert pretrain(TA_TINY, run, overrides={**data, "model.init": "scratch"}, checkpoint=str(ckpt)) == 2
    assert "'model.init'" in capfd.readouterr().err
    assert pretrain(TA_TINY, run, overrides={**data, "model.ta_sim_temp": 0}, checkpoint=str(ckpt)) == 2
    assert "'model.ta_sim_temp'" in capfd.readouterr().err
    assert pretrain(TA_TINY, run, overrides={"data.train": f"[{tmp_path}/no]"}, checkpoint=str(ckpt)) == 2
    assert "data.train[0]" in capfd.readouterr().err
    assert pretrain(TA_TINY, run, overrides=data, checkpoint=str(tmp_path / "missing.pth")) == 2
    assert "'checkpoint'" in capfd.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit) as exc:
        evaluate_nlvr(str(tmp_path / "missing.pth"), str(tmp_path), str(tmp_path / "out"), {"device": "cpu"})
    assert exc.value.code == 2 and not (tmp_path / "out").exists()
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 1, "shards": [], "source": "coco"}))
    with pytest.raises(SystemExit) as exc:  # a one-image-per-sample folder is not NLVR2 data
        evaluate_nlvr(str(ckpt), str(tmp_path), str(tmp_path / "out"), {"device": "cpu"})
    assert exc.value.code == 2 and "albef prep nlvr2" in capfd.readouterr().err


@pytest.fixture(scope="module")
def nlvr_data(tmp_path_factory: pytest.TempPathFactory) -> SyntheticNLVR:
    """Synthetic NLVR2 pictures and sentences: 300 training pairs, 60 held-out ones (2 sentences each)."""
    return write_synthetic_nlvr(
        tmp_path_factory.mktemp("nlvr_raw"), splits={"train": 300, "heldout": 60}, image_size=32
    )


@pytest.fixture(scope="module")
def ta_run(tmp_path_factory: pytest.TempPathFactory, nlvr_data: SyntheticNLVR) -> Path:
    """`albef pretrain --config nlvr_ta_tiny_cpu --checkpoint CK` at 32 px from a random tiny ALBEF checkpoint,
    on image-text shards of the training pictures (their single-image colour captions)."""
    root = tmp_path_factory.mktemp("nlvr_ta")
    shards = _caption_shards(nlvr_data, "train", root / "captions")
    run_cli_logged(
        ["pretrain", "--config", TA_TINY, "--checkpoint", str(tiny_pretrain_checkpoint(root / "init.pth")),
         "--output_dir", str(root / "run"), f"--data.train=[{shards}]", "--model.image_res=32",
         "--logging.progress_bar=off"],
        root / "ta.log",
    )  # fmt: skip
    return root / "run"


@pytest.mark.slow
def test_text_assignment_pretraining_learns(ta_run: Path) -> None:
    """The TA loss leaves the 3-way uniform ln 3 = 1.099 (measured: ~1.10 for 190 steps, then 0.79 at step
    300); the run's checkpoint holds the TA model, which `albef finetune nlvr --checkpoint` reads."""
    losses = [v for _, v in tb_scalars(ta_run / "tensorboard")["train/loss_ta"]]
    assert len(losses) == 30, losses  # 300 steps, logged every 10
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert first > 1.09 and last < 1.02 and last < first - 0.08, losses
    loaded = read_checkpoint(ta_run)
    assert "ta_head.weight" in loaded.state_dict and loaded.step == 300
    assert "text_encoder.encoder.layer.5.crossattention.self.key.weight" in loaded.state_dict  # 2 + 2 x 2 layers


@pytest.mark.slow
def test_text_assignment_resumes_exactly(tmp_path: Path, nlvr_data: SyntheticNLVR) -> None:
    """`--resume auto` continues a TA run from its latest checkpoint; the partner draws and the loss of
    the resumed steps are those of an uninterrupted run."""
    shards = _caption_shards(nlvr_data, "train", tmp_path / "captions")
    init = tiny_pretrain_checkpoint(tmp_path / "init.pth")

    def run(out: Path, steps: int, log: str) -> list[tuple[int, float]]:
        run_cli_logged(
            ["pretrain", "--config", TA_TINY, "--checkpoint", str(init), "--output_dir", str(out),
             f"--data.train=[{shards}]", "--model.image_res=32", "--train.batch_size=8", f"--train.max_steps={steps}",
             "--train.save_every_steps=2", "--logging.log_every_steps=1", "--resume=auto",
             "--logging.progress_bar=off"],
            tmp_path / log,
        )  # fmt: skip
        return tb_scalars(out / "tensorboard")["train/loss_ta"]

    whole = run(tmp_path / "whole", 4, "whole.log")
    run(tmp_path / "cut", 2, "cut_1.log")
    resumed = run(tmp_path / "cut", 4, "cut_2.log")
    assert "resumed at step 2" in (tmp_path / "cut_2.log").read_text()
    assert [s for s, _ in whole] == [1, 2, 3, 4] and [s for s, _ in resumed][-2:] == [3, 4]
    assert resumed[-2:] == [(s, pytest.approx(v, rel=1e-6)) for s, v in whole[-2:]]


@pytest.mark.slow
def test_prep_text_assignment_finetune_evaluate_beats_chance(
    tmp_path: Path, nlvr_data: SyntheticNLVR, ta_run: Path
) -> None:
    synth = nlvr_data
    prep = {}
    for split in ("train", "heldout"):
        prep[split] = tmp_path / f"nlvr2_{split}"
        run_cli_logged(
            ["prep", "nlvr2", "--input", str(synth.jsonl[split]), "--image_root", str(synth.image_root),
             "--output", str(prep[split]), "--image_size=32", "--processes=1", "--threads=4",
             "--samples_per_shard=256"],
            tmp_path / f"prep_{split}.log",
        )  # fmt: skip
        manifest = json.loads((prep[split] / "manifest.json").read_text())
        assert manifest["num_samples"] == synth.records[split] and manifest["complete"]
    run = tmp_path / "ft"
    run_cli_logged(
        ["finetune", "nlvr", "--config", "nlvr_tiny_cpu", "--checkpoint", str(ta_run), "--output_dir", str(run),
         f"--data.train=[{prep['train']}]", f"--data.val={prep['heldout']}", "--train.epochs=4",
         "--model.image_res=32", "--logging.progress_bar=off"],
        tmp_path / "ft.log",
    )  # fmt: skip
    assert "nlvr weights loaded (official pretrain -> nlvr" in (tmp_path / "ft.log").read_text()  # NLVR.py's TA import
    scalars = tb_scalars(run / "tensorboard")
    losses, val = [v for _, v in scalars["train/loss_cls"]], scalars["val/accuracy"]
    assert len(losses) >= 14 and len(val) == 4  # 600 sentences / 16 = 37 steps per epoch, logged every 10
    # Measured 0.652 -> 0.608. The 4 epochs are needed here: over train.seed 0-2 the fall is 0.016-0.026 after 2
    # epochs, 0.022-0.036 after 3, 0.043-0.045 after 4 (bench/task_test_epochs.py nlvr:0 nlvr:1 nlvr:2).
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.03, losses
    run_cli_logged(
        ["evaluate", "nlvr", "--checkpoint", str(run), "--data", str(prep["heldout"]), "--output_dir", str(run),
         "--num_workers=0", "--device=cpu"],
        tmp_path / "eval.log",
    )  # fmt: skip
    report = json.loads((run / "eval" / "nlvr_nlvr2_all.json").read_text())
    assert report["num_pairs"] == synth.records["heldout"] == 120 and synth.true_records["heldout"] == 60
    assert report["checkpoint_step"] == 148 and report["weights"]["missing"] == []
    # Measured 72.5% on these 120 sentences (70.8% after the first epoch); chance 50, binomial sd 4.6.
    assert report["accuracy"] > 62.0 > report["chance"], report
    written = tb_scalars(run / "tensorboard")["eval/nlvr_nlvr2_all/accuracy/all"]
    assert written == [(148, pytest.approx(report["accuracy"]))]


def test_official_layout_checkpoint_evaluates_through_the_stage(tmp_path: Path) -> None:
    """A {'model': state_dict} file with the official NLVR key names (position ids included, no model
    config: the preset is inferred from the ViT width) evaluates with an empty key report."""
    torch.manual_seed(0)
    backbone = ALBEFConfig.tiny(image_size=64, embed_dim=32, queue_size=64)
    sd = build_nlvr(ClassifierConfig(backbone=backbone, num_classes=2, distill=True)).state_dict()
    for prefix in ("text_encoder", "text_encoder_m"):  # official (BertModel) names: ours + position_ids
        n = sd[f"{prefix}.embeddings.position_embeddings.weight"].shape[0]
        sd[f"{prefix}.embeddings.position_ids"] = torch.arange(n)[None]
    torch.save({"model": sd, "epoch": 3}, tmp_path / "checkpoint_best.pth")
    synth = write_synthetic_nlvr(tmp_path / "raw", splits={"dev": 4}, image_size=64)
    data = write_nlvr_split(tmp_path / "dev", synth.jsonl["dev"], synth.image_root)
    report = evaluate_nlvr(
        str(tmp_path / "checkpoint_best.pth"), str(data), str(tmp_path / "out"),
        {"device": "cpu", "num_workers": 0, "image_res": 64},
    )  # fmt: skip
    assert report["num_pairs"] == 8 and report["weights"]["missing"] == [] and report["weights"]["unexpected"] == []
    assert report["weights"]["layout"] == "task" and 0 <= report["accuracy"] <= 100
    assert (tmp_path / "out" / "eval" / "nlvr_nlvr2_test.json").is_file()
