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


def gensim_test_file(member: str, cache: Path = DEFAULT_CACHE) -> Path:
    """A file of gensim's wheel (``member``: its path inside the wheel): from an installed gensim, else extracted
    from the wheel downloaded with ``pip download --no-deps`` into ``cache`` (no gensim install, no scipy)."""
    spec = importlib.util.find_spec("gensim")
    if spec is not None and spec.origin:
        installed = Path(spec.origin).parent.parent / member
        if installed.exists():
            return installed
    target = Path(cache) / Path(member).name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"gensim=={GENSIM_VERSION}", "-d", tmp]
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("gensim-*.whl"))
        if result.returncode or not wheels:
            raise RuntimeError(
                f"could not fetch gensim's wheel for its test data ({result.stderr.strip()[-300:]}). "
                f"Install gensim (pip install gensim) or set HF_ATTN_VARIANTS_DATA to a folder holding "
                f"{Path(member).name}."
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            partial = target.with_suffix(".tmp")
            partial.write_bytes(wheel.read(member))
            partial.replace(target)
    return target


def wiki_dump_path(cache: Path = DEFAULT_CACHE) -> Path:
    """The bz2 XML dump of gensim's Wikipedia sample (see ``gensim_test_file``)."""
    return gensim_test_file(WIKI_MEMBER, cache)


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


def words_for_tokens(tokens: int) -> int:
    """Words per passage that fill about ``tokens`` WordPiece tokens of English Wikipedia (3/4 of them; longer
    passages are truncated by the tokenizer)."""
    return tokens * 3 // 4


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


NEWSGROUPS_MEMBER = "gensim/test/test_data/mini_newsgroup"
NEWSGROUPS_ATTRIBUTION = (
    "Posts from the 20 Newsgroups collection (Ken Lang, 1995; alt.atheism and sci.space), as shipped in gensim's "
    "test data"
)


class _Bunch(dict):
    """Stands in for scikit-learn's ``Bunch`` (a dict with attribute access) so the pickle needs no sklearn."""

    def __setstate__(self, state: dict) -> None:
        self.update(state)


def _allowed_newsgroup_classes() -> dict[tuple[str, str], object]:
    import copyreg

    import numpy as np

    return {
        ("__builtin__", "dict"): dict,
        ("__builtin__", "object"): object,
        ("copy_reg", "_reconstructor"): copyreg._reconstructor,
        ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,  # as numpy 1 named it
        ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("sklearn.datasets.base", "Bunch"): _Bunch,
    }


def read_mini_newsgroup(path: Path) -> dict:
    """The zlib-compressed pickle of a scikit-learn ``Bunch`` in gensim's test data, read with an unpickler that
    admits only the classes that file needs (plain data: dicts and numpy arrays), never arbitrary code."""
    import io
    import pickle
    import zlib

    allowed = _allowed_newsgroup_classes()

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if (module, name) not in allowed:
                raise pickle.UnpicklingError(f"{path}: refusing to load {module}.{name} (not a plain data class)")
            return allowed[(module, name)]

    raw = zlib.decompress(Path(path).read_bytes())
    return dict(RestrictedUnpickler(io.BytesIO(raw), encoding="latin1").load())


def post_body(post: str) -> str:
    """A newsgroup post without what gives its label away or is someone else's text: the header (which names
    the newsgroup), quoted lines (``>``, ``|``) and the "In article ... writes:" lines that introduce them."""
    _, _, body = post.partition("\n\n")
    kept = [line for line in body.splitlines()
            if not re.match(r"^\s*(>|\||In article )", line)
            and not re.search(r"(writes|wrote|says)(:|\.\.\.)\s*$", line)]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip()


def prepare_newsgroups(cache: Path = DEFAULT_CACHE, folds: int = 5) -> dict[str, Path]:
    """Write ``cache/newsgroups/posts.jsonl`` ({"id", "group", "label", "text"}, one post a line, label 0 =
    alt.atheism, 1 = sci.space) and, for k-fold evaluation, ``fold{i}_{train,validation}.jsonl``: each post is in
    exactly one validation fold (assigned by a hash of its id, stratified by label). Skipped when present."""
    folder = Path(cache) / "newsgroups"
    paths = {"posts": folder / "posts.jsonl"}
    for i in range(folds):
        paths[f"fold{i}_train"] = folder / f"fold{i}_train.jsonl"
        paths[f"fold{i}_validation"] = folder / f"fold{i}_validation.jsonl"
    if all(p.exists() for p in paths.values()):
        return paths
    bunch = read_mini_newsgroup(gensim_test_file(NEWSGROUPS_MEMBER, Path(cache)))
    names = list(bunch["target_names"])
    posts = []
    for filename, post, target in zip(bunch["filenames"], bunch["data"], bunch["target"], strict=True):
        group, number = Path(filename.decode() if isinstance(filename, bytes) else filename).parts[-2:]
        posts.append({"id": f"{group}/{number}", "group": group, "label": int(target), "text": post_body(post)})
    assert {p["group"] for p in posts} == set(names), "labels do not match the newsgroups"
    posts.sort(key=lambda p: hashlib.sha256(p["id"].encode()).hexdigest())
    fold_of = {}
    for label in sorted({p["label"] for p in posts}):
        for rank, post in enumerate(p for p in posts if p["label"] == label):
            fold_of[post["id"]] = rank % folds
    folder.mkdir(parents=True, exist_ok=True)
    contents = {"posts": posts}
    for i in range(folds):
        contents[f"fold{i}_train"] = [p for p in posts if fold_of[p["id"]] != i]
        contents[f"fold{i}_validation"] = [p for p in posts if fold_of[p["id"]] == i]
    for name, rows in contents.items():
        tmp = paths[name].with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        tmp.replace(paths[name])
    return paths
