"""The 20 Newsgroups sample: read with a restricted unpickler (never arbitrary code), labels not left in the text."""

from __future__ import annotations

import pickle
import zlib

import pytest

from hf_attn_variants.corpora import post_body, read_mini_newsgroup


def test_the_restricted_unpickler_reads_plain_data_and_refuses_anything_else(tmp_path):
    data = {"data": ["a post"], "target": [1], "target_names": ["alt.atheism", "sci.space"]}
    good = tmp_path / "good"
    good.write_bytes(zlib.compress(pickle.dumps(data, protocol=2)))
    loaded = read_mini_newsgroup(good)
    assert loaded["data"] == ["a post"] and loaded["target"] == [1]

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo unpickled code ran",))

    bad = tmp_path / "bad"
    bad.write_bytes(zlib.compress(pickle.dumps({"data": [Evil()]}, protocol=2)))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        read_mini_newsgroup(bad)


def test_a_posts_header_and_quoted_text_are_removed():
    post = (
        "From: someone@example.edu\nNewsgroups: sci.space\nSubject: Re: orbits\n\n"
        "In article <1@example.edu>, other@example.edu (Other) writes:\n"
        "> the quoted text of another post\n| more quoted text\n"
        "My own reply about the shuttle.\n\nSecond paragraph.\n"
    )
    body = post_body(post)
    assert body == "My own reply about the shuttle.\n\nSecond paragraph."
    assert "sci.space" not in body and "quoted" not in body
