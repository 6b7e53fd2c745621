"""Render transformers' generic-test results (pytest's JUnit XML from scripts/conformance.sh) as docs/conformance.md:
per family x variant the passed/failed/skipped counts, and every failure with the documented limitation behind it.

    python scripts/conformance/report.py outputs/conformance/junit.xml docs/conformance.md
"""

from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict

# (test-name pattern, limitation) for failures that follow from what a variant is; first match wins.
LIMITATIONS = [
    (r"test_generation_tester_mixin_inheritance",
     "transformers' sdist ships no GenerationTesterMixin (tests/generation/ is left out of it), so generation is "
     "checked by the project's own tests instead (cached = uncached, static = dynamic cache, left padding)."),
    (r"test_sdpa_can_dispatch_non_composite_models",
     "'full' is registered under its own name (transformers' SDPA function and SDPA mask), so a default load of a "
     "'full' model reports _attn_implementation='full', not 'sdpa'; its outputs are SDPA's (full conversions equal "
     "their source within 1e-5 in tests/test_conversion.py)."),
    (r"test_(batching_equivalence|determinism|model_outputs_equivalence|hidden_states_output|inputs_embeds|"
     r"feed_forward_chunking|save_load|attention_outputs|left_padding|eager_matches|sdpa)",
     "compares the variant with exact attention or with its own output under a different mask layout; an "
     "approximation differs from exact attention by design (its error is bounded in tests/test_variant_math.py)."),
    (r"packed|position_ids",
     "packed sequences (several documents in one row, told apart by position_ids) are not supported by the "
     "efficient variants: their patterns and normalisers run over the whole row."),
]


def classify(test: str, message: str) -> str:
    for pattern, reason in LIMITATIONS:
        if re.search(pattern, test):
            return reason
    return f"unclassified: {message.strip().splitlines()[0][:200] if message.strip() else 'no message'}"


def main(junit: str, output: str) -> None:
    counts: dict[str, Counter] = defaultdict(Counter)
    failures: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for case in ET.parse(junit).getroot().iter("testcase"):
        match = re.search(r"Test(\w+?)(Full|Linformer|Performer|Bigbird|Lsh)Conformance", case.get("classname", ""))
        if not match:
            continue
        key = f"{match.group(1).lower()} × {match.group(2).lower()}"
        failed = case.find("failure") if case.find("failure") is not None else case.find("error")
        if failed is not None:
            counts[key]["failed"] += 1
            failures[key].append((case.get("name"), classify(case.get("name"), failed.get("message", ""))))
        elif case.find("skipped") is not None:
            counts[key]["skipped"] += 1
        else:
            counts[key]["passed"] += 1
    lines = [
        "# Conformance with transformers' own model tests",
        "",
        "Written by `bash scripts/conformance.sh`: transformers' `ModelTesterMixin` and `ConfigTester` (from the sdist",
        "of the installed version, unmodified) run against every variant class of BERT and Llama, with tiny configs",
        "whose inputs reach each variant's approximate path. Efficient variants declare `has_attentions = False` (they",
        "never build an attention matrix), so upstream skips its attention-weight tests for them.",
        "",
        "| family × variant | passed | failed | skipped |",
        "|---|---|---|---|",
    ]
    lines += [f"| {k} | {c['passed']} | {c['failed']} | {c['skipped']} |" for k, c in sorted(counts.items())]
    lines += ["", "## Every remaining failure, and why", ""]
    for key in sorted(failures):
        lines.append(f"### {key}")
        lines += [f"- `{name}`: {reason}" for name, reason in sorted(failures[key])]
        lines.append("")
    with open(output, "w") as handle:
        handle.write("\n".join(lines).rstrip() + "\n")
    print(f"wrote {output}: " + ", ".join(f"{k} {c['failed']} failed" for k, c in sorted(counts.items())))


if __name__ == "__main__":
    main(*sys.argv[1:3])
