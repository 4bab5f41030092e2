"""When does a paragraph go on across a page break? The text tests behind
:func:`.joins.join_paragraph`, on the cells' Markdown text.

A paragraph is cut by the break when the first part does not end a sentence and the second part
continues it: it starts lower-case, or the first part ends in a word split by a hyphen. In
scripts without letter case (Chinese, Japanese, Korean) a first part that ends without sentence
punctuation and a second part that starts with such a character are joined too, without a space.
"""
from __future__ import annotations

import re

__all__ = ["continue_paragraph", "ends_sentence", "starts_lower_case"]

# Sentence ends, in Latin and CJK punctuation. A colon or a semicolon announces more text, so it
# does not end a paragraph.
_SENTENCE_END = frozenset(".!?…。！？")
# Closing quotes, brackets and Markdown emphasis that may follow the sentence's punctuation.
_CLOSERS = "\"'”’»)]}*_」』）】"
# Opening quotes, brackets and emphasis that may come before the first word.
_OPENERS = "\"'“‘«([{*_「『（【"
# A word cut by a line-break hyphen: a letter, then the hyphen, at the very end.
_SPLIT_WORD = re.compile(r"[^\W\d_]-$")
# Han, kana, Hangul: the scripts without case whose lines are joined without a space.
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")


def ends_sentence(text: str) -> bool:
    """True when ``text`` ends with sentence punctuation (before any closing quote or bracket)."""
    stripped = text.rstrip().rstrip(_CLOSERS).rstrip()
    return bool(stripped) and stripped[-1] in _SENTENCE_END


def starts_lower_case(text: str) -> bool:
    """True when the first letter of ``text`` (after opening quotes or brackets) is lower-case."""
    stripped = text.lstrip().lstrip(_OPENERS)
    return bool(stripped) and stripped[0].islower()


def continue_paragraph(first: str, second: str) -> str | None:
    """The two parts as one paragraph when ``second`` continues ``first`` across a page break;
    None when it does not.

    * ``first`` ends in ``<letter>-``: a word split across the break. The hyphen is dropped when
      ``second`` starts lower-case (``inter-`` + ``national`` -> ``international``; a real compound
      such as ``well-`` + ``known`` loses its hyphen too, which no rule without a dictionary can
      tell apart) and kept otherwise (``non-`` + ``English``).
    * ``first`` ends a sentence: not joined.
    * ``second`` starts lower-case: joined with one space.
    * both sides are CJK characters: joined without a space.
    """
    head, tail = first.rstrip(), second.lstrip()
    if not head or not tail:
        return None
    if _SPLIT_WORD.search(head):
        return (head[:-1] if starts_lower_case(tail) else head) + tail
    if ends_sentence(head):
        return None
    if starts_lower_case(tail):
        return f"{head} {tail}"
    if _CJK.match(head[-1]) and _CJK.match(tail[0]):
        return head + tail
    return None
