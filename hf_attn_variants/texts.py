"""Real English text that ships with Python itself: the Python documentation topics in ``pydoc_data.topics``
(CPython's pydoc help text, PSF licence). Used for fidelity measurements offline."""

from __future__ import annotations

import re

SOURCE = "CPython pydoc_data/topics.py (the Python documentation's help topics)"
_SKIP = re.compile(r"[*`{}=<>|_\[\]]|\.\.\.|>>>")


def _documentation_text() -> str:
    import pydoc_data.topics

    return re.sub(r"\s+", " ", " ".join(pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics)))


def real_sentences(count: int = 300, split: str = "eval") -> list[str]:
    """``count`` prose sentences (40-240 characters, no code) from the Python documentation.

    split: 'eval' takes every other sentence starting at the first, 'train' the others, so the two never overlap.
    """
    sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z])", _documentation_text())
    prose = [
        s for s in sentences
        if 40 <= len(s) <= 240 and re.match(r"^[A-Z][a-z]+ ", s) and not _SKIP.search(s) and s.count('"') < 3
    ]
    chosen = prose[0::2] if split == "eval" else prose[1::2]
    if count > len(chosen):
        raise ValueError(f"only {len(chosen)} {split} sentences are available, asked for {count}.")
    return chosen[:count]


def long_passages(count: int, words: int = 400, split: str = "eval") -> list[str]:
    """``count`` passages of ``words`` consecutive words of running documentation text (about 512 BERT tokens
    for 400 words). 'eval' passages come from the first half of the text, 'train' from the second half."""
    tokens = _documentation_text().split()
    half = len(tokens) // 2
    tokens = tokens[:half] if split == "eval" else tokens[half:]
    available = len(tokens) // words
    if count > available:
        raise ValueError(f"only {available} {split} passages of {words} words are available, asked for {count}.")
    return [" ".join(tokens[i * words : (i + 1) * words]) for i in range(count)]
