"""`albef export`: consolidated files (our layout and the official one) load into a fresh model
without DeepSpeed and give identical outputs; half-precision runs export their fp32 master weights.

The checkpoint comes from a real 3-step bf16 ZeRO-2 run on the CPU (one process), which also shows
that the engine's cast leaves the momentum twins and the queues in fp32.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.convert import from_official
from pipeline.config import ConfigError
from pipeline.runtime import checkpoint
from pipeline.weights.export import export

from pipeline_testutils import REPO_ROOT, launch, make_shards, model_states, pretrain_cmd, read_log, wait_all

pytestmark = [pytest.mark.slow]

TWINS = ("visual_encoder_m.", "vision_proj_m.", "text_encoder_m.", "text_proj_m.")


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    data = make_shards(root / "prep", n_train=64, per_shard=32, image_size=64)
    ds = json.loads((REPO_ROOT / "ds_configs" / "zero2_bf16.json").read_text())
    ds["optimizer"]["params"]["torch_adam"] = True  # FusedAdam would compile for ~2 min on the CPU
    ds["zero_optimization"]["overlap_comm"] = False
    (root / "bf16_cpu.json").write_text(json.dumps(ds))
    cmd = pretrain_cmd(
        root / "run",
        data,
        "--train.max_steps=3",
        "--train.save_every_steps=3",
        "--model.image_res=32",
        f"--deepspeed.config={root / 'bf16_cpu.json'}",
    )
    assert wait_all(launch(cmd, 1, root, "bf16")) == [0], read_log(root, "bf16")[-3000:]
    return root


def _fresh_model(model_config: dict):
    from model.albef import build_albef
    from model.config import ALBEFConfig
    from pipeline.config import from_dict

    torch.manual_seed(123)  # a different init, so a load that silently skipped keys would show
    return build_albef(from_dict(ALBEFConfig, model_config)).eval()


def _outputs(model) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    b = 4
    image = torch.randn(b, 3, 32, 32, generator=g)
    ids = torch.randint(1000, 5000, (b, 12), generator=g)
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    mlm_ids = ids.clone()
    mlm_ids[:, 3] = 103
    neg = torch.tensor([1, 2, 3, 0])
    with torch.no_grad():
        out = model(image, ids, mask, mlm_ids, labels, 0.4, neg_image_idx=neg, neg_text_idx=neg)
    return [out.itc_loss, out.itm_loss, out.mlm_loss, out.image_feat_m, out.text_feat_m, *model.encode_image(image)]


def test_engine_cast_leaves_twins_and_queues_fp32(bf16_run: Path) -> None:
    module = model_states(bf16_run / "run" / "checkpoints", checkpoint.tag_for(3))["module"]
    assert module["visual_encoder.patch_embed.proj.weight"].dtype == torch.bfloat16  # trained weights: engine dtype
    assert module["temp"].dtype == torch.bfloat16
    floats = {k: v for k, v in module.items() if v.is_floating_point()}
    assert all(v.dtype == torch.float32 for k, v in floats.items() if k.startswith(TWINS) or k.endswith("_queue"))


def test_export_ours_and_official_give_identical_outputs(bf16_run: Path, tmp_path: Path) -> None:
    ours = Path(export(str(bf16_run / "run"), str(tmp_path / "ours.pth"), "ours", "pth"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "export",
            "--checkpoint",
            str(bf16_run / "run"),
            "--output",
            str(tmp_path / "official.pth"),
            "--layout",
            "official",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    exported = torch.load(ours, map_location="cpu", weights_only=True)
    official = torch.load(tmp_path / "official.pth", map_location="cpu", weights_only=True)
    assert exported["meta"]["layout"] == "ours" and exported["meta"]["step"] == 3
    assert "text_encoder.bert.embeddings.word_embeddings.weight" in official["model"]  # official key names

    # Full precision: trained weights are the fp32 masters (bf16 module weights are their rounding).
    module = model_states(bf16_run / "run" / "checkpoints", checkpoint.tag_for(3))["module"]
    state = exported["model"]
    assert set(state) == set(module)
    for key, value in module.items():
        if value.dtype == torch.bfloat16:
            assert state[key].dtype == torch.float32 and torch.equal(state[key].bfloat16(), value), key
        else:
            assert torch.equal(state[key], value), key  # twins, queues, queue_ptr: as saved

    a = _fresh_model(exported["model_config"])
    a.load_state_dict(exported["model"], strict=True)
    b = _fresh_model(exported["model_config"])
    official = torch.load(tmp_path / "official.pth", weights_only=True)
    converted, report = from_official(official["model"], b.config, strict=True)
    b.load_state_dict(converted, strict=True)
    assert not report.unexpected and not report.missing
    for x, y in zip(_outputs(a), _outputs(b)):
        assert torch.equal(x, y)
    assert not torch.equal(_outputs(a)[5], _outputs(_fresh_model(exported["model_config"]))[5])  # weights matter

    again = torch.load(
        export(str(tmp_path / "official.pth"), str(tmp_path / "back.pth"), "ours", "pth"), weights_only=True
    )
    assert set(again["model"]) == set(state) and all(torch.equal(again["model"][k], state[k]) for k in state)


def test_export_refuses_what_is_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'checkpoint': no DeepSpeed checkpoint"):
        export(str(tmp_path), str(tmp_path / "x.safetensors"))
    with pytest.raises(ConfigError, match="'layout'"):
        export(str(tmp_path), str(tmp_path / "x.pth"), "hf")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="'output'.*must end in .safetensors"):
        export(str(tmp_path), str(tmp_path / "x.pth"))  # the default format is safetensors
    with pytest.raises(ConfigError, match="'format': the official layout is a .pth"):
        export(str(tmp_path), str(tmp_path / "x.safetensors"), "official", "safetensors")
    assert not list(tmp_path.iterdir())  # nothing written
