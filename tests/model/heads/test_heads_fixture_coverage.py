"""Every top-level entry of each `<task>_outputs.pt` is compared by a parity test (listed here), so a
fixture that gains an output fails until a test checks it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

INPUT_TOKENS = {"input_ids", "attention_mask"}  # tokenizer outputs, fed to our models as given
CHECKED = {
    "retrieval": INPUT_TOKENS
    | {
        "temp", "image_embeds", "image_feat", "text_embeds", "text_feat", "sim_i2t", "sim_t2i", "image_feat_m",
        "text_feat_m", "image_queue", "text_queue", "idx_queue", "queue_ptr", "sim_targets", "sim_i2t_queue",
        "sim_t2i_queue", "sim_i2t_targets", "sim_t2i_targets", "itc_loss_pre_update", "fusion_pos_hidden",
        "itm_logits_pos", "forward1", "forward2", "eval",
    },
    "ve": INPUT_TOKENS
    | {"image_embeds", "multimodal_hidden", "logits", "logits_m", "loss_ce", "loss_pre_update", "logits_eval_forward", "forward"},
    "nlvr": INPUT_TOKENS
    | {
        "image_embeds", "hidden_states", "multimodal_hidden", "logits", "logits_m", "loss_ce", "loss_pre_update",
        "logits_eval_forward", "layer_image", "forward",
    },
    # forward.draws / draw_kinds: covered through the pairs and labels they decode to (same seed, same pairs)
    "nlvr_ta": INPUT_TOKENS | {"image_embeds", "image_feat", "sim", "weights", "forward"},
    "vqa": {
        "question_input_ids", "question_attention_mask", "answer_input_ids", "answer_attention_mask",
        "answer_targets", "image_embeds", "question_states", "question_index_per_answer", "decoder_hidden",
        "decoder_logits_top5", "decoder_logits_top5_ids", "answer_token_logprob", "answer_nll", "answer_distill_ce",
        "answer_loss_pre_update", "loss_pre_update", "forward", "rank_answer", "evaluation_result",
    },
    "grounding": INPUT_TOKENS | {"gradcam"},
}  # fmt: skip


@pytest.mark.parametrize("task", sorted(CHECKED))
def test_every_output_is_checked(heads_dir: Path, task: str) -> None:
    outputs = torch.load(heads_dir / task / f"{task}_outputs.pt", weights_only=True)
    assert set(outputs) - {"inputs"} == CHECKED[task]
