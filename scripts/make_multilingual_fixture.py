"""Write ``tests/data/multilingual_messages.json``: a small parallel set for the tests of
``EMBEDDING_MODEL=use-multilingual``, derived from Django's translation catalogs by
``benchmarks/multilingual_set.py`` (the ``django`` wheel on PyPI, pinned there; BSD-3-Clause).

It keeps the messages of at least six words (whole sentences), in English, French, German,
Spanish and Japanese, and every third one of those (a spread over the catalog, not a choice
by hand). Run from the repository root::

    python scripts/make_multilingual_fixture.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from multilingual_set import build  # noqa: E402

LANGUAGES = ("en", "fr", "de", "es", "ja")
OUT = ROOT / "tests" / "data" / "multilingual_messages.json"


def main() -> None:
    """Build the set and write the fixture."""
    data = build(LANGUAGES)
    rows = [i for i, text in enumerate(data.texts["en"]) if len(text.split()) >= 6][::3]
    fixture = {
        "source": data.source,
        "made_by": "scripts/make_multilingual_fixture.py",
        "languages": list(LANGUAGES),
        "texts": {lang: [data.texts[lang][i] for i in rows] for lang in LANGUAGES},
    }
    OUT.write_text(json.dumps(fixture, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {len(rows)} messages x {len(LANGUAGES)} languages to {OUT}")


if __name__ == "__main__":
    main()
