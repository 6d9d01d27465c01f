"""`albef export`: one consolidated weights file, readable without DeepSpeed, with its config and card.

    albef export --checkpoint runs/4m --output albef_4m.safetensors
    albef export --checkpoint runs/4m --output ALBEF_4M_ours.pth --layout official   # the official .pth

The source is a DeepSpeed checkpoint (run folder, checkpoints folder or tag folder; see
pipeline/runtime/checkpoint.py) or an already exported file (to switch layout or format). Weights
come from the module state dict in the tag's `mp_rank_00_model_states.pt` (every parameter and
buffer: momentum twins and queues included). When the engine trained in fp16/bf16 those module
parameters are rounded copies, so the trainable ones are replaced by the fp32 master weights
gathered from the ZeRO partitions (rebuilt weights-only in pipeline/runtime/io.py): the export is
the full-precision model. Every read is weights-only.

Written, each atomically (temporary name, then rename), next to each other:
    NAME.safetensors  (default: a format that cannot carry code; contiguous tensors, our layout)
      or NAME.pth     ({'model': state_dict, 'model_config', 'meta'}; the only format of the
                       official layout, `--layout official`, which model/convert.py `to_official` makes)
    NAME.json         {'model_config': ALBEFConfig as a dict, 'meta': layout, format, source, step,
                       task, initial weights, data}: `read_checkpoint` rebuilds the model from it
    NAME.md           a short model card: architecture, initial weights, data manifests with counts,
                       steps, and the final metrics when the run folder holds eval reports
An existing NAME.json / NAME.md that `albef export` did not write is never overwritten.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

from model.config import ALBEFConfig
from model.convert import from_official, to_official
from pipeline.config import ConfigError, check, from_dict
from pipeline.data import read_manifest
from pipeline.runtime.exit_codes import CONFIG_ERROR_EXIT_CODE
from pipeline.runtime.io import (
    LoadedCheckpoint,
    read_checkpoint,
    safetensors_save_atomic,
    torch_save_atomic,
    write_json_atomic,
    write_text_atomic,
)
from pipeline.runtime.logs import setup_logging

logger = logging.getLogger(__name__)

Layout = Literal["ours", "official"]
Format = Literal["safetensors", "pth"]

SUFFIXES: dict[str, tuple[str, ...]] = {"safetensors": (".safetensors",), "pth": (".pth", ".pt")}
EXPORT_MARK = "albef_export"  # key of our sidecar JSON; the first line of our card names it too
CARD_FIRST_LINE = f"<!-- {EXPORT_MARK}: written by `albef export`, rewritten on every export -->"


def export_command(checkpoint: str, output: str, layout: str = "ours", format: str | None = None) -> int:
    """`albef export`: the exit code (0, or 2 with one line naming the key for a bad input)."""
    setup_logging(0)
    try:
        export(checkpoint, output, layout, format)  # type: ignore[arg-type]
    except ConfigError as err:
        logger.error("%s", err)
        return CONFIG_ERROR_EXIT_CODE
    return 0


def export(checkpoint: str, output: str, layout: Layout = "ours", format: Format | None = None) -> str:
    """Write the export (see the module doc); returns the weights file's path.

    Raises ConfigError naming `layout`, `format`, `output` or `checkpoint` (unreadable, not
    weights-only, not found), before writing anything.
    """
    check(layout in ("ours", "official"), "layout", f"must be 'ours' or 'official', got {layout!r}")
    fmt = format or ("pth" if layout == "official" else "safetensors")
    check(fmt in SUFFIXES, "format", f"must be 'safetensors' or 'pth', got {fmt!r}")
    check(layout == "ours" or fmt == "pth", "format", "the official layout is a .pth file (--format pth)")
    out = Path(output)
    check(
        out.suffix in SUFFIXES[fmt],
        "output",
        f"{out}: a {fmt} export must end in {' or '.join(SUFFIXES[fmt])} (--format picks safetensors or pth)",
    )
    check(not out.is_dir(), "output", f"{out} is a folder")
    for side in (out.with_suffix(".json"), out.with_suffix(".md")):
        check(not side.exists() or _written_by_export(side), "output", f"{side} exists and is not an export's: kept")
    try:
        loaded = read_checkpoint(checkpoint)
    except (OSError, ValueError) as err:
        raise ConfigError("checkpoint", str(err)) from None
    check(bool(loaded.state_dict), "checkpoint", f"{loaded.source}: holds no tensors")
    state = _ours(loaded)
    meta = _meta(loaded, layout, fmt)
    write_json_atomic(out.with_suffix(".json"), {EXPORT_MARK: 1, "model_config": loaded.model_config, "meta": meta})
    if fmt == "safetensors":
        safetensors_save_atomic(out, state, {"format": "pt", "layout": layout, "source": meta["source"]})
    else:
        out_state = to_official(state) if layout == "official" else state
        torch_save_atomic(out, {"model": out_state, "model_config": loaded.model_config, "meta": meta})
    write_text_atomic(out.with_suffix(".md"), model_card(out.name, loaded.model_config, meta))
    logger.info("exported %d tensors (%s layout, %s) from %s to %s", len(state), layout, fmt, loaded.source, out)
    return str(out)


def _written_by_export(path: Path) -> bool:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    if path.suffix == ".md":
        return text.startswith(CARD_FIRST_LINE)
    try:
        data = json.loads(text)
    except ValueError:
        return False
    return isinstance(data, dict) and EXPORT_MARK in data


def _ours(loaded: LoadedCheckpoint) -> dict[str, Any]:
    """The state dict in our layout (an official-layout export is converted back)."""
    if loaded.meta.get("layout") != "official":
        return loaded.state_dict
    if loaded.model_config is None:
        raise ConfigError("checkpoint", f"{loaded.source}: an official-layout export without its model_config")
    state, _ = from_official(loaded.state_dict, from_dict(ALBEFConfig, loaded.model_config, "model_config"))
    return state


def _meta(loaded: LoadedCheckpoint, layout: str, fmt: str) -> dict[str, Any]:
    """What the export says about itself (and its card shows): provenance, training, data, metrics."""
    facts = loaded.meta
    if loaded.kind != "deepspeed":  # re-export of an export: keep what the first export recorded
        kept = {**facts, "layout": layout, "format": fmt, "source": facts.get("source", loaded.source)}
        return {**kept, "eval_image_res": loaded.eval_image_res}
    config = facts.get("config") or {}
    run = facts.get("run") or {}
    model = config.get("model") or {}
    data = config.get("data") or {}
    folders = list(data.get("train") or []) + ([data["val"]] if data.get("val") else [])
    return {
        "layout": layout,
        "format": fmt,
        "source": loaded.source,
        "step": loaded.step,
        "eval_image_res": loaded.eval_image_res,  # px the run's zero-shot evaluation uses (None: model resolution)
        "task": facts.get("task"),
        "samples_seen": run.get("samples_seen"),
        "bad_samples": run.get("bad_samples"),
        "world_size": facts.get("world_size"),
        "initial_weights": {
            "checkpoint": facts.get("initial_checkpoint"),
            "vision": model.get("vision_weights"),
            "text": model.get("text_weights"),
        },
        "data": [_manifest_summary(folder, role) for folder, role in zip(folders, _roles(data))],
        "metrics": _eval_reports(Path(loaded.source)),
    }


def _roles(data: dict[str, Any]) -> list[str]:
    return ["train"] * len(data.get("train") or []) + (["val"] if data.get("val") else [])


def _manifest_summary(folder: str, role: str) -> dict[str, Any]:
    try:
        manifest = read_manifest(folder)
    except (OSError, ValueError) as err:
        return {"path": folder, "role": role, "error": str(err)}
    keys = ("source", "split", "num_samples", "num_captions")
    return {"path": folder, "role": role, **{k: manifest.get(k) for k in keys}}


def _eval_reports(tag_dir: Path) -> list[dict[str, Any]]:
    """The metrics of RUN/eval/*.json (`albef evaluate retrieval` reports) of the tag's run folder."""
    if tag_dir.parent.name != "checkpoints":  # not RUN/checkpoints/TAG: no run folder to look in
        return []
    run_dir = tag_dir.parent.parent
    reports = []
    for path in sorted((run_dir / "eval").glob("*.json")):
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(report, dict) and isinstance(report.get("metrics"), dict):
            keep = ("dataset", "split", "checkpoint_step", "metrics")
            reports.append({"report": path.name, **{k: report.get(k) for k in keep}})
    return reports


def model_card(name: str, model_config: dict[str, Any] | None, meta: dict[str, Any]) -> str:
    """A short Markdown card of an export (see the module doc)."""
    lines = [CARD_FIRST_LINE, f"# {name}", ""]
    lines += [
        f"ALBEF weights exported from `{meta.get('source')}` ({meta.get('layout')} layout, {meta.get('format')}).",
        "",
        "## Architecture",
        *_architecture(model_config),
        "",
        "## Training",
        f"- task: {meta.get('task') or 'unknown'}; optimizer steps: {_n(meta.get('step'))}; "
        f"images seen: {_n(meta.get('samples_seen'))}; skipped samples: {_n(meta.get('bad_samples'))}; "
        f"world size: {_n(meta.get('world_size'))}",
    ]
    init = meta.get("initial_weights") or {}
    named = [f"{k}: `{v}`" for k, v in init.items() if v]
    lines += [f"- initial weights: {'; '.join(named) if named else 'random initialisation'}", "", "## Data"]
    rows = meta.get("data") or []
    lines += ["| role | manifest | source | split | images | captions |", "|---|---|---|---|---|---|"] if rows else []
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['role']} | `{row['path']}` | unreadable now: {row['error']} | | | |")
            continue
        cells = (row.get("source"), row.get("split"), _n(row.get("num_samples")), _n(row.get("num_captions")))
        lines.append(f"| {row['role']} | `{row['path']}` | " + " | ".join(str(c) for c in cells) + " |")
    lines += [] if rows else ["not recorded"]
    lines += ["", "## Metrics", *_metrics(meta.get("metrics") or []), ""]
    return "\n".join(lines)


def _architecture(config: dict[str, Any] | None) -> list[str]:
    if not config:
        return ["- not recorded (no model config in the checkpoint)"]
    v, t = config.get("vision", {}), config.get("text", {})
    fusion = t.get("fusion_layer", 0)
    return [
        f"- vision: ViT, {v.get('image_size')} px, patch {v.get('patch_size')}, width {v.get('width')}, "
        f"{v.get('depth')} layers, {v.get('num_heads')} heads",
        f"- text: BERT, width {t.get('hidden_size')}, {fusion} text + {_n(t.get('num_layers', 0) - fusion)} "
        f"fusion layers, {t.get('num_heads')} heads, vocabulary {t.get('vocab_size')}",
        f"- ITC: embedding {config.get('embed_dim')}, queue {config.get('queue_size')}, "
        f"momentum {config.get('momentum')}, initial temperature {config.get('temp')}",
    ]


def _metrics(reports: list[dict[str, Any]]) -> list[str]:
    if not reports:
        return ["no evaluation reports in the run folder (`albef evaluate retrieval` writes RUN/eval/*.json)"]
    out = [
        "| report | score | TR@1 | TR@5 | TR@10 | IR@1 | IR@5 | IR@10 | r_mean |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    keys = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")
    for report in reports:
        for score, values in report["metrics"].items():
            cells = " | ".join(f"{values[k]:.2f}" if isinstance(values.get(k), float | int) else "" for k in keys)
            label = f"{report.get('dataset')} {report.get('split') or ''} (step {_n(report.get('checkpoint_step'))})"
            out.append(f"| {label} | {score} | {cells} |")
    return out


def _n(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else "unknown"
