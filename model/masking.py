"""BERT-style MLM masking as a pure function (the pipeline's collate calls it, not the model).

Draw order and probabilities follow the official ALBEF `mask()`: masked ~ Bernoulli(p), never on the ids
the caller lists (the official code excludes only [PAD] and [CLS]: [SEP] is masked like any word, so
pretraining passes those two); of the masked, 80% -> [MASK], half of the rest (10%) -> a uniformly random
token id, 10% unchanged.
Labels are the original ids at masked positions and -100 elsewhere (ignored by the loss).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["mask_tokens", "apply_mask_draws"]

IGNORE_INDEX = -100


def apply_mask_draws(
    input_ids: torch.Tensor,
    masked: torch.Tensor,
    replace_draw: torch.Tensor,
    random_draw: torch.Tensor,
    random_words: torch.Tensor,
    *,
    mask_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply given random draws (all [B, L]; booleans + random ids) -> (mlm_input_ids, mlm_labels).

    `masked` must already exclude special tokens. Split out of `mask_tokens` so recorded draws (e.g. the
    official fixture's) can be replayed exactly.
    """
    masked = masked.bool()
    labels = input_ids.masked_fill(~masked, IGNORE_INDEX)
    replaced = replace_draw.bool() & masked
    randomised = random_draw.bool() & masked & ~replaced
    out = input_ids.masked_fill(replaced, mask_token_id)
    out = torch.where(randomised, random_words.to(out.dtype), out)
    return out, labels


def mask_tokens(
    input_ids: torch.Tensor,
    *,
    vocab_size: int,
    mask_token_id: int,
    special_token_ids: Iterable[int],
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask a batch of token ids for MLM.

    Args:
        input_ids: [B, L] token ids (int64); not modified.
        vocab_size: random replacement ids are drawn from [0, vocab_size).
        mask_token_id: id of [MASK].
        special_token_ids: ids never masked (official: [PAD] and [CLS]; [SEP] stays maskable).
        probability: fraction of (non-special) tokens selected.
        generator: torch RNG for reproducible masking (None = the global RNG, as the official code).
    Returns: (mlm_input_ids [B, L], mlm_labels [B, L] with -100 where not masked).
    """
    if not 0.0 < probability < 1.0:
        raise ValueError(f"probability={probability} must be in (0, 1)")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    shape, device = input_ids.shape, input_ids.device
    special = torch.tensor(sorted(set(int(t) for t in special_token_ids)), dtype=input_ids.dtype, device=device)

    def bernoulli(p: float) -> torch.Tensor:
        return torch.bernoulli(torch.full(shape, p, device=device), generator=generator).bool()

    masked = bernoulli(probability) & ~torch.isin(input_ids, special)
    replace_draw = bernoulli(0.8)
    random_draw = bernoulli(0.5)
    random_words = torch.randint(vocab_size, shape, generator=generator, device=device, dtype=input_ids.dtype)
    return apply_mask_draws(input_ids, masked, replace_draw, random_draw, random_words, mask_token_id=mask_token_id)
