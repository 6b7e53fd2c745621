"""Real English text for training and measuring offline: Wikipedia articles from gensim's wheel, split by article.

gensim's wheel ships ``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``
(107 real English Wikipedia articles, CC BY-SA; see configs/data/README.md). ``prepare_wikipedia`` takes that file
from an installed gensim, or from the wheel fetched with ``pip download --no-deps`` (no gensim install, no scipy),
strips the wiki markup with mwparserfromhell (the ``data`` extra), and writes ``train.jsonl`` / ``eval.jsonl``
(one article a line: ``{"title", "text"}``), the split made by article so no evaluation text is ever trained on.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterator
from pathlib import Path

GENSIM_VERSION = "4.4.0"
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
ATTRIBUTION = (
    "Text from English Wikipedia articles (as shipped in gensim's test data), licensed CC BY-SA 4.0; "
    "authors: the Wikipedia contributors, https://en.wikipedia.org/"
)
DEFAULT_CACHE = Path(os.environ.get("HF_ATTN_VARIANTS_DATA", "outputs/data"))
EVAL_SHARE = 5  # one article in 5 (by a hash of its title) is held out for evaluation


def wiki_dump_path(cache: Path = DEFAULT_CACHE) -> Path:
    """The bz2 XML dump: from an installed gensim, else extracted from gensim's wheel downloaded into ``cache``."""
    spec = importlib.util.find_spec("gensim")
    if spec is not None and spec.origin:
        installed = Path(spec.origin).parent.parent / WIKI_MEMBER
        if installed.exists():
            return installed
    target = cache / Path(WIKI_MEMBER).name
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"gensim=={GENSIM_VERSION}", "-d", tmp]
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("gensim-*.whl"))
        if result.returncode or not wheels:
            raise RuntimeError(
                f"could not fetch gensim's wheel for its Wikipedia test data ({result.stderr.strip()[-300:]}). "
                "Install gensim (pip install gensim) or set HF_ATTN_VARIANTS_DATA to a folder holding "
                f"{Path(WIKI_MEMBER).name}."
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            target.write_bytes(wheel.read(WIKI_MEMBER))
    return target


def iter_articles(dump: Path, min_words: int = 200) -> Iterator[dict[str, str]]:
    """Articles of the main namespace as ``{"title", "text"}``, markup stripped, redirects and stubs skipped."""
    try:
        import mwparserfromhell
    except ImportError as error:
        raise ImportError("stripping wiki markup needs mwparserfromhell: pip install 'hf-attn-variants[data]'") \
            from error
    with bz2.open(dump, "rb") as stream:
        for _, element in ET.iterparse(stream):
            if not element.tag.endswith("}page"):
                continue
            title = element.findtext("{*}title") or ""
            namespace = element.findtext("{*}ns")
            markup = element.findtext("{*}revision/{*}text") or ""
            element.clear()
            if namespace != "0" or markup.lstrip().lower().startswith("#redirect"):
                continue
            text = clean_text(mwparserfromhell.parse(markup).strip_code(normalize=True, collapse=True))
            if len(text.split()) >= min_words:
                yield {"title": title, "text": text}


def clean_text(text: str) -> str:
    """Collapse what strip_code leaves: table/file residue lines, runs of blank lines and spaces."""
    lines = [line.strip() for line in text.splitlines()]
    kept = [line for line in lines if line and not re.match(r"^(thumb\||File:|Category:|\||!|\{|\})", line)]
    return re.sub(r"[ \t]+", " ", "\n".join(kept))


def is_eval_article(title: str) -> bool:
    """The article split: stable (a hash of the title, not of the file order), about 1 in EVAL_SHARE held out."""
    return int(hashlib.sha256(title.encode()).hexdigest(), 16) % EVAL_SHARE == 0


def prepare_wikipedia(cache: Path = DEFAULT_CACHE) -> dict[str, Path]:
    """Write ``cache/wiki/{train,eval}.jsonl`` once (skipped when present); returns split -> path."""
    folder = Path(cache) / "wiki"
    paths = {"train": folder / "train.jsonl", "eval": folder / "eval.jsonl"}
    if all(p.exists() for p in paths.values()):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[dict]] = {"train": [], "eval": []}
    for article in iter_articles(wiki_dump_path(Path(cache))):
        splits["eval" if is_eval_article(article["title"]) else "train"].append(article)
    for split, articles in splits.items():
        tmp = paths[split].with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(a, ensure_ascii=False) + "\n" for a in articles))
        tmp.replace(paths[split])
    return paths


def prepare_passages(cache: Path = DEFAULT_CACHE, words: int = 400, sentence_count: int = 2000) -> dict[str, Path]:
    """Recipe-ready files next to the articles: ``{train,eval}_passages.jsonl`` ({"title", "text"}: passages of
    ``words`` words, about 512 BERT tokens for 400) and ``train_mixed.jsonl`` (the training passages plus
    ``sentence_count`` short sentences, shuffled: long and short inputs in one distillation run)."""
    import random

    articles = {split: load_articles(path) for split, path in prepare_wikipedia(cache).items()}
    folder = Path(cache) / "wiki"
    paths = {"train": folder / "train_passages.jsonl", "eval": folder / "eval_passages.jsonl",
             "mixed": folder / "train_mixed.jsonl"}
    rows = {split: [{"title": a["title"], "text": p} for a in arts for p in word_passages([a], words)]
            for split, arts in articles.items()}
    mixed = rows["train"] + [{"title": "", "text": s} for s in sentences(articles["train"], sentence_count)]
    random.Random(0).shuffle(mixed)
    for path, data in ((paths["train"], rows["train"]), (paths["eval"], rows["eval"]), (paths["mixed"], mixed)):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data))
        tmp.replace(path)
    return paths


def load_articles(path: str | Path) -> list[dict[str, str]]:
    """Articles of a jsonl file written by ``prepare_wikipedia`` (or a shipped sample)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def word_passages(articles: list[dict[str, str]], words: int, count: int | None = None) -> list[str]:
    """Consecutive passages of ``words`` words, taken article by article (a passage never spans two articles)."""
    passages = []
    for article in articles:
        tokens = article["text"].split()
        passages += [" ".join(tokens[i : i + words]) for i in range(0, len(tokens) - words + 1, words)]
        if count is not None and len(passages) >= count:
            return passages[:count]
    return passages


def sentences(articles: list[dict[str, str]], count: int | None = None, min_chars: int = 40,
              max_chars: int = 300) -> list[str]:
    """Prose sentences (``min_chars``..``max_chars`` characters) of the articles, in order."""
    found = []
    for article in articles:
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", article["text"].replace("\n", " ")):
            if min_chars <= len(sentence) <= max_chars and sentence[0].isupper():
                found.append(sentence)
                if count is not None and len(found) >= count:
                    return found
    return found
