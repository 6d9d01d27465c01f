"""Pure state-dict converters for the task models: official task checkpoints and official pretrained
checkpoints -> our task-model keys, each with a `ConversionReport` (model/convert.py).

Two steps, both on plain dicts:
  1. `official_task_keys`: what the official task script does to a PRE-TRAINED checkpoint before its
     `load_state_dict(strict=False)` (the `for key in list(state_dict.keys())` loop of Retrieval.py,
     VE.py, Grounding.py, VQA.py, Pretrain_nlvr.py; NLVR.py has none). Emulated on key names and
     returned as {official task key: source key}. The loops hard-code 6, the first fusion layer of
     BERT-base; here it is `fusion_layer`.
  2. `to_our_keys`: official task-model names -> ours: `text_encoder(_m).bert.` / `text_decoder(_m).bert.`
     lose `bert.` (our modules hold embeddings/encoder/cls directly), `position_ids` are recomputed, the
     MLM decoder weight/bias are tied structurally (checked equal to what they are tied to), and tied
     tensors of our model (NLVR's shared cross-attention key/value) are checked equal.
Position embeddings are resampled to the model's grid first, as the official scripts do
(`interpolate_pos_embed`). Shapes are checked against the model built on the meta device.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Literal

import torch

from model.convert import ConversionReport
from model.vision import resample_pos_embed

__all__ = [
    "TaskName",
    "official_task_keys",
    "to_our_key",
    "convert_task_state",
    "is_official_pretrain",
]

TaskName = Literal["retrieval", "grounding", "ve", "nlvr_ta", "nlvr", "vqa"]
StateDict = dict[str, torch.Tensor]
_BERT = re.compile(r"^(text_encoder(?:_m)?|text_decoder(?:_m)?)\.bert\.")
_POS_EMBED = ("visual_encoder.pos_embed", "visual_encoder_m.pos_embed")


def is_official_pretrain(sd: dict[str, Any]) -> bool:
    """An official pre-trained checkpoint (model_pretrain: `text_encoder.bert.*`)."""
    return any(k.startswith("text_encoder.bert.") for k in sd)


def _strip_bert(sd: dict[str, str]) -> None:
    """Retrieval.py / VE.py / Grounding.py: every key holding 'bert' loses 'bert.'."""
    for key in list(sd):
        if "bert" in key:
            sd[key.replace("bert.", "")] = sd.pop(key)


def _nlvr_ta_loop(sd: dict[str, str], fusion_layer: int) -> None:
    """Pretrain_nlvr.py: 'bert.' dropped; fusion layer l is copied to layers 2(l-f)+f and 2(l-f)+f+1."""
    for key in list(sd):
        if "bert" not in key:
            continue
        new_key = key.replace("bert.", "")
        parts = new_key.split(".")
        if "layer" in new_key and int(parts[3]) >= fusion_layer:
            first = (int(parts[3]) - fusion_layer) * 2 + fusion_layer
            for layer in (first, first + 1):
                sd[".".join([*parts[:3], str(layer), *parts[4:]])] = sd[key]
        else:
            sd[new_key] = sd[key]
        del sd[key]


def _vqa_loop(sd: dict[str, str], fusion_layer: int) -> None:
    """VQA.py: the text encoder keeps its layers ('bert.' dropped); its fusion layers l also become
    decoder layers l - f, its embeddings and MLM head the decoder's (text_encoder_m -> text_decoder_m)."""
    for key in list(sd):
        if "bert" in key:
            sd[key.replace("bert.", "")] = sd[key]  # the original key stays for the decoder step
        if "text_encoder" not in key:
            continue
        parts = key.split(".")
        if "layer" in key:
            layer = int(parts[4])  # text_encoder(_m).bert.encoder.layer.N...
            if layer < fusion_layer:
                del sd[key]
                continue
            encoder_key = ".".join([*parts[:4], str(layer - fusion_layer), *parts[5:]])
        else:
            encoder_key = key
        sd[encoder_key.replace("text_encoder", "text_decoder")] = sd[key]
        del sd[key]


def official_task_keys(keys: Iterable[str], task: TaskName, *, fusion_layer: int) -> dict[str, str]:
    """{official task-model key: pre-trained key} after the task script's key loop (names only).

    `keys`: a pre-trained checkpoint's keys (model_pretrain; for "nlvr" the Pretrain_nlvr checkpoint,
    which NLVR.py loads unchanged). Keys the model lacks are still in the result: `load_state_dict(
    strict=False)` then ignores them (the official "unexpected_keys").
    """
    sd = {k: k for k in keys}
    if task in ("retrieval", "grounding", "ve"):
        _strip_bert(sd)
    elif task == "nlvr_ta":
        _nlvr_ta_loop(sd, fusion_layer)
    elif task == "vqa":
        _vqa_loop(sd, fusion_layer)
    elif task != "nlvr":
        raise ValueError(f"unknown task {task!r}")
    return sd


def to_our_key(key: str) -> str | None:
    """Official task-model key -> ours; None for tensors our model recomputes or ties structurally."""
    if key.endswith("embeddings.position_ids") or ".cls.predictions.decoder." in key:
        return None
    return _BERT.sub(r"\1.", key)


def _check_decoder_ties(sd: StateDict, report: ConversionReport) -> None:
    for key, tensor in sd.items():
        if ".cls.predictions.decoder." not in key:
            continue
        head = key[: key.index(".cls.predictions.decoder.")]
        if key.endswith(".weight"):
            candidates = [f"{head}.bert.embeddings.word_embeddings.weight", f"{head}.embeddings.word_embeddings.weight"]
            reason = "tied to embeddings.word_embeddings.weight"
        else:
            candidates = [f"{head}.cls.predictions.bias"]
            reason = "tied to cls.predictions.bias"
        for other in candidates:
            if other in sd and not (tensor.is_meta or torch.equal(tensor, sd[other])):
                raise ValueError(f"{key} differs from {other}; our model ties them, so this checkpoint cannot load")
        report.skipped[key] = reason


def convert_task_state(
    state_dict: dict[str, Any],
    shapes: dict[str, torch.Size],
    *,
    task: TaskName,
    fusion_layer: int,
    tied: Iterable[tuple[str, str]] = (),
    skip: dict[str, str] | None = None,
) -> tuple[StateDict, ConversionReport]:
    """Official task checkpoint, official pre-trained checkpoint or our own -> our task-model state dict.

    Args:
        state_dict: `{'model': sd}` or sd.
        shapes: our model's keys and shapes (built on the meta device).
        task: decides the pre-trained key loop (applied when the source is an official pre-trained
            checkpoint, or for "nlvr" a text-assignment one; see `official_task_keys`).
        tied: pairs of our keys that are one tensor in our model; their values must be equal.
        skip: source keys (official names) to drop with the given reason instead of reporting them
            as unexpected (tensors the official model holds but never uses).
    Returns our state dict and the report: `mapped` (source key, our key), `skipped` with reasons,
    `missing` (our keys not provided: they keep their init), `unexpected` (source keys ignored, as the
    official `strict=False` load ignores them). A shape mismatch raises.
    """
    sd = state_dict["model"] if isinstance(state_dict.get("model"), dict) else state_dict
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"state dict has non-tensor entries {bad[:5]}")
    pretrain = is_official_pretrain(sd) or (task == "nlvr" and "ta_head.weight" in sd)
    report = ConversionReport(layout=f"official pretrain -> {task}" if pretrain else "task")
    names = official_task_keys(sd, task, fusion_layer=fusion_layer) if pretrain else {k: k for k in sd}
    _check_decoder_ties({k: sd[src] for k, src in names.items()}, report)
    out: StateDict = {}
    for key, src in names.items():
        ours = to_our_key(key)
        if ours is None:
            report.skipped.setdefault(key, "position ids are recomputed")
        elif skip and key in skip:
            report.skipped[key] = skip[key]
        elif ours not in shapes:
            report.unexpected.append(key)
        else:
            tensor = sd[src]
            if ours.endswith(_POS_EMBED) and tuple(tensor.shape) != tuple(shapes[ours]):
                grid = round((shapes[ours][1] - 1) ** 0.5)
                tensor = resample_pos_embed(tensor, grid)
                report.interpolated.append(ours)
            if tuple(tensor.shape) != tuple(shapes[ours]):
                raise ValueError(f"{src} -> {ours}: checkpoint shape {tuple(tensor.shape)} != {tuple(shapes[ours])}")
            out[ours] = tensor
            report.mapped.append((src, ours))
    for a, b in tied:
        if a in out and b in out and not (out[a].is_meta or torch.equal(out[a], out[b])):
            raise ValueError(f"{a} and {b} are one tensor in our model but differ in the checkpoint")
        if a in out and b not in out:
            out[b] = out[a]
        elif b in out and a not in out:
            out[a] = out[b]
    report.missing = sorted(set(shapes) - set(out))
    return out, report
