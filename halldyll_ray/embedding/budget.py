"""What a text costs in a prompt budget, counted from a tokenizer's tokens.

A tokenizer's token count is what an embedding model reads, not what an LLM is sent. Two
kinds of text cost an LLM far more than the count: what the tokenizer reads as its unknown
token (a word over 100 characters, emoji, Thai for WordPiece: one token however long), and
what its normaliser drops (combining marks, zero-width and other format characters,
control characters, long runs of whitespace: no token at all). Counted as they were, a
context of "16 tokens" carried 30,000 characters, and "a" with 199,999 combining accents
was one token. The rule here, shared by the encoders (:class:`~halldyll_ray.embedding.
encoder.OnnxEncoder`, :class:`~halldyll_ray.embedding.use_multilingual.UseMultilingualEncoder`):

- a token costs one;
- an unknown token costs one per character it stands for;
- a character the tokenizer did not read (inside a token's span or between tokens) costs
  one, but whitespace: a run is free up to :data:`FREE_WHITESPACE_RUN` + 1 characters, then
  costs a token per FREE_WHITESPACE_RUN more.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

__all__ = ["FREE_WHITESPACE_RUN", "read_whole", "token_costs", "unread_cost"]

#: Whitespace characters in a row that cost nothing beyond the first; each further run of
#: this many costs a token. A bound chosen, not measured: LLM tokenizers merge runs of spaces
#: (indentation) into few tokens, and a budget of n tokens carries at most about 8n
#: characters of whitespace besides its words.
FREE_WHITESPACE_RUN = 8

_PRINTABLE_ASCII = re.compile(r"[\t\n\r\x20-\x7e]*")
_LONG_WHITESPACE = re.compile(rf"[ \t\n\r]{{{FREE_WHITESPACE_RUN + 2}}}")


def read_whole(text: str) -> bool:
    """Whether every character of ``text`` is one a tokenizer reads (printable ASCII, line
    breaks and tabs) with no long run of whitespace: its cost is then its token count (when
    no token is the unknown one), found without a walk over its tokens."""
    return _PRINTABLE_ASCII.fullmatch(text) is not None and not _LONG_WHITESPACE.search(text)


def _is_space(c: str) -> bool:
    return c in " \t\n\r" or unicodedata.category(c) == "Zs"


def unread_cost(span: str, read: int) -> int:
    """Tokens the characters of ``span`` that the tokenizer did not read cost.

    Args:
        span: A token's span of the text, or the text between two tokens.
        read: How many of its characters the token's piece reads (0 between tokens); the
            unread ones are counted as its whitespace first (the cheap ones).

    Returns:
        One per unread character that is not whitespace, plus a token per
        :data:`FREE_WHITESPACE_RUN` unread whitespace characters past the first.
    """
    unread = len(span) - read
    if unread <= 0:
        return 0
    spaces = min(unread, sum(1 for c in span if _is_space(c)))
    return unread - spaces + max(0, spaces - 1) // FREE_WHITESPACE_RUN


def token_costs(
    text: str,
    ids: Sequence[int],
    pieces: Sequence[str],
    offsets: Sequence[tuple[int, int]],
    *,
    unknown_id: int | None,
    subword_prefix: str = "",
) -> list[tuple[int, int]]:
    """(end, cost) of each token of ``text``, what stands before it since the previous
    token included; a last unit for what follows the last token, if anything does.

    Args:
        text: The text tokenised.
        ids: Each token's id.
        pieces: Each token's piece (its text in the vocabulary: ``##ing``, ``▁the``).
        offsets: Each token's (start, end) in characters of ``text``.
        unknown_id: The unknown token's id (``[UNK]``, ``<unk>``), or None.
        subword_prefix: The mark of a piece inside a word (WordPiece's ``##``): not part of
            what the piece reads. (SentencePiece's ``▁`` reads a space, and counts as one.)
    """
    units: list[tuple[int, int]] = []
    done = 0
    for token, piece, (start, end) in zip(ids, pieces, offsets, strict=True):
        cost = 1
        if start > done and (start - done > 1 or text[done] not in " \n"):  # one: a word break
            cost += unread_cost(text[done:start], 0)
        if token == unknown_id:
            cost += max(1, end - start) - 1
        else:
            read = len(piece)
            if subword_prefix and piece.startswith(subword_prefix):
                read -= len(subword_prefix)
            if end - start > read:
                cost += unread_cost(text[start:end], read)
        done = max(done, end)
        units.append((done, cost))
    if done < len(text):
        units.append((len(text), unread_cost(text[done:], 0)))
    return units
