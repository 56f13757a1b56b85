"""Splitting documents into retrievable chunks, and turning free text into a search query."""

from __future__ import annotations

import re

_HEADING = re.compile(r"^#{1,6}\s")
_WORD = re.compile(r"[\w][\w'-]*", re.UNICODE)
_STOP_WORDS = (
    "a an and are as at be but by for from has have i in is it its of on or that the this to "
    "was we were what when where which who will with you your our can do does"
)
_STOP = frozenset(_WORD.findall(_STOP_WORDS))


def chunk_text(text: str, *, max_chars: int = 900) -> list[str]:
    """Split markdown/plain ``text`` into chunks of at most ~``max_chars`` characters.

    Chunks follow the document's structure: a new chunk starts at each markdown heading and
    paragraphs are packed together until the limit; a heading is repeated as the first line of
    the chunks of its section so each chunk carries its context. A single paragraph longer than
    the limit is cut at line boundaries. Returns non-empty, stripped chunks in document order.
    """
    sections: list[tuple[str, list[str]]] = []
    heading, paras, buf = "", [], []  # type: ignore[var-annotated]
    for line in text.splitlines():
        if _HEADING.match(line):
            if buf:
                paras.append("\n".join(buf))
                buf = []
            if paras or heading:
                sections.append((heading, paras))
            heading, paras = line.strip(), []
        elif not line.strip():
            if buf:
                paras.append("\n".join(buf))
                buf = []
        else:
            buf.append(line.rstrip())
    if buf:
        paras.append("\n".join(buf))
    if paras or heading:
        sections.append((heading, paras))

    chunks: list[str] = []
    for head, section_paras in sections:
        current = head
        for para in _split_long(section_paras, max_chars):
            candidate = f"{current}\n\n{para}" if current else para
            if len(candidate) > max_chars and current and current != head:
                chunks.append(current)
                current = f"{head}\n\n{para}" if head else para
            else:
                current = candidate
        if current and current != head:
            chunks.append(current)
        elif head and not section_paras:
            continue
    return [c.strip() for c in chunks if c.strip()]


def _split_long(paras: list[str], max_chars: int) -> list[str]:
    out: list[str] = []
    for para in paras:
        if len(para) <= max_chars:
            out.append(para)
            continue
        piece = ""
        for line in para.splitlines():
            while len(line) > max_chars:
                if piece:
                    out.append(piece)
                    piece = ""
                cut = line.rfind(" ", 0, max_chars + 1)
                if cut <= 0:
                    cut = max_chars  # one word longer than a chunk: cut it where it must be
                out.append(line[:cut].rstrip())
                line = line[cut:].lstrip()
            if piece and len(piece) + len(line) + 1 > max_chars:
                out.append(piece)
                piece = line
            else:
                piece = f"{piece}\n{line}" if piece else line
        if piece:
            out.append(piece)
    return out


def search_terms(text: str, *, max_terms: int = 24) -> list[str]:
    """The search terms of free ``text``: its distinct lower-cased words of 2+ characters that
    are not stop words, in order of first appearance, at most ``max_terms``.

    A word may hold inner ``'`` or ``-`` (``don't``, ``state-of-the-art``): both search engines
    treat it as a phrase of its parts. Returns [] when the text has no usable word.
    """
    terms: list[str] = []
    seen: set[str] = set()
    for word in _WORD.findall(text.lower()):
        word = word.strip("'-").replace('"', "")
        if len(word) < 2 or word in _STOP or word in seen:
            continue
        seen.add(word)
        terms.append(word)
        if len(terms) >= max_terms:
            break
    return terms


def fts_query(text: str, *, max_terms: int = 24) -> str:
    """An FTS5 MATCH expression for free ``text``: its :func:`search_terms`, quoted, OR-ed.

    Quoting every term makes any user text safe (no FTS syntax injection). Returns "" when the
    text has no usable word.
    """
    return " OR ".join(f'"{term}"' for term in search_terms(text, max_terms=max_terms))
