"""Each ``--packing_scheme`` against the Model Zoo generation it reproduces, row for row.

Two references per generation: the rule as the generation's code applies it, written out here in
plain Python, and, when a mirror of the public Model Zoo is present (``tests/modelzoo_mirror.py``),
the generation's own code read from the mirror at run time (never copied into the project) with
its few helper imports stubbed:

- overlap    = 1.6-1.7 ``training_data_generator`` (R_1.7.0 ``gpt2/input/data_processor_utils.py``);
- carry_over = 1.9-2.2 ``LMDataPreprocessor.tokenize_text_auto_lm`` (Release_2.0.2) and 2.3
  ``PretrainingTokenGenerator`` (Release_2.3.0), with ``keep_final_window=False`` (they drop the
  stream's last, short window; gpt2ops keeps it by default);
- disjoint   = 2.4+ ``PretrainingTokenGenerator`` (Release_2.4.0, Release_2.10.0).

Text normalisation (ftfy, NFC) is part of every comparison: the documents hold curly quotes,
mojibake and entities, and the reference code runs its own ftfy call.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import logging
import random
import sys
import textwrap
import types
from pathlib import Path

import ftfy
import h5py
import numpy as np
import pytest

from gpt2core.data.preprocess import PreprocessParams, preprocess_corpus
from gpt2core.tokenizer import EOS_ID, get_tokenizer

MSL = 8


def _documents() -> list[str]:
    """Documents of every length that matters around msl = 8 (a window holds 9 tokens): shorter,
    exactly msl, msl + 1, whole multiples, and text ftfy changes."""
    rng = random.Random(7)
    words = ["alpha", "beta", "gamma", "delta", "it\u2019s", "\u201cquoted\u201d", "caf\u00e9", "na\u00efve",
             "&amp;", "\u00e2\u20ac\u201cdash", "x", "longerword", "1999", "!"]
    docs = ["one", "two words", "a b c d e f g", "a b c d e f g h", "a b c d e f g h i j k l m n o p q r"]
    docs += [" ".join(rng.choice(words) for _ in range(rng.randint(1, 40))) for _ in range(40)]
    return docs


def _ids(text: str) -> list[int]:
    return get_tokenizer().encode_ordinary(ftfy.fix_text(text, normalization="NFC"))


def _rows(windows: list[list[int]]) -> np.ndarray:
    """The reference's features of each window: input_ids = w[:-1], labels = w[1:], mask 1 on them,
    EOS padding with mask 0."""
    out = np.full((len(windows), 3, MSL), EOS_ID, dtype=np.int32)
    out[:, 1] = 0
    for i, w in enumerate(windows):
        n = len(w) - 1
        out[i, 0, :n], out[i, 1, :n], out[i, 2, :n] = w[:-1], 1, w[1:]
    return out


def _ours(tmp_path: Path, docs: list[str], *, as_txt: bool = False, **params) -> np.ndarray:
    corpus = tmp_path / "corpus"
    corpus.mkdir(parents=True)
    if as_txt:  # one document per file, in name order
        for i, doc in enumerate(docs):
            (corpus / f"doc{i:03d}.txt").write_text(doc, encoding="utf-8")
    else:
        (corpus / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    preprocess_corpus(corpus, tmp_path / "out", PreprocessParams(max_seq_length=MSL, val_fraction=0.0, processes=1,
                                                                 **params))
    files = sorted((tmp_path / "out" / "train").glob("*.h5"))
    return np.concatenate([h5py.File(p, "r")["data"][:] for p in files])


# ----------------------------------------------------------------------------- the rules, written out


def overlap_rule(docs: list[list[int]], overlap: int) -> list[list[int]]:
    """1.6-1.7: one buffer (under 1e6 tokens) = EOS + every document + EOS; windows of msl + 1 tokens
    at stride msl - overlap while they fit, then the buffer's last msl + 1 tokens."""
    buffer = [EOS_ID] + [t for d in docs for t in d + [EOS_ID]]
    windows, start = [], 0
    while start + MSL + 1 <= len(buffer):
        windows.append(buffer[start:start + MSL + 1])
        start += MSL - overlap
    if start < len(buffer) - 1:
        windows.append(buffer[-MSL - 1:])
    return windows


def carry_over_rule(docs: list[list[int]], *, pack: bool, min_len: int) -> list[list[int]]:
    """1.9-2.3: per document prefix + ids + EOS cut at stride msl into windows of msl + 1 tokens; packed,
    a short last window is carried into the next document (and dropped after the last); unpacked,
    windows shorter than min_len go."""
    windows, prefix = [], []
    for ids in docs:
        text = prefix + ids + [EOS_ID]
        chunks = [text[i:i + MSL + 1] for i in range(0, len(text), MSL)]
        prefix = []
        if pack and len(chunks[-1]) < MSL + 1:
            prefix = chunks.pop()
        elif not pack and len(chunks[-1]) < 2:
            chunks.pop()
        windows += [c for c in chunks if len(c) >= min_len]
    return windows


def disjoint_rule(docs: list[list[int]], *, pack: bool, min_len: int) -> list[list[int]]:
    """2.4+: per document prefix + ids cut into disjoint windows of msl + 1 tokens; EOS replaces the last
    token of the document's last complete window (or is appended to its short last window, unpacked);
    packed, the short rest is carried on without EOS, and after the last document gets EOS appended."""
    windows, prefix = [], []
    for ids in docs:
        text = prefix + ids
        chunks = [text[i:i + MSL + 1] for i in range(0, len(text), MSL + 1)]
        prefix = chunks.pop() if pack and len(chunks[-1]) < MSL + 1 else []
        if chunks:
            last = chunks[-1]
            if len(last) < MSL + 1:
                last.append(EOS_ID)
            else:
                last[-1] = EOS_ID
        windows += chunks
    if prefix:
        windows.append(prefix + [EOS_ID])
    return [w for w in windows if len(w) >= min_len]


@pytest.mark.parametrize("pack", [True, False])
def test_carry_over_is_model_zoo_1_9_to_2_3(tmp_path, pack):
    docs = _documents()
    expected = _rows(carry_over_rule([_ids(d) for d in docs], pack=pack, min_len=6))
    np.testing.assert_array_equal(_ours(tmp_path, docs, pack_sequences=pack, keep_final_window=False), expected)


def test_carry_over_keeps_the_final_window_by_default(tmp_path):
    docs = _documents() + ["one"]
    ids = [_ids(d) for d in docs]
    expected = carry_over_rule(ids, pack=True, min_len=6)
    stream = [t for d in ids for t in d + [EOS_ID]]
    tail = stream[len(expected) * MSL:]  # what the reference drops
    assert 6 <= len(tail) < MSL + 1
    np.testing.assert_array_equal(_ours(tmp_path, docs), _rows(expected + [tail]))


@pytest.mark.parametrize("pack", [True, False])
def test_disjoint_is_model_zoo_2_4_and_later(tmp_path, pack):
    docs = _documents()
    expected = _rows(disjoint_rule([_ids(d) for d in docs], pack=pack, min_len=4))
    assert len(expected) > 10
    np.testing.assert_array_equal(_ours(tmp_path, docs, packing_scheme="disjoint", pack_sequences=pack,
                                        min_sequence_len=4), expected)


def test_overlap_is_model_zoo_1_6_to_1_7(tmp_path):
    docs = _documents()
    expected = _rows(overlap_rule([_ids(d) for d in docs], overlap=3))
    np.testing.assert_array_equal(_ours(tmp_path, docs, packing_scheme="overlap", overlap_size=3, as_txt=True),
                                  expected)


def test_min_sequence_len_defaults_to_the_generation(tmp_path):
    assert [PreprocessParams(packing_scheme=s).min_sequence_len for s in ("carry_over", "disjoint", "overlap")] \
        == [6, 10, 2]
    assert PreprocessParams(packing_scheme="disjoint", min_sequence_len=3).min_sequence_len == 3


# ----------------------------------------------------------------------------- the reference's own code


def _source_of(tag: str, path: str, names: list[str], *, class_name: str | None = None) -> str:
    """The source of the functions ``names`` (methods of ``class_name``, dedented) in ``path`` at ``tag``."""
    from modelzoo_mirror import show

    text = show(tag, path)
    body = ast.parse(text).body
    if class_name:
        body = next(n for n in body if isinstance(n, ast.ClassDef) and n.name == class_name).body
    found = {n.name: textwrap.dedent(ast.get_source_segment(text, n)) for n in body
             if isinstance(n, ast.FunctionDef) and n.name in names}
    assert set(found) == set(names), f"{tag}:{path}: {sorted(set(names) - set(found))} not found"
    return "\n\n".join(found[n] for n in names)


class _TiktokenBPE:
    """The reference's BPETokenizer (1.x), on our tokenizer."""

    def __init__(self, *_):
        pass

    def encode(self, text: str) -> list[int]:
        return get_tokenizer().encode_ordinary(text)


def test_overlap_matches_the_1_7_reference_code(tmp_path):
    tag = "R_1.7.0"
    namespace = {"random": random, "np": np, "BPETokenizer": _TiktokenBPE}
    exec(_source_of(tag, "modelzoo/transformers/pytorch/gpt2/input/data_processor_utils.py",  # noqa: S102
                    ["training_data_generator", "_create_features_labels"]), namespace)
    docs = [ftfy.fix_text(d, normalization="NFC") for d in _documents()]  # 1.x has no ftfy: give it fixed text
    files = []
    for i, doc in enumerate(docs):
        files.append(tmp_path / f"ref{i:03d}.txt")
        files[-1].write_text(doc, encoding="utf-8")
    reference = [np.stack([e["input_ids"], e["attention_mask"], e["labels"]]) for e, _ in
                 namespace["training_data_generator"]([str(f) for f in files], "v", "e", MSL, overlap_size=3)]
    ours = _ours(tmp_path / "ours", docs, packing_scheme="overlap", overlap_size=3, as_txt=True)
    np.testing.assert_array_equal(ours, np.stack(reference))


class _Preprocessor:
    """The attributes LMDataPreprocessor (2.0) gives tokenize_text_auto_lm."""

    def __init__(self, pack: bool, min_len: int):
        self.use_ftfy, self.ftfy_normalizer, self.wikitext_detokenize = True, "NFC", False
        self.split_text_to_tokenize, self.tokenizer, self.eos_id, self.pad_id = False, _TiktokenBPE(), EOS_ID, EOS_ID
        self.max_seq_length, self.pack_sequences, self.min_sequence_len = MSL, pack, min_len
        self.short_seq_prob, self.inverted_mask, self.rng = 0.0, False, random.Random(0)
        self.input_ids_dtype = self.input_mask_dtype = "int32"
        self.prefix, self.discarded_files = [], 0


@pytest.mark.parametrize("pack", [True, False])
def test_carry_over_matches_the_2_0_reference_code(tmp_path, pack):
    tag = "Release_2.0.2"
    folder = "modelzoo/transformers/data_processing/scripts/hdf5_preprocessing"
    namespace = {"np": np, "ftfy": ftfy, "logger": logging.getLogger("reference")}
    exec(_source_of(tag, f"{folder}/utils.py", ["validate_tokens", "create_features_auto_lm"])  # noqa: S102
         + "\n\n" + _source_of(tag, f"{folder}/hdf5_dataset_preprocessors.py", ["tokenize_text_auto_lm"],
                               class_name="LMDataPreprocessor"), namespace)
    preprocessor = _Preprocessor(pack, min_len=6)
    reference = [row for doc in _documents()
                 for row in namespace["tokenize_text_auto_lm"](preprocessor, doc) if len(row)]
    ours = _ours(tmp_path, _documents(), pack_sequences=pack, keep_final_window=False)
    np.testing.assert_array_equal(ours, np.stack(reference))


_UTILS_NEEDED = ["append_eos_to_multiple_semantic_regions", "clean_text", "find_token_range", "get_data_stats",
                 "setup_warning_logging", "split_text_and_tokenize", "wikitext_detokenizer", "validate_tokens"]


def _numpy2(source: str) -> str:
    """The one edit made to the reference, in memory: numpy 2 refuses ``array == []``, with which 2.4
    tests a row for emptiness."""
    return source.replace("if sample == []:", "if len(sample) == 0:")


def _token_generator_class(tag: str) -> type:
    """PretrainingTokenGenerator of ``tag`` (2.3+), its utils imports served from the same file."""
    from modelzoo_mirror import show

    folder = "src/cerebras/modelzoo/data_preparation/data_preprocessing"
    utils_text = show(tag, f"{folder}/utils.py")
    present = [n.name for n in ast.parse(utils_text).body if isinstance(n, ast.FunctionDef)]
    utils = types.ModuleType("cerebras.modelzoo.data_preparation.data_preprocessing.utils")
    exec("import os, re, json, logging, math, random\nimport ftfy\nimport numpy as np\n"  # noqa: S102
         "from collections import defaultdict\nfrom typing import *\nlogger = logging.getLogger('reference')\n"
         + _numpy2(_source_of(tag, f"{folder}/utils.py", [n for n in _UTILS_NEEDED if n in present])),
         utils.__dict__)
    utils.setup_warning_logging = lambda *_: logging.getLogger("reference")
    stubs = {name: types.ModuleType(name) for name in ("cerebras", "cerebras.modelzoo", "cerebras.modelzoo."
                                                       "data_preparation", f"{utils.__name__.rsplit('.', 1)[0]}")}
    saved = {name: sys.modules.get(name) for name in [*stubs, utils.__name__]}
    sys.modules.update(stubs)
    sys.modules[utils.__name__] = utils
    try:
        path = Path(f"{tag}_pretraining_token_generator.py")
        spec = importlib.util.spec_from_loader(path.stem, loader=None)
        module = importlib.util.module_from_spec(spec)
        module.__file__ = str(path)
        source = _numpy2(show(tag, f"{folder}/pretraining_token_generator.py"))
        exec(compile(source, str(path), "exec"), module.__dict__)  # noqa: S102
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    return module.PretrainingTokenGenerator


def _hf_tokenizer():  # noqa: ANN202 - transformers.PreTrainedTokenizerFast
    """A Hugging Face GPT-2 tokenizer (the reference's GPT2TokenizerFast) on the GPT-2 BPE files."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import ByteLevelBPETokenizer

    from gpt2core.tokenizer import _packaged_file

    bpe = ByteLevelBPETokenizer(_packaged_file("encoder.json"), _packaged_file("vocab.bpe"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                                pad_token="<|endoftext|>")


@pytest.mark.parametrize("tag, scheme", [("Release_2.3.0", "carry_over"), ("Release_2.4.0", "disjoint"),
                                         ("Release_2.10.0", "disjoint")])
@pytest.mark.parametrize("pack", [True, False])
def test_packing_matches_the_token_generator_of(tmp_path, tag, scheme, pack):
    generator_class = _token_generator_class(tag)
    min_len = 6 if scheme == "carry_over" else 4
    # (2.3 reads its options from "dataset", 2.4+ from "processing")
    params = {"dataset": {"pack_sequences": pack, "use_ftfy": True, "ftfy_normalizer": "NFC",
                          "min_sequence_len": min_len},
              "processing": {"max_seq_length": MSL, "min_sequence_len": min_len, "use_ftfy": True,
                             "ftfy_normalizer": "NFC"},
              "setup": {"output_dir": str(tmp_path / "reference")}}
    generator = generator_class(params, _hf_tokenizer(), EOS_ID, EOS_ID)
    reference = []
    for doc in _documents():
        data, _ = generator.encode([{"type": "text", "content": [{"text": doc}]}])
        reference += list(data.get("data", []))
    leftover = getattr(generator, "prefix_doc", None)
    if pack and leftover:  # 2.4+: data_preprocessor hands the leftover to encode_leftover_prefix
        data, _ = generator.encode_leftover_prefix([leftover])
        reference += list(data.get("data", []))
    ours = _ours(tmp_path, _documents(), packing_scheme=scheme, pack_sequences=pack, min_sequence_len=min_len,
                 keep_final_window=scheme == "disjoint")
    np.testing.assert_array_equal(ours, np.stack(reference).reshape(-1, 3, MSL))
