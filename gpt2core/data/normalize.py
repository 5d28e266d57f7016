"""Text normalisation as the Cerebras Model Zoo's preprocessing applies it before tokenizing.

- ``universal_newlines``: a ``.txt`` file is read as Python's ``open(path, "r")`` reads it (the
  reference's ``read_txt``): ``\\r\\n`` and a lone ``\\r`` become ``\\n``;
- ``strip_bom``: a byte-order mark (U+FEFF) that starts a ``.txt`` file is dropped (utf-8-sig);
- ``fix_text``: ``ftfy.fix_text(text, normalization=...)``, the reference's ``use_ftfy`` step
  (default on since Model Zoo 2.0, NFC), computed only where ftfy can change something.

ftfy fixes text in segments, one line each (``ftfy.fix_text``), and every one of its fixes leaves a
line alone that holds only printable ASCII, tab, line feed and form feed and no HTML entity
(``&...;``): the encoding fixers need non-ASCII text, the other fixers and the Unicode
normalisations act on non-ASCII characters, carriage returns, other control characters, escape
sequences or entities only. So ``fix_text`` hands ftfy just the runs of lines that hold such a
character and copies the rest, which gives ftfy's result at a fraction of its cost on mostly
ASCII text. The one state ftfy carries from line to line (HTML entities stop being decoded after
the first line with a ``<``) is carried here too. ``tests/test_normalize.py`` holds the equality.
"""

from __future__ import annotations

import re

import ftfy

# What may change a line under ftfy: any character but printable ASCII, tab, LF and FF, or an HTML
# entity (ftfy.chardata.HTML_ENTITY_RE).
_UNSAFE = re.compile(r"[^\t\n\x0c\x20-\x7e]|&#?[0-9A-Za-z]{1,24};")
_ENTITY = re.compile(r"&#?[0-9A-Za-z]{1,24};")
_SAFE_ASCII = bytes([9, 10, 12, *range(0x20, 0x7f)])
NORMALIZATIONS = ("NFC", "NFKC", "NFD", "NFKD")


def universal_newlines(text: str) -> str:
    """``text`` with ``\\r\\n`` and ``\\r`` as ``\\n``, as Python's text-mode read gives it."""
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def strip_bom(text: str) -> str:
    """``text`` without a leading U+FEFF (what reading it as utf-8-sig drops)."""
    return text[1:] if text.startswith("\ufeff") else text


def fix_text(text: str, normalization: str = "NFC") -> str:
    """``ftfy.fix_text(text, normalization=normalization)``, the same string, computed on the runs
    of lines that can change only (see the module docstring)."""
    if text.isascii() and not text.encode("ascii").translate(None, _SAFE_ASCII) and not _ENTITY.search(text):
        return text  # the common case, at C speed: printable ASCII and no entity
    match = _UNSAFE.search(text)
    if match is None:
        return text
    out: list[str] = []
    done = 0  # text[:done] is in out
    html = "auto"  # ftfy's unescape_html: off for good after the first line holding "<"
    while match is not None:
        start = text.rfind("\n", 0, match.start()) + 1
        end = _line_end(text, match.start())
        # take in the following lines while they too hold something to fix: one ftfy call per run
        while (match := _UNSAFE.search(text, end)) is not None and text.rfind("\n", 0, match.start()) + 1 == end:
            end = _line_end(text, match.start())
        if html == "auto" and "<" in text[done:start]:
            html = False
        out.append(text[done:start])
        out.append(ftfy.fix_text(text[start:end], normalization=normalization, unescape_html=html))
        if html == "auto" and "<" in text[start:end]:
            html = False
        done = end
    out.append(text[done:])
    return "".join(out)


def _line_end(text: str, pos: int) -> int:
    """The end of the line holding ``pos``, its line feed included."""
    newline = text.find("\n", pos)
    return len(text) if newline == -1 else newline + 1
