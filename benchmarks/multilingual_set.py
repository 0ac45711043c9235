"""A parallel multilingual set built from Django's translation catalogs, at run time.

Source: the ``django`` wheel on PyPI (pinned below), downloaded with ``pip download`` and read
without installing it. Django ships, for about 100 languages, the compiled gettext catalogs
(``.mo``) of its own messages: each maps an English message (the ``msgid``) to its
translation, made and reviewed by Django's translation teams (Transifex). Licence: Django is
BSD-3-Clause, its translations included (``LICENSE`` in the wheel).

A *message* is kept when its English text has at least three words, no placeholder (``%``,
``{``), no plural form and no context, and when every chosen language translates it; a message
whose translation in some language equals another kept message's (two English wordings, one
translation) is dropped, so every text has exactly one counterpart per language. What is left
is the same set of messages in each language, aligned by ``msgid``: about 200 for the eight
default languages (UI messages and help texts: "This field cannot be blank.", "Designates that
this user has all permissions without explicitly assigning them.").

No text is written here by hand; :func:`build` returns the set, and the callers say which
package and version it came from. Nothing here imports halldyll_ray.
"""

from __future__ import annotations

import re
import struct
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

DJANGO_REQUIREMENT = "django==5.2.19"
#: English plus seven languages, all among the 16 of USE-multilingual; Django's locale names.
DEFAULT_LANGUAGES = ("en", "fr", "de", "es", "ru", "zh_Hans", "ja", "ar")
CACHE = Path(__file__).resolve().parent / ".cache"
_CATALOG = re.compile(
    r"django/(?:conf|contrib/\w+)/locale/([^/]+)/LC_MESSAGES/(django|djangojs)\.mo"
)
_PLACEHOLDER = re.compile(r"[%{}]")


@dataclass(frozen=True)
class ParallelSet:
    """The same messages in several languages.

    Attributes:
        source: Where they come from (package, version, wheel file).
        languages: Language codes (Django's), English first.
        texts: ``texts[language][i]`` is message ``i`` in that language; every list has the
            same length and order.
    """

    source: str
    languages: tuple[str, ...]
    texts: dict[str, list[str]]

    def __len__(self) -> int:
        return len(self.texts[self.languages[0]])


def read_mo(data: bytes) -> dict[str, str]:
    """Parse a compiled gettext catalog (GNU ``.mo``, either byte order) into msgid → msgstr.

    Plural and context entries are kept with their separators (NUL, EOT) so callers can drop
    them. Raises ValueError on a file that is not a ``.mo`` catalog.
    """
    for order in ("<", ">"):
        magic, _revision, count, originals, translations = struct.unpack_from(order + "5I", data)
        if magic == 0x950412DE:
            break
    else:
        raise ValueError("not a gettext .mo file")
    catalog: dict[str, str] = {}
    for i in range(count):
        length, offset = struct.unpack_from(order + "2I", data, originals + 8 * i)
        msgid = data[offset : offset + length].decode("utf-8")
        length, offset = struct.unpack_from(order + "2I", data, translations + 8 * i)
        catalog[msgid] = data[offset : offset + length].decode("utf-8")
    return catalog


def django_wheel(cache: Path = CACHE) -> Path:
    """The pinned Django wheel, downloaded once into ``cache`` with pip (no install)."""
    cache.mkdir(parents=True, exist_ok=True)
    version = DJANGO_REQUIREMENT.split("==")[1]
    found = sorted(cache.glob(f"django-{version}-*.whl"))
    if not found:
        pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
        subprocess.run([*pip, DJANGO_REQUIREMENT, "-d", str(cache)], check=True)
        found = sorted(cache.glob(f"django-{version}-*.whl"))
    if not found:
        raise RuntimeError(f"pip download {DJANGO_REQUIREMENT} left no wheel in {cache}")
    return found[0]


def build(
    languages: tuple[str, ...] = DEFAULT_LANGUAGES, *, wheel: Path | None = None
) -> ParallelSet:
    """Build the parallel set (see the module docstring) from the Django wheel.

    Args:
        languages: Django locale names; ``"en"`` (the msgids) must be first.
        wheel: A Django wheel; the pinned one (downloaded if needed) by default.

    Returns:
        The set.
    """
    if languages[0] != "en":
        raise ValueError("English (the msgids) must be the first language")
    wheel = wheel or django_wheel()
    catalogs: dict[str, dict[str, str]] = {lang: {} for lang in languages[1:]}
    with zipfile.ZipFile(wheel) as archive:
        for name in sorted(archive.namelist()):
            match = _CATALOG.fullmatch(name)
            if match is None or match.group(1) not in catalogs:
                continue
            for msgid, msgstr in read_mo(archive.read(name)).items():
                # The first catalog (sorted path) that translates a message wins.
                if msgstr and msgid not in catalogs[match.group(1)]:
                    catalogs[match.group(1)][msgid] = msgstr.strip()
    shared = set.intersection(*(set(c) for c in catalogs.values()))
    kept = sorted(
        msgid
        for msgid in shared
        if "\x00" not in msgid
        and "\x04" not in msgid
        and not _PLACEHOLDER.search(msgid)
        and len(msgid.split()) >= 3
        and all(catalogs[lang][msgid] for lang in catalogs)
    )
    # One counterpart per text in every language: drop messages that share a translation.
    for lang in catalogs:
        seen: dict[str, int] = {}
        for msgid in kept:
            seen[catalogs[lang][msgid]] = seen.get(catalogs[lang][msgid], 0) + 1
        kept = [m for m in kept if seen[catalogs[lang][m]] == 1]
    counts: dict[str, int] = {}
    for msgid in kept:
        counts[msgid.strip()] = counts.get(msgid.strip(), 0) + 1
    kept = [m for m in kept if counts[m.strip()] == 1]
    texts = {"en": [m.strip() for m in kept]}
    texts.update({lang: [catalogs[lang][m] for m in kept] for lang in catalogs})
    return ParallelSet(
        source=f"{DJANGO_REQUIREMENT} ({wheel.name}), gettext catalogs, BSD-3-Clause",
        languages=languages,
        texts=texts,
    )
