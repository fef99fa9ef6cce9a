"""Corpus files: the text over which the layer statistics C0 are collected.

:func:`corpus_texts` turns a UTF-8 file into documents (WikiText articles, or paragraphs);
:func:`default_corpus` is the one that ships inside the package, the WikiText-2 test split.
:mod:`rrome.engine.stats` runs the model over these documents.
"""

from __future__ import annotations

import errno
import os
import re
from importlib import resources
from pathlib import Path
from typing import Literal

from rrome.files.errors import InvalidFileError

PathLike = str | os.PathLike[str]
CorpusFormat = Literal["auto", "wikitext", "paragraphs"]

# A top-level WikiText heading (" = Title = "), not a section (" = = Section = = ").
_WIKITEXT_HEADING = re.compile(r"= [^=](?:.*[^=])? =")


def default_corpus() -> Path:
    """Path of the corpus that ships with rrome: the WikiText-2 (raw) test split, 62 articles.

    Its provenance and licence (CC BY-SA 3.0) are in ``NOTICE.md`` beside it.

    Raises:
        FileNotFoundError: the package data is missing (a broken install).
    """
    ref = resources.files("rrome") / "data" / "wikitext2" / "wiki.test.raw"
    path = Path(str(ref))
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, "rrome's packaged corpus is missing (broken install?)", str(path))
    return path


def _is_wikitext_heading(line: str) -> bool:
    return _WIKITEXT_HEADING.fullmatch(line.strip()) is not None


def corpus_texts(path: PathLike, *, fmt: CorpusFormat = "auto") -> list[str]:
    """The documents of a UTF-8 corpus file, in file order.

    A WikiText raw file (recognised by its top-level headings ``" = Title = "``) is split into
    articles: the text between two headings, heading lines left out. Any other file is split into
    paragraphs at blank lines. Each line is stripped; empty documents are dropped; line endings
    (``\\n``, ``\\r\\n``, ``\\r``) do not matter.

    Args:
        path: the corpus file.
        fmt: ``"auto"`` (the default: WikiText if the file has a top-level heading),
            ``"wikitext"`` or ``"paragraphs"``.

    Raises:
        FileNotFoundError: the file does not exist.
        InvalidFileError: the file is not UTF-8 text or holds no text at all.
        ValueError: an unknown ``fmt``.
    """
    if fmt not in ("auto", "wikitext", "paragraphs"):
        raise ValueError(f'fmt must be "auto", "wikitext" or "paragraphs", got {fmt!r}')
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidFileError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if fmt == "auto":
        fmt = "wikitext" if any(_is_wikitext_heading(line) for line in lines) else "paragraphs"

    docs: list[str] = []
    current: list[str] = []

    def flush() -> None:
        doc = "\n".join(current).strip()
        if doc:
            docs.append(doc)
        current.clear()

    for line in lines:
        stripped = line.strip()
        boundary = _is_wikitext_heading(line) if fmt == "wikitext" else not stripped
        if boundary:
            flush()
        elif stripped:
            current.append(stripped)
    flush()
    if not docs:
        raise InvalidFileError(f"{p}: the corpus holds no text")
    return docs
