"""Prepare the offline Wikipedia corpus (gensim's sample, split by article) for the recipes and measurements.

    python scripts/prepare_data.py [--cache outputs/data]

Writes outputs/data/wiki/{train,eval}.jsonl (articles), {train,eval}_passages.jsonl (400-word passages) and
train_mixed.jsonl (passages + short sentences); and outputs/data/newsgroups/: posts.jsonl and the 5 folds
fold{i}_{train,validation}.jsonl of gensim's 20 Newsgroups sample (alt.atheism vs sci.space). Needs the `data`
extra (mwparserfromhell); fetches gensim's wheel with pip when gensim is not installed. Text: English Wikipedia,
CC BY-SA 4.0, and 20 Newsgroups posts (configs/data/README.md).
"""

import argparse
from pathlib import Path

from hf_attn_variants.corpora import DEFAULT_CACHE, load_articles, prepare_newsgroups, prepare_passages

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args()
    for name, path in {**prepare_passages(args.cache), **prepare_newsgroups(args.cache)}.items():
        print(f"{name}: {path} ({len(load_articles(path))} rows)")
