"""Text normalisation: gpt2core.data.normalize.fix_text is ftfy.fix_text, string for string."""

from __future__ import annotations

import random

import ftfy
import pytest

from gpt2core.data.normalize import fix_text, strip_bom, universal_newlines

PIECES = [
    "plain ASCII words and more words", "tab\tand form\x0cfeed", "", " ", "Fish &amp; chips", "&lt;b&gt;",
    "a <tag> line", "it\u2019s \u201ccurly\u201d", "caf\u00e9", "cafe\u0301 (NFD)", "mojibake: \u00e2\u20ac\u201c",
    "\u00c3\u00a9t\u00c3\u00a9", "\ufeffBOM inside", "control\x01\x7fchars", "\x1b[31mred\x1b[0m",
    "\uff26\uff55\uff4c\uff4c width", "\ufb01ne ligature", "line\u2028sep", "next\x85line", "&c. not an entity",
    "&#x2019; and &#8217;", "\ud83d\ude00 emoji", "\u00a0no-break", "x" * 50,
]


def _random_text(rng: random.Random) -> str:
    newline = rng.choice(["\n", "\r\n", "\r", "\n\n"])
    return newline.join(rng.choice(PIECES) for _ in range(rng.randint(0, 12)))


@pytest.mark.parametrize("normalization", ["NFC", "NFKC"])
def test_fix_text_equals_ftfy_on_mixed_text(normalization):
    rng = random.Random(0)
    for _ in range(3000):
        text = _random_text(rng)
        assert fix_text(text, normalization) == ftfy.fix_text(text, normalization=normalization), repr(text)


def test_html_entities_stop_after_the_first_line_with_a_tag_as_in_ftfy():
    cases = {"a &amp; b\n<p>\nc &amp; d\n\u00e9 &amp; e": "a & b\n<p>\nc &amp; d\n\u00e9 &amp; e",
             "<p>\nclean line\n&amp;\n": "<p>\nclean line\n&amp;\n",
             "x &amp;\ny <\n&amp; \u00e9": "x &\ny <\n&amp; \u00e9"}
    for text, fixed in cases.items():
        assert fix_text(text) == ftfy.fix_text(text, normalization="NFC") == fixed


def test_ascii_text_is_returned_as_is():
    text = "Plain ASCII & text, with a <tag>;\n\tand more.\n" * 100
    assert fix_text(text) is text


def test_newlines_and_bom_as_a_text_mode_read_gives_them(tmp_path):
    raw = "\ufeffone\r\ntwo\rthree\n"
    path = tmp_path / "a.txt"
    path.write_bytes(raw.encode("utf-8"))
    with open(path, encoding="utf-8") as f:  # the reference's read_txt
        assert universal_newlines(raw) == f.read()
    with open(path, encoding="utf-8-sig") as f:
        assert strip_bom(universal_newlines(raw)) == f.read()
