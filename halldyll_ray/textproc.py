"""Pure text logic: fact keys, chunking, candidate-fact extraction, extractive summaries.

No I/O here, so every rule is unit-tested on its own.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

_SPACE = re.compile(r"\s+")
# What a statement's end sheds once _SPACE made every space one " ". str.rstrip, not a
# pattern anchored at "$": that tried the end from every character of a run of dots, which
# cost 3 s for a 32,000-character sentence.
_TRAILING = " .!?;:,"


def fold(word: str) -> str:
    """``word`` case-folded, with the dotted capital I ("İ", Turkish and Azeri) folded to "i"
    as "I" is: ``str.casefold`` makes it "i" + U+0307, so "İzmir", "Izmir" and "İZMİR" were
    three facts (and "Ada lives in İzmir" did not name the "Izmir" of another statement)."""
    return word.casefold().replace("i\u0307", "i")


def _fold_word(match: re.Match[str]) -> str:
    word = match.group()
    return word if _identifier(word) else fold(word)


#: Format characters (Unicode Cf) that scripts and emoji need: the zero-width non-joiner and
#: joiner (Persian and Indic spelling, "👨‍💻") and the tag characters of flags ("🏴󠁧󠁢󠁳󠁣󠁴󠁿").
#: A statement keeps them, and names may hold them (:func:`halldyll_ray.models.plain`).
NEEDED_FORMAT = re.compile("[\u200c\u200d\U000e0020-\U000e007f]")


def _drop_invisible(text: str) -> str:
    """``text`` without its invisible format characters (direction marks, zero-width spaces,
    soft hyphens, BOMs): "Ada lives in Lyon" + U+200F (what text copied from right-to-left
    writing carries) had a key of its own, a second fact where the near-duplicate check did
    not catch it (a bulk store)."""
    if text.isascii():
        return text
    return "".join(c for c in text if unicodedata.category(c) != "Cf" or NEEDED_FORMAT.match(c))


#: What halldyll_search_text() (migrations 0014 and 0017) removes before it reads words:
#: invisible format characters, Hebrew points and cantillation, Arabic harakat and tatweel.
_UNSEARCHED = re.compile(
    "[\u00ad\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff"
    "\ufff9-\ufffb\U000e0001\U000e0020-\U000e007f"
    "\u0591-\u05bd\u05bf\u05c1\u05c2\u05c4\u05c5\u05c7"
    "\u0610-\u061a\u0640\u064b-\u065f\u0670\u06d6-\u06dc\u06df-\u06e4\u06e7\u06e8"
    "\u06ea-\u06ed]"
)
#: The accents unaccent removes from Latin, Greek and Cyrillic letters (their combining
#: marks once decomposed), not the marks Indic or Thai words are spelled with.
_ACCENTS = re.compile("[\u0300-\u036f]")
#: Letters unaccent spells with others, which no decomposition gives (case-folded first).
_UNACCENTED = str.maketrans(
    {"æ": "ae", "ð": "d", "ø": "o", "þ": "th", "đ": "d", "ħ": "h", "ı": "i", "ĸ": "q",
     "ŀ": "l", "ł": "l", "ŋ": "n", "œ": "oe", "ŧ": "t"}
)  # fmt: skip


def search_form(text: str) -> str:
    """``text`` as full-text search compares it (``halldyll_search_text()`` in SQL, what the
    index and a query both go through): NFKC, without the characters it removes
    (:data:`_UNSEARCHED`), case-folded (a final "ς" is a "σ", "ß" is "ss", "İ" is "i") and
    without accents. The hybrid ranking reads the query's words and each message's speaker in
    it: with ``str.lower``, "Zoë" typed as "e" + U+0308 (NFD), "Zoe", "ＺＯＥ" or "ZOË" did
    not name the speaker "Zoë" whom full-text search found for each of them."""
    text = _UNSEARCHED.sub("", unicodedata.normalize("NFKC", text))
    text = _ACCENTS.sub("", unicodedata.normalize("NFD", text))
    return unicodedata.normalize("NFC", text.casefold().translate(_UNACCENTED))


def normalize_statement(statement: str) -> str:
    """Case-, width- and whitespace-folded statement without trailing punctuation or
    invisible format characters (:func:`_drop_invisible`).

    Identifiers (:func:`_identifier`: tokens, passwords, "iPhone") keep their case: "my
    password is HelloWorld2024" and "... helloworld2024" are two facts, not one said twice.
    """
    text = _TOKEN.sub(_fold_word, unicodedata.normalize("NFKC", _drop_invisible(statement)))
    text = _SPACE.sub(" ", text).strip()
    return text.rstrip(_TRAILING)


def fact_key(statement: str) -> str:
    """Stable key of a fact's statement: equal for statements that differ only in form."""
    return hashlib.sha256(normalize_statement(statement).encode()).hexdigest()


_TOKEN = re.compile(r"[^\W_]+(?:['’][^\W_]+)*", re.UNICODE)
_UNITS = {
    w: i
    for i, w in enumerate(
        [
            "zero",
            "one",
            "two",
            "three",
            "four",
            "five",
            "six",
            "seven",
            "eight",
            "nine",
            "ten",
            "eleven",
            "twelve",
            "thirteen",
            "fourteen",
            "fifteen",
            "sixteen",
            "seventeen",
            "eighteen",
            "nineteen",
        ]
    )
}
_TENS = {
    w: 10 * i
    for i, w in enumerate(
        ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"], 2
    )
}
_ORDINALS = {
    w: i
    for i, w in enumerate(
        [
            "first",
            "second",
            "third",
            "fourth",
            "fifth",
            "sixth",
            "seventh",
            "eighth",
            "ninth",
            "tenth",
            "eleventh",
            "twelfth",
        ],
        1,
    )
}
#: Quantity words kept as words (no single value).
_QUANTITIES = frozenset(
    ["hundred", "thousand", "million", "billion", "once", "twice", "half", "dozen"]
)
_ORDINAL_DIGITS = re.compile(r"^(\d+)(?:st|nd|rd|th)$")
_CALENDAR_WORDS = frozenset(
    [
        "january",
        "february",
        "march",
        "april",
        "may",
        "june",
        "july",
        "august",
        "september",
        "october",
        "november",
        "december",
        "jan",
        "feb",
        "mar",
        "apr",
        "jun",
        "jul",
        "aug",
        "sep",
        "sept",
        "oct",
        "nov",
        "dec",
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
        "yesterday",
        "today",
        "tomorrow",
    ]
)
#: Month names that are also verbs: months only when capitalised ("in May", not "I may").
_ALSO_VERBS = frozenset({"may", "march"})
_NEGATIONS = frozenset(
    ["not", "no", "never", "none", "nothing", "nobody", "neither", "nor", "cannot", "without"]
)
_PRONOUN_I = frozenset({"i", "i'm", "i've", "i'd", "i'll"})


def _number(low: str) -> str | None:
    """A number word, ordinal or numeral as its digits ("forty" "40", "fifth" "5th" "5"),
    a quantity word as itself, else None."""
    if low in _UNITS:
        return str(_UNITS[low])
    if low in _TENS:
        return str(_TENS[low])
    if low in _ORDINALS:
        return str(_ORDINALS[low])
    ordinal = _ORDINAL_DIGITS.match(low)
    if ordinal:
        return str(int(ordinal.group(1)))
    if any(ch.isdigit() for ch in low) or low in _QUANTITIES:
        return low
    return None


def article(word: str) -> str:
    """``word`` with its indefinite article: "a fact", "an image", "an update"."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


#: A word longer than this is read as an identifier (a token, a password, a hash): the encoder
#: splits it into pieces that say little, or reads it as [UNK] past 100 characters, so two
#: statements that differ only in it embed almost alike.
MAX_WORD_CHARS = 20
#: Statements of more words than this are not merged on similarity alone unless they hold the
#: same words: the encoder sees 128 word pieces of a fact (CHUNK_TOKENS), so a difference
#: further on does not move the vector the merge compares.
MAX_MERGE_WORDS = 60


def _identifier(word: str) -> bool:
    """A token, code or password rather than a word: long, or with capitals after a lowercase
    letter ("aBcD", "iPhone" too: a product name is a particular as well)."""
    if len(word) > MAX_WORD_CHARS:
        return True
    return any(c.isupper() for c in word[1:]) and any(_has_capital(c) for c in word)


def _has_capital(letter: str) -> bool:
    """Whether ``letter`` is lowercase with a one-letter capital: "ß" is not (its capital is
    "SS"), so "STRAßE", German written in capitals, is a word that folds to "strasse" as
    "STRASSE" and "Straße" do, not an identifier kept apart from them."""
    upper = letter.upper()
    return letter.islower() and len(upper) == 1 and upper != letter


@dataclass(frozen=True)
class _Particulars:
    """What pins down which fact a statement is (:func:`same_particulars`)."""

    values: frozenset[str]  # numbers as digits, calendar words, "not" for any negation
    names: frozenset[str]  # capitalised words, the first one too (folded)
    words: frozenset[str]  # every word (folded), to find a name written elsewhere
    length: int  # words in the statement


def _particulars(statement: str) -> _Particulars:
    text = unicodedata.normalize("NFKC", statement)
    tokens = [m.group().replace("’", "'") for m in _TOKEN.finditer(text)]
    values: set[str] = set()
    names: set[str] = set()
    pending_tens: int | None = None  # "twenty" waiting for a "one" of "twenty-one"
    for word in tokens:
        if _identifier(word):  # before numbers: "HelloWorld2024" holds digits too
            values.add(word)  # case and all: "aBcD" is not "AbCd"
            pending_tens = None
            continue
        low = fold(word)
        number = _number(low)
        if pending_tens is not None:
            if low in _UNITS and 0 < _UNITS[low] < 10:
                values.discard(str(pending_tens))
                number = str(pending_tens + _UNITS[low])
            pending_tens = None
        if number is not None:
            values.add(number)
            pending_tens = _TENS.get(low)
        elif low in _CALENDAR_WORDS and (low not in _ALSO_VERBS or word[:1].isupper()):
            values.add(low)
        elif low in _NEGATIONS or low.endswith("n't"):
            values.add("not")
        elif word[:1].isupper() and low not in _PRONOUN_I and (len(word) > 1 or word != "A"):
            names.add(low)  # "Ada", and acronyms: "NASA" is not "IBM"
    return _Particulars(
        frozenset(values), frozenset(names), frozenset(fold(t) for t in tokens), len(tokens)
    )


def same_particulars(
    a: str, b: str, unknown_spans: Callable[[str], Sequence[str]] | None = None
) -> bool:
    """Whether two similar statements agree on their particulars: the same numbers (in
    digits or words: "40" is "forty", "5th" is "fifth"), calendar words and negations, and
    no name in one that the other lacks. A capitalised word counts as a name wherever it
    stands (acronyms too); a name that the other statement has in any case or place (a
    sentence-initial "Every", "Ada" moved to the end) is not a difference. Identifiers (words
    over MAX_WORD_CHARS characters, or with capitals inside: tokens, passwords, "iPhone") must
    be the same, letter case included, and statements over MAX_MERGE_WORDS words must hold the same
    words: the encoder cannot tell such statements apart (a GitHub token for another, one
    150-letter word for another), so similarity alone would merge them. With
    ``unknown_spans`` (the encoder's, :class:`~halldyll_ray.embedding.encoder.TextEncoder`),
    what the encoder reads as its unknown token must be the same too: to all-MiniLM-L6-v2
    every emoji and every Thai or Amharic word is ``[UNK]``, so "🍕" and "🍔" embed alike.

    Sentence embeddings place statements that differ only in such a word very close: with
    all-MiniLM-L6-v2, "The user is 30 years old" and "... 31 years old" have a cosine of
    0.963, above FACT_MERGE_SIMILARITY (0.92). A near-duplicate merge must not turn the
    second into a reinforcement of the first, so the merge asks both: similar enough, and
    the same particulars.
    """
    if normalize_statement(a) == normalize_statement(b):
        return True
    if unknown_spans is not None and sorted(unknown_spans(a)) != sorted(unknown_spans(b)):
        return False
    first, second = _particulars(a), _particulars(b)
    if max(first.length, second.length) > MAX_MERGE_WORDS and first.words != second.words:
        return False
    return (
        first.values == second.values
        and first.names <= second.words
        and second.names <= first.words
    )


#: Tokens per chunk and tokens shared by consecutive chunks. all-MiniLM-L6-v2 was trained on
#: inputs of at most 128 word pieces (its card; it truncates at 256), and mean pooling over a
#: long window dilutes a sentence in it: a key sentence at the end of a 3,900-character
#: prompt scored 0.19 against its paraphrase in 200-token chunks, 0.54 in 128-token ones.
CHUNK_TOKENS = 128
CHUNK_OVERLAP_TOKENS = 32
_SENTENCE_END = frozenset(".!?。！？\n")


def token_windows(
    text: str,
    offsets: Sequence[tuple[int, int]],
    *,
    window: int = CHUNK_TOKENS,
    overlap: int = CHUNK_OVERLAP_TOKENS,
) -> list[str]:
    """Split ``text`` into overlapping windows of at most ``window`` tokens.

    A window that is not the last ends after the last sentence-ending token (``.``, ``!``,
    ``?``, ``。`` ...) in its second half, if it has one, so that sentences stay whole; the
    next window starts ``overlap`` tokens before that end.

    Args:
        text: Any text, in any script (no spaces needed: CJK text is cut between tokens).
        offsets: (start, end) character offsets of its tokens, as the encoder's tokenizer
            gives them (``TextEncoder.token_offsets``).
        window: Tokens per chunk.
        overlap: Tokens each chunk shares with the previous one (less than half a window).

    Returns:
        The chunks, each a slice of ``text`` from a token's start to a token's end, stripped;
        one chunk for a text that fits, none for a blank one. Every token of the text is in
        at least one chunk.
    """
    if not 0 <= overlap < window // 2 + 1 or window < 2:
        raise ValueError("overlap must be at least 0 and at most half the window")
    if len(offsets) <= window:
        stripped = text.strip()
        return [stripped] if stripped else []
    chunks = []
    start = 0
    while True:
        end = min(start + window, len(offsets))
        if end < len(offsets):
            for cut in range(end, start + window // 2, -1):
                if text[offsets[cut - 1][1] - 1] in _SENTENCE_END:
                    end = cut
                    break
        piece = text[offsets[start][0] : offsets[end - 1][1]].strip()
        if piece:
            chunks.append(piece)
        if end == len(offsets):
            return chunks
        start = end - overlap


# --- candidate facts ---------------------------------------------------------------------------
# Transparent first-person patterns; each maps to a third-person statement about the user.
_CLAUSE_END = r"(?P<rest>[^.!?\n;,]{2,120})"
_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\bmy name is " + _CLAUSE_END, re.I), "The user's name is {rest}"),
    (re.compile(r"\bcall me " + _CLAUSE_END, re.I), "The user wants to be called {rest}"),
    (
        re.compile(r"\bmy (?P<thing>[a-z][a-z ]{1,40}?) (?:is|are) " + _CLAUSE_END, re.I),
        "The user's {thing} is {rest}",
    ),
    (re.compile(r"\bi live in " + _CLAUSE_END, re.I), "The user lives in {rest}"),
    (re.compile(r"\bi work (?:at|for) " + _CLAUSE_END, re.I), "The user works at {rest}"),
    (re.compile(r"\bi work as (?:an? )?" + _CLAUSE_END, re.I), "The user works as {rest}"),
    (
        re.compile(
            r"\bi (?:really )?(?P<verb>like|love|enjoy|prefer|hate|dislike) " + _CLAUSE_END, re.I
        ),
        "The user {verb}s {rest}",
    ),
    (
        re.compile(
            r"\bi(?: am|'m) (?!not\b|sure\b|going\b|trying\b|just\b|so\b|very\b)" + _CLAUSE_END,
            re.I,
        ),
        "The user is {rest}",
    ),
    (re.compile(r"\bi have (?:an? |two |three )?" + _CLAUSE_END, re.I), "The user has {rest}"),
]
# "My name is Ada and I live in Lyon": split where a new first-person clause starts, but keep
# "I like rice and beans" whole.
# A separator starts where a run of spaces starts (the look-behind): a try from inside the run
# scanned the rest of it again, so a message of 32,000 spaces cost 34 s.
_NEW_SUBJECT = re.compile(r"(?<!\s)\s*(?:,|;|\band\b|\bbut\b)\s*(?=(?:i|i'm|my)\b)", re.I)
_HEDGES = re.compile(r"\b(if|maybe|perhaps|might|would|could|wonder|whether)\b", re.I)


def extract_candidate_facts(message: str, *, limit: int = 5) -> list[str]:
    """First-person statements of a user message turned into facts about the user.

    Questions and hedged clauses ("maybe I like...") are skipped: a candidate must be a plain
    assertion. The result is deduplicated (by normalised statement) and at most ``limit`` long.
    """
    found: dict[str, str] = {}
    clauses = []
    for sentence in re.split(r"(?<=[.!?\n])\s+", message):
        sentence = sentence.strip()
        if not sentence or sentence.endswith("?") or _HEDGES.search(sentence):
            continue
        clauses.extend(_NEW_SUBJECT.split(sentence))
    for clause in clauses:
        for pattern, template in _PATTERNS:
            match = pattern.search(clause)
            if not match:
                continue
            groups = {k: v.strip().rstrip(",") for k, v in match.groupdict().items() if v}
            if "verb" in groups:
                groups["verb"] = groups["verb"].lower()
            statement = template.format(**groups)
            found.setdefault(normalize_statement(statement), statement)
            break
        if len(found) >= limit:
            break
    return list(found.values())[:limit]


# --- extractive summary -----------------------------------------------------------------------
_WORD = re.compile(r"[^\W\d_]{3,}", re.UNICODE)
_STOP = frozenset(
    """
    the and for are but not you your with this that have from they will would there their
    what about which when make like time just know take into year some could them than then
    look only come over think also back after work first well even want because these give
    most very has had was were been being its it's i'm can did does doing yes okay sure
    thanks thank please hello here how who why all any our out get got let she him her his
    one two
    """.split()  # noqa: SIM905 - a word list reads best as text
)


@dataclass(frozen=True)
class Line:
    """One message of a conversation as the summariser sees it."""

    role: str
    content: str


def extractive_summary(
    lines: Sequence[Line], *, max_sentences: int = 6, max_chars: int = 1500
) -> str:
    """Pick the conversation's most central sentences, in their original order.

    A sentence scores the mean corpus frequency of its content words (stop words dropped), a
    classic frequency summariser: deterministic, cheap, and good enough until an LLM-backed
    summariser is plugged in.
    """
    sentences: list[tuple[int, str, str]] = []
    seen: set[str] = set()
    for line in lines:
        # Every line break str.splitlines knows (\r, U+2028 ...), not only \n: a sentence
        # holding one would be a line of the summary with no role, or another role's.
        said = (s for part in line.content.splitlines() for s in re.split(r"(?<=[.!?])\s+", part))
        for sentence in said:
            sentence = sentence.strip()
            key = normalize_statement(sentence)
            # A sentence said again adds nothing to a summary (repeated preferences, greetings).
            if len(sentence) >= 12 and key not in seen:
                seen.add(key)
                sentences.append((len(sentences), line.role, sentence))
    if not sentences:
        return ""
    frequency: Counter[str] = Counter()
    words_of: list[list[str]] = []
    for _, _, sentence in sentences:
        words = [w.casefold() for w in _WORD.findall(sentence) if w.casefold() not in _STOP]
        words_of.append(words)
        frequency.update(set(words))
    scored = []
    for (index, role, sentence), words in zip(sentences, words_of, strict=True):
        score = sum(frequency[w] for w in words) / (len(words) + 1) if words else 0.0
        # Users' own statements carry what the agent must remember: a small boost.
        scored.append((score * (1.15 if role == "user" else 1.0), index, role, sentence))
    chosen = sorted(scored, key=lambda item: (-item[0], item[1]))[:max_sentences]
    parts: list[str] = []
    used = 0
    for _, _, role, sentence in sorted(chosen, key=lambda item: item[1]):
        piece = f"{role}: {sentence}"
        if used + len(piece) > max_chars:
            break
        parts.append(piece)
        used += len(piece) + 1
    return "\n".join(parts)
