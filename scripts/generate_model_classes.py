"""Regenerate hf_attn_variants/modeling/model_classes.py from the family table (modeling/families.py).

    python scripts/generate_model_classes.py [--check]

--check exits 1 (writing nothing) when the checked-in file is not what the table gives.
"""

import argparse
import sys
from pathlib import Path

from hf_attn_variants.modeling.families import render_model_classes

TARGET = Path(__file__).resolve().parent.parent / "hf_attn_variants" / "modeling" / "model_classes.py"

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    source = render_model_classes()
    if args.check:
        current = TARGET.read_text() if TARGET.exists() else ""
        sys.exit(0 if current == source else f"{TARGET} is out of date: python scripts/generate_model_classes.py")
    TARGET.write_text(source)
    print(f"wrote {TARGET}")
