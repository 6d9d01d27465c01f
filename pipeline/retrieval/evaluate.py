"""Retrieval evaluation: encode a split once, score it (ITC, ITM re-ranking, ITM+ITC), compute recall.

`evaluate_model` is the one evaluation core: `albef evaluate retrieval` runs it on a checkpoint,
retrieval fine-tuning runs it as its per-epoch validation on the model in memory.

Each rank encodes its share of the split (the loader's images of that rank; a contiguous block of the
caption batches), the shares are all-gathered (rows copied, no arithmetic) so every rank holds the
whole encoded split; then each rank re-ranks its share of the pairs and those are all-gathered too
(pipeline/retrieval/rerank.py). Images are put in (source, key) order whatever the loader's worker
interleaving or the rank that encoded them, so the numbers do not depend on num_workers or world size.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from model.config import ALBEFConfig, ModelConfigError
from model.retrieval import ALBEFRetrieval, build_retrieval, load_retrieval_state
from pipeline.config import ConfigError, check, from_dict, load_config
from pipeline.data import build_eval_loader, caption_index
from pipeline.data.text import build_tokenizer, tokenize
from pipeline.retrieval.metrics import (
    chance_metrics,
    metrics_from_ranks,
    paired_r1_difference,
    query_ranks,
    recall_curves,
)
from pipeline.retrieval.rerank import EncodedSplit, all_gather_rows, row_range, score_matrices, score_matrices_grouped
from pipeline.runtime.distributed import all_gather_objects
from pipeline.runtime.io import LoadedCheckpoint, read_checkpoint
from pipeline.runtime.preemption import check_stop, stop_requested_here

logger = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "fp16", "bf16"]
CURVE_KS = (1, 2, 5, 10, 20, 50, 100)  # recall@K plot; K beyond k_test is dropped (ITM leaves those unscored)


@dataclass
class EvalConfig:
    """Retrieval evaluation knobs (`--name=value` on the command line, `eval.*` in fine-tuning YAML).

    During fine-tuning's validation the model is already in memory: image_res, preset, precision,
    device, dataset and save_scores apply to `albef evaluate retrieval` only.
    """

    k_test: int = 256  # candidates re-ranked by ITM per query (paper: COCO 256, Flickr 128)
    image_batch_size: int = 64  # images per encoder forward
    text_batch_size: int = 256  # captions per encoder forward
    pairs_per_batch: int = 1024  # (query, candidate) pairs per fusion forward (memory knob)
    max_words: int = 30  # pre_caption word cut
    max_tokens: int = 30  # tokenizer max length (official eval: 30)
    num_workers: int = 4  # loader worker processes
    # px; None = the resolution the checkpoint's run evaluates at (a pretraining run: its model.eval_image_res,
    # the paper's 384 for zero-shot), else its model resolution; position embeddings resampled when they differ
    image_res: int | None = None
    preset: Literal["auto", "tiny", "base"] = "auto"  # model size when the checkpoint carries no config
    precision: Precision = "auto"  # auto = fp16 on a GPU, fp32 on the CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    vocab: str | None = None  # bert-base-uncased vocab.txt; None = the bundled one
    # whose r_mean fine-tuning keeps as `best` (pipeline/retrieval/rerank.py describes each score)
    score_for_best: Literal["itc", "itm", "itm_itc", "itm_itc_logit"] = "itm"
    dataset: str | None = None  # name in the output file; None = the manifest's `source`
    save_scores: bool = False  # also write the score matrices (DIR/eval/<stem>_scores.pt) for analysis
    exact: bool = False  # True: the official loop's arithmetic (captions padded to one length, full last
    # fusion layer), bit-identical on the CPU; False: grouped by image, keys/values cached (~1e-7 off)

    def validate(self, prefix: str = "") -> None:
        p = f"{prefix}." if prefix else ""
        for name in ("k_test", "image_batch_size", "text_batch_size", "pairs_per_batch", "max_words"):
            check(getattr(self, name) >= 1, f"{p}{name}", f"must be >= 1, got {getattr(self, name)}")
        check(self.max_tokens >= 3, f"{p}max_tokens", f"must be >= 3 ([CLS] x [SEP]), got {self.max_tokens}")
        check(self.num_workers >= 0, f"{p}num_workers", f"must be >= 0, got {self.num_workers}")
        # A multiple of the checkpoint's patch size: checked when the model config is built.
        check(self.image_res is None or self.image_res >= 1, f"{p}image_res", f"must be >= 1, got {self.image_res}")
        check(self.vocab is None or Path(self.vocab).is_file(), f"{p}vocab", f"file not found: {self.vocab}")


def load_eval_config(k_test: int | None, overrides: Mapping[str, Any] | None) -> EvalConfig:
    """EvalConfig from flat CLI overrides (`eval.` prefixes accepted); unknown keys raise ConfigError."""
    data = {str(k).replace("-", "_").removeprefix("eval."): v for k, v in (overrides or {}).items()}
    data.pop("local_rank", None)  # added by the `deepspeed` launcher
    if k_test is not None:
        data["k_test"] = k_test
    return load_config(EvalConfig, None, data)


# --------------------------------------------------------------------------------------------------
# Checkpoints -> model
# --------------------------------------------------------------------------------------------------


def infer_model_config(loaded: LoadedCheckpoint, preset: str, image_res: int | None) -> Any:
    """The checkpoint's own ALBEFConfig, else a preset chosen by `preset` or by the ViT width.

    The resolution is `image_res` when given, else the one the checkpoint's run evaluates at
    (`loaded.eval_image_res`: a pretraining run's model.eval_image_res), else the model's own.
    """
    if image_res is None and loaded.eval_image_res is not None:
        image_res = loaded.eval_image_res
        logger.info("evaluating at %d px, the resolution the checkpoint's run evaluates at", image_res)
    if loaded.model_config is not None and preset == "auto":
        cfg = from_dict(ALBEFConfig, dict(loaded.model_config), "model_config")
    else:
        if preset == "auto":
            width = loaded.state_dict.get("visual_encoder.cls_token", torch.empty(0, 0, 0)).shape[-1]
            presets = {768: "base", 64: "tiny"}
            if width not in presets:
                raise ConfigError(
                    "preset",
                    f"the checkpoint carries no model config and its ViT width {width} "
                    "matches no preset; pass --preset=tiny|base",
                )
            preset = presets[width]
        queue = loaded.state_dict.get("image_queue")
        kwargs: dict[str, Any] = {}
        if queue is not None:
            kwargs = {"embed_dim": int(queue.shape[0]), "queue_size": int(queue.shape[1])}
        cfg = (ALBEFConfig.tiny if preset == "tiny" else ALBEFConfig.base)(image_size=image_res or 384, **kwargs)
    if image_res is not None and image_res != cfg.vision.image_size:
        try:
            cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, image_size=image_res))
        except ModelConfigError as err:
            raise ConfigError("image_res", str(err)) from None
    return cfg


def read_eval_checkpoint(path: str | Path, cfg: EvalConfig) -> tuple[LoadedCheckpoint, ALBEFConfig]:
    """The checkpoint (weights-only) and the model config to evaluate it with; ConfigError naming
    `checkpoint` when it cannot be read, `image_res` / `preset` when the config cannot be built."""
    try:
        loaded = read_checkpoint(path)
    except (OSError, ValueError) as err:
        raise ConfigError("checkpoint", str(err)) from None
    return loaded, infer_model_config(loaded, cfg.preset, cfg.image_res)


def build_eval_model(
    loaded: LoadedCheckpoint, model_cfg: ALBEFConfig, cfg: EvalConfig, device: torch.device
) -> ALBEFRetrieval:
    """Retrieval model with the checkpoint's weights (any supported layout), eval mode, on `device`."""
    model = build_retrieval(model_cfg)
    load_retrieval_state(model, loaded.state_dict)  # logs what was mapped, skipped, interpolated
    return model.to(device=device, dtype=eval_dtype(cfg.precision, device)).eval()


def eval_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("precision", "fp16 is not supported for CPU evaluation; use fp32 or bf16")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


# --------------------------------------------------------------------------------------------------
# Encoding and scoring
# --------------------------------------------------------------------------------------------------


@dataclass
class EvalSplit:
    """Encoded split + its index maps."""

    encoded: Any  # pipeline.retrieval.rerank.EncodedSplit
    img2txt: list[list[int]]
    txt2img: torch.Tensor
    bad_samples: int


@torch.no_grad()
def encode_split(
    model: Any,
    data: str | Path,
    cfg: EvalConfig,
    device: torch.device,
    tokenizer: Any,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> EvalSplit:
    """Encode every image (once) and every caption of `data` (one `albef prep` output folder).

    With world_size > 1 (collective) each rank encodes the loader's images of its rank and a contiguous
    block of the caption batches; the rows are all-gathered so every rank returns the whole split. The
    caption batches are the same whatever the world size (only their owner changes).
    """

    res = model.config.vision.image_size
    loader = build_eval_loader(
        [data],
        batch_size=cfg.image_batch_size,
        rank=rank,
        world_size=world_size,
        num_workers=cfg.num_workers,
        image_res=res,
        max_words=cfg.max_words,
    )
    order: list[tuple[int, str]] = []
    captions: list[list[str]] = []
    embeds, feats, bad = [], [], 0
    for batch in loader:
        image_embeds, image_feat = model.encode_image(batch["image"].to(device, non_blocking=True))
        embeds.append(image_embeds)
        feats.append(image_feat)
        order += list(zip(batch["source"].tolist(), batch["key"]))
        captions += [[c for c in caps if c] for caps in batch["captions"]]
        bad += sum(batch.get("bad_samples", {}).values())
        if stop_requested_here():  # fine-tuning's validation: stop early; the ranks agree below
            break
    check_stop()  # collective: every rank reaches it once, whatever its share
    shares = all_gather_objects((order, captions, bad), world_size)
    counts = [len(o) for o, _, _ in shares]
    order = [x for o, _, _ in shares for x in o]
    captions = [x for _, c, _ in shares for x in c]
    bad = sum(b for _, _, b in shares)
    if not order:
        raise ValueError(f"{data}: no decodable image in the eval shards")
    if embeds:
        local_embeds, local_feats = torch.cat(embeds), torch.cat(feats)
    else:  # this rank's loader had no image: an empty block of the right shape and dtype
        probe_embeds, probe_feat = model.encode_image(torch.zeros(1, 3, res, res, device=device))
        local_embeds, local_feats = probe_embeds[:0], probe_feat[:0]
    all_embeds = all_gather_rows(local_embeds, counts)
    all_feats = all_gather_rows(local_feats, counts)
    perm = sorted(range(len(order)), key=order.__getitem__)  # (source, key): independent of ranks and workers
    index = torch.tensor(perm, device=device)
    idx = caption_index([captions[i] for i in perm])
    input_ids, mask = tokenize(tokenizer, idx.texts, cfg.max_tokens, padding="longest")  # one L for all
    n_txt, tb = len(idx.texts), cfg.text_batch_size
    n_batches = (n_txt + tb - 1) // tb
    first, end = row_range(n_batches, rank, world_size)  # whole caption batches per rank
    hidden, text_feat = [], []
    for s in range(first * tb, min(end * tb, n_txt), tb):
        h, f = model.encode_text(input_ids[s : s + tb].to(device), mask[s : s + tb].to(device))
        hidden.append(h)
        text_feat.append(f)
        if stop_requested_here():
            break
    check_stop()
    if not hidden:
        h, f = model.encode_text(input_ids[:1].to(device), mask[:1].to(device))
        hidden, text_feat = [h[:0]], [f[:0]]
    text_counts = [
        min(e * tb, n_txt) - min(f * tb, n_txt)
        for f, e in (row_range(n_batches, r, world_size) for r in range(world_size))
    ]
    encoded = EncodedSplit(
        all_embeds[index],
        all_feats[index],
        all_gather_rows(torch.cat(hidden), text_counts),
        mask.to(device),
        all_gather_rows(torch.cat(text_feat), text_counts),
        float(model.clamped_temp()),
    )
    logger.info(
        "encoded %d images, %d captions (%d bad samples skipped; this rank: %d images, %d captions)",
        len(perm),
        n_txt,
        bad,
        local_embeds.shape[0],
        text_counts[rank],
    )
    return EvalSplit(encoded, idx.img2txt, idx.txt2img, bad)


@torch.no_grad()
def score_split(
    model: Any, split: EvalSplit, cfg: EvalConfig, rank: int, world_size: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The three score-matrix pairs (collective when world_size > 1).

    `exact`: the official loop's arithmetic on padded batches (`score_matrices` + `itm_logits`); otherwise
    the grouped path (`score_matrices_grouped`: image keys/values cached, captions packed)."""

    if not cfg.exact:
        grouped = score_matrices_grouped(
            split.encoded,
            cfg.k_test,
            model,
            rank=rank,
            world_size=world_size,
            pairs_per_batch=cfg.pairs_per_batch,
            text_batch_size=cfg.text_batch_size,
        )
        check_stop()
        return grouped

    def itm_fn(image_embeds: torch.Tensor, text_hidden: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        if stop_requested_here():
            # Ranks re-rank different numbers of batches, so they cannot agree here: skip the
            # remaining work (scores are discarded) and agree at the check after the gather.
            return torch.zeros(image_embeds.shape[0], 2, device=image_embeds.device)
        return model.itm_logits(text_hidden, text_mask, image_embeds)

    scores = score_matrices(
        split.encoded,
        cfg.k_test,
        itm_fn,
        rank=rank,
        world_size=world_size,
        pairs_per_batch=cfg.pairs_per_batch,
        trim_padding=False,
    )
    check_stop()
    return scores


def metrics_from_scores(
    scores: Mapping[str, tuple[torch.Tensor, torch.Tensor]], split: EvalSplit, curve_ks: tuple[int, ...] = CURVE_KS
) -> tuple[dict, dict, dict]:
    """(metrics per score incl. chance, recall curves per score incl. chance, each re-ranking's paired R@1
    difference to ITC alone): does re-ranking the top k help on this split? Each matrix is ranked once."""

    n_img, n_txt = len(split.img2txt), len(split.txt2img)
    ranks = {name: query_ranks(pair, split.img2txt, split.txt2img) for name, pair in scores.items()}
    metrics = {name: metrics_from_ranks(r) for name, r in ranks.items()}
    curves = {name: recall_curves(r, curve_ks) for name, r in ranks.items()}
    versus_itc = {name: paired_r1_difference(r, ranks["itc"]) for name, r in ranks.items() if name != "itc"}
    chance = chance_metrics(split.img2txt, n_txt, curve_ks)
    curves["chance"] = {
        "txt": {k: chance[f"txt_r{k}"] for k in curve_ks},
        "img": {k: chance[f"img_r{k}"] for k in curve_ks},
    }
    metrics["chance"] = chance_metrics(split.img2txt, n_txt)
    logger.debug("scored %d images x %d captions", n_img, n_txt)
    return metrics, curves, versus_itc


def evaluate_model(
    model: Any,
    data: str | Path,
    cfg: EvalConfig,
    device: torch.device,
    *,
    rank: int = 0,
    world_size: int = 1,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """Encode, re-rank and score `data` with an in-memory model; every rank gets the same result.

    Returns {"metrics": {score: {...}}, "curves": ..., "rerank_vs_itc": {score: {...}} (see
    `metrics_from_scores`), "scores", "num_images", "num_texts", "bad_samples", "timings"}.
    The model is put in eval mode and restored to its previous mode afterwards.
    """

    tokenizer = tokenizer or build_tokenizer(cfg.vocab)
    was_training = model.training
    model.eval()
    try:
        t0 = time.perf_counter()
        split = encode_split(model, data, cfg, device, tokenizer, rank=rank, world_size=world_size)
        t1 = time.perf_counter()
        scores = score_split(model, split, cfg, rank, world_size)
        t2 = time.perf_counter()
    finally:
        model.train(was_training)
    curve_ks = tuple(k for k in CURVE_KS if k <= max(cfg.k_test, 10))
    metrics, curves, versus_itc = metrics_from_scores(scores, split, curve_ks)
    return {
        "metrics": metrics,
        "curves": curves,
        "rerank_vs_itc": versus_itc,
        "scores": scores,
        "num_images": len(split.img2txt),
        "num_texts": len(split.txt2img),
        "bad_samples": split.bad_samples,
        "timings": {"encode_s": t1 - t0, "rerank_s": t2 - t1},
    }
