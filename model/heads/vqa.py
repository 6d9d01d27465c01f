"""VQA: question encoder (all BERT layers, cross-attending to the image) + an answer decoder that
generates the answer conditioned on the question states; answers are RANKED from a candidate list.

As the official `models/model_vqa.py`:
  - the answer decoder is a BERT LM with causal self-attention and cross-attention to the question
    states in EVERY layer (`fusion_layer = 0`), `num_layers - fusion_layer` layers (6 for BERT-base),
    its MLM decoder tied to its own word embeddings. `VQA.py` initialises decoder layer i from the
    pre-trained fusion layer fusion_layer + i (cross-attention included), its embeddings and MLM head
    from the pre-trained text encoder's (model/heads/convert.py emulates that key loop);
  - training: answer_loss = (1 - alpha) * NLL + alpha * soft-CE against the momentum decoder, both
    SUMMED over the answer tokens; loss = sum(answer weight * answer_loss) / number of QUESTIONS;
  - inference (`rank_answers`): the k candidates of highest first-token probability, re-ranked by the
    likelihood of the whole answer. The official code adds log p(first token) to the full-sequence
    log-likelihood, which already holds it: the first token counts twice. `VQAConfig.first_token_twice`
    reproduces that (the parity test uses it); the default ranks by the sequence log-likelihood alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ALBEFConfig, ModelConfigError, TextConfig
from model.convert import ConversionReport
from model.heads.base import TaskModel
from model.heads.convert import convert_task_state
from model.heads.ve import meta_shapes
from model.losses import fp32
from model.text import BertEmbeddings, BertLayer, BertOnlyMLMHead, TextEncoder, bert_weight_init, build_text_encoder
from model.vision import VisionEncoder, build_vision_encoder

__all__ = [
    "VQAConfig",
    "VQAOutput",
    "AnswerRanking",
    "AnswerDecoder",
    "ALBEFVQA",
    "build_vqa",
    "load_vqa_state",
    "answer_token_logprobs",
    "answer_loss",
]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class VQAConfig:
    backbone: ALBEFConfig = field(default_factory=ALBEFConfig)  # encoders + momentum (ITC fields unused)
    decoder_layers: int | None = None  # answer decoder depth; None = text num_layers - fusion_layer (official)
    distill: bool = True  # momentum teacher + distillation (official VQA.yaml: True)
    first_token_twice: bool = False  # True: the official ranking score log p(first) + log p(answer)

    def __post_init__(self) -> None:
        if self.decoder_layers is not None and (not isinstance(self.decoder_layers, int) or self.decoder_layers < 1):
            raise ModelConfigError(
                f"VQAConfig.decoder_layers={self.decoder_layers!r}: must be a positive int or None",
                field="decoder_layers",
                value=self.decoder_layers,
            )

    @property
    def num_decoder_layers(self) -> int:
        text = self.backbone.text
        return self.decoder_layers if self.decoder_layers is not None else text.num_layers - text.fusion_layer


@dataclass
class VQAOutput:
    vqa_loss: torch.Tensor  # scalar fp32: sum(weights * answer_loss) / number of questions
    answer_loss: torch.Tensor  # [N] fp32 per answer (sums over its tokens)

    @property
    def loss(self) -> torch.Tensor:
        return self.vqa_loss

    def losses(self) -> dict[str, torch.Tensor]:
        return {"vqa_loss": self.vqa_loss}

    def metrics(self) -> dict[str, torch.Tensor]:
        return {"answer_loss_mean": self.answer_loss.detach().mean()}


class AnswerRanking(NamedTuple):
    topk_ids: torch.Tensor  # [B, k] indices into the answer list, best first
    topk_probs: torch.Tensor  # [B, k] softmax over the k re-ranked scores
    first_topk_ids: torch.Tensor  # [B, k] the candidates, by first-token probability
    first_topk_probs: torch.Tensor  # [B, k] their first-token probabilities
    scores: torch.Tensor  # [B, k] ranking score of first_topk_ids (log-likelihood)


class _Layers(nn.Module):
    def __init__(self, layers: list[BertLayer]) -> None:
        super().__init__()
        self.layer = nn.ModuleList(layers)


class AnswerDecoder(nn.Module):
    """BERT LM decoder: causal self-attention, cross-attention to the question in every layer, tied
    MLM head. Keys as the official `text_decoder.bert.*` / `text_decoder.cls.*` minus `bert.`."""

    def __init__(self, config: TextConfig, num_layers: int) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = _Layers([BertLayer(config, cross_attention=True) for _ in range(num_layers)])
        self.cls = BertOnlyMLMHead(config)
        self.apply(bert_weight_init(config))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        question_states: torch.Tensor,
        question_mask: torch.Tensor,
    ) -> torch.Tensor:
        """input_ids / attention_mask [N, L] (None = all tokens), question_states [N, Lq, D], question_mask
        [N, Lq] -> vocabulary logits [N, L, V] (position t predicts token t + 1)."""
        x = self.hidden_states(input_ids, attention_mask, question_states, question_mask)
        head = self.cls.predictions
        return F.linear(head.transform(x), self.embeddings.word_embeddings.weight, head.bias)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        question_states: torch.Tensor,
        question_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Last hidden state [N, L, D] (the input of the MLM head)."""
        n, length = input_ids.shape
        causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
        mask = causal[None, None].expand(n, 1, length, length)  # [N, 1, L, L] True = attend
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, None, :]
        q_keys = question_mask.bool()[:, None, None, :]
        x = self.embeddings(input_ids)
        for layer in self.encoder.layer:
            x = layer(x, mask, question_states, q_keys)
        return x


@fp32
def answer_token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """log p(token t+1 | tokens <= t) [N, L-1] (fp32) of the answer tokens after [CLS]; 0 at padding."""
    targets = input_ids[:, 1:].masked_fill(input_ids[:, 1:] == pad_token_id, IGNORE_INDEX)
    n, steps = targets.shape
    nll = F.cross_entropy(logits[:, :-1].float().reshape(n * steps, -1), targets.reshape(-1), reduction="none")
    return -nll.view(n, steps)


@fp32
def answer_loss(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    pad_token_id: int,
    logits_m: torch.Tensor | None,
    alpha: float | torch.Tensor,
) -> torch.Tensor:
    """Per-answer loss [N]: (1 - alpha) * NLL + alpha * soft-CE(softmax(logits_m)), summed over tokens."""
    nll = -answer_token_logprobs(logits, input_ids, pad_token_id).sum(1)
    if logits_m is None:
        return nll
    valid = (input_ids[:, 1:] != pad_token_id).float()
    log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    soft = -(log_probs * F.softmax(logits_m[:, :-1].float(), dim=-1)).sum(-1)
    return (1 - alpha) * nll + alpha * (soft * valid).sum(1)


class ALBEFVQA(TaskModel):
    """Inputs: image [B, 3, H, W]; question_ids / question_mask [B, Lq]; answers as `[CLS] answer [SEP]`
    token ids [N, La] (pad 0), N = sum of answers_per_question."""

    momentum_modules = ("visual_encoder", "text_encoder", "text_decoder")
    visual_encoder_m: VisionEncoder
    text_encoder_m: TextEncoder
    text_decoder_m: AnswerDecoder

    def __init__(
        self, config: VQAConfig, visual_encoder: VisionEncoder, text_encoder: TextEncoder, text_decoder: AnswerDecoder
    ) -> None:
        super().__init__()
        if text_encoder.cls is not None:
            raise ValueError("the VQA question encoder has no MLM head (the decoder has its own)")
        self.config = config
        self.visual_encoder = visual_encoder
        self.text_encoder = text_encoder
        self.text_decoder = text_decoder
        self._make_twins(config.backbone.momentum, config.backbone.momentum_dropout, enabled=config.distill)

    @property
    def pad_token_id(self) -> int:
        return self.config.backbone.text.pad_token_id

    def encode_question(
        self, image: torch.Tensor, question_ids: torch.Tensor, question_mask: torch.Tensor
    ) -> torch.Tensor:
        """Question states [B, Lq, D]: every text layer, the fusion ones cross-attending to the image."""
        return self.text_encoder(question_ids, question_mask, image_embeds=self.visual_encoder(image), mode="full")

    @torch.no_grad()
    def encode_question_m(
        self, image: torch.Tensor, question_ids: torch.Tensor, question_mask: torch.Tensor
    ) -> torch.Tensor:
        return self.text_encoder_m(question_ids, question_mask, image_embeds=self.visual_encoder_m(image), mode="full")

    def forward(
        self,
        image: torch.Tensor,
        question_ids: torch.Tensor,
        question_mask: torch.Tensor,
        answer_ids: torch.Tensor,
        answer_mask: torch.Tensor,
        answer_weights: torch.Tensor,
        answers_per_question: torch.Tensor,
        alpha: float | torch.Tensor,
    ) -> VQAOutput:
        """answer_weights [N] (fp32; official: count / 10 per unique human answer), answers_per_question [B]
        int (answers of question b are rows sum(k[:b]) .. of answer_ids)."""
        rep = torch.repeat_interleave(torch.arange(image.shape[0], device=question_ids.device), answers_per_question)
        states = self.encode_question(image, question_ids, question_mask)
        logits = self.text_decoder(answer_ids, answer_mask, states[rep], question_mask[rep])
        logits_m = None
        if self.has_teacher:
            with torch.no_grad():
                states_m = self.encode_question_m(image, question_ids, question_mask)
                logits_m = self.text_decoder_m(answer_ids, answer_mask, states_m[rep], question_mask[rep])
        per_answer = answer_loss(logits, answer_ids, self.pad_token_id, logits_m, alpha)
        loss = (answer_weights.float() * per_answer).sum() / image.shape[0]
        return VQAOutput(loss, per_answer)

    @torch.no_grad()
    def first_token_probs(
        self, states: torch.Tensor, question_mask: torch.Tensor, answer_ids: torch.Tensor
    ) -> torch.Tensor:
        """p(first answer token | [CLS], question) of every candidate answer [B, A] (fp32)."""
        start = answer_ids[:1, :1].expand(states.shape[0], 1)  # [CLS] per question
        logits = self.text_decoder(start, None, states, question_mask)[:, 0].float()  # [B, V]
        return F.softmax(logits, dim=1).index_select(1, answer_ids[:, 1])

    @torch.no_grad()
    def candidate_logprobs(
        self, states: torch.Tensor, question_mask: torch.Tensor, answer_ids: torch.Tensor, answer_mask: torch.Tensor
    ) -> torch.Tensor:
        """Token log-probabilities [B, k, La-1] of k candidates per question (answer_ids [B, k, La])."""
        b, k, length = answer_ids.shape
        ids = answer_ids.reshape(b * k, length)
        logits = self.text_decoder(
            ids,
            answer_mask.reshape(b * k, length),
            states.repeat_interleave(k, dim=0),  # each question's states k times in a row
            question_mask.repeat_interleave(k, dim=0),
        )
        return answer_token_logprobs(logits, ids, self.pad_token_id).view(b, k, length - 1)

    @torch.no_grad()
    def rank_answers(
        self,
        image: torch.Tensor,
        question_ids: torch.Tensor,
        question_mask: torch.Tensor,
        answer_ids: torch.Tensor,
        answer_mask: torch.Tensor,
        k: int,
    ) -> AnswerRanking:
        """Rank a candidate list (answer_ids / answer_mask [A, La], `[CLS] answer [SEP]`) for each question:
        top k by first-token probability, re-ranked by the answer log-likelihood (see the module doc)."""
        states = self.encode_question(image, question_ids, question_mask)
        return self.rank_answers_from_states(states, question_mask, answer_ids, answer_mask, k)

    @torch.no_grad()
    def rank_answers_from_states(
        self,
        states: torch.Tensor,
        question_mask: torch.Tensor,
        answer_ids: torch.Tensor,
        answer_mask: torch.Tensor,
        k: int,
    ) -> AnswerRanking:
        """`rank_answers` from the question states [B, Lq, D] (evaluation encodes each image once for
        all its questions)."""
        k = min(k, answer_ids.shape[0])
        first_topk_probs, first_topk_ids = self.first_token_probs(states, question_mask, answer_ids).topk(k, dim=1)
        token_logprobs = self.candidate_logprobs(
            states, question_mask, answer_ids[first_topk_ids], answer_mask[first_topk_ids]
        )
        scores = token_logprobs.sum(-1)
        if self.config.first_token_twice:
            scores = first_topk_probs.log() + scores
        topk_probs, rerank = F.softmax(scores, dim=-1).topk(k, dim=1)
        return AnswerRanking(first_topk_ids.gather(1, rerank), topk_probs, first_topk_ids, first_topk_probs, scores)


def build_vqa(config: VQAConfig) -> ALBEFVQA:
    text = config.backbone.text
    model = ALBEFVQA(
        config,
        build_vision_encoder(config.backbone.vision),
        build_text_encoder(text, with_mlm_head=False),
        AnswerDecoder(text, config.num_decoder_layers),
    )
    logger.info("built ALBEF VQA: %.1fM trainable parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    return model


def load_vqa_state(model: ALBEFVQA, state_dict: dict[str, Any]) -> ConversionReport:
    """Official VQA checkpoint, official pre-trained one (VQA.py's key loop: decoder from the fusion
    layers, embeddings and MLM head) or ours. Every key must be provided; unexpected ones are reported
    (a pre-trained checkpoint's projections, ITM head, queues: unused by VQA)."""
    shapes = meta_shapes(build_vqa, model.config)
    out, report = convert_task_state(
        state_dict, shapes, task="vqa", fusion_layer=model.config.backbone.text.fusion_layer
    )
    if report.missing:
        raise ValueError(f"checkpoint does not fit the VQA model: missing {report.missing}")
    model.load_state_dict(out, strict=True)
    logger.info("VQA weights loaded (%s)", report.summary())
    return report
