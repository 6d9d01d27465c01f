"""pre_caption parity with the official rule, and the real bert-base-uncased tokenizer."""

from __future__ import annotations

import pytest

from pipeline.data.text import BERT_VOCAB_SIZE, build_tokenizer, bundled_vocab_path, pre_caption, tokenize


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("A Dog, running!", "a dog running"),
        ("  two   spaces\n", "two spaces"),
        ("well-known t-shirt/jeans", "well known t shirt jeans"),
        ("<person> rides a bike.", "person rides a bike"),
        ('it\'s (very) "nice"; ok: #1 *star* ~ wave?', "its very nice ok 1 star wave"),
        ("tab\tkept", "tab\tkept"),  # only runs of >= 2 whitespace chars collapse (official)
        ("", ""),
    ],
)
def test_pre_caption_official_cases(raw: str, expected: str) -> None:
    assert pre_caption(raw) == expected


def test_pre_caption_truncates_words() -> None:
    words = " ".join(f"w{i}" for i in range(40))
    assert pre_caption(words, max_words=30).split(" ") == [f"w{i}" for i in range(30)]
    assert pre_caption("a b c", max_words=2) == "a b"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(bundled_vocab_path())


def test_tokenizer_has_full_bert_vocab(tokenizer) -> None:
    assert tokenizer.vocab_size == BERT_VOCAB_SIZE == 30522
    assert tokenizer.convert_tokens_to_ids(["[PAD]", "[CLS]", "[SEP]", "[MASK]"]) == [0, 101, 102, 103]


def test_build_tokenizer_rejects_wrong_vocab(tmp_path) -> None:
    small = tmp_path / "vocab.txt"
    small.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a"]) + "\n")
    with pytest.raises(ValueError, match="30522"):
        build_tokenizer(small)
    with pytest.raises(FileNotFoundError):
        build_tokenizer(tmp_path / "missing.txt")


def test_tokenize_pads_and_truncates(tokenizer) -> None:
    ids, mask = tokenize(tokenizer, ["a dog", "a man riding a horse on the beach at sunset"], max_len=8)
    assert ids.shape == mask.shape == (2, 8)
    assert ids[0, 0].item() == 101 and ids[0, 3].item() == 102  # [CLS] a dog [SEP]
    assert mask[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0] and ids[0, 4:].eq(0).all()
    assert mask[1].all() and ids[1, -1].item() == 102  # truncated, still ends with [SEP]
    ids_l, _ = tokenize(tokenizer, ["a dog"], max_len=8)
    assert ids_l.shape == (1, 4)  # "longest" padding
    ids_m, _ = tokenize(tokenizer, ["a dog"], max_len=8, padding="max_length")
    assert ids_m.shape == (1, 8)
