"""A straightforward transcription of MetaCLIP's published matching (metaclip/substr_matching.py,
the version without Aho-Corasick): pad each entry with one space on each side, space the caption,
and test every entry with ``in``. Written independently of ``pipeline`` so the parity test compares
two implementations.

Testing 220k entries against each of 10k captions one by one would take an hour in Python, so the
two loops are swapped: every spaced caption is joined into one string with a NUL separator (which
occurs in no caption or entry, checked), and for each entry ``str.find`` lists every caption that
contains it. For each (entry, caption) pair this decides exactly ``entry in spaced_caption``.

One exact shortcut: the padded entry `` w1 rest `` starts with `` w1 `` (``w1`` = the entry up to
its first space), so it can only occur where `` w1 `` does, i.e. where ``w1`` is one of the
space-separated tokens of some spaced caption. Entries whose ``w1`` is no such token are skipped
without a search; they match nothing either way.
"""

from __future__ import annotations

import bisect


def reference_spacing(text: str) -> str:
    puncts_to_wrap = [",", ".", ";", ":", "?", "!", "`"]
    chars_to_space = ["\t", "\n", "\r"]
    spaced_text = f" {text} "
    for punct_to_wrap in puncts_to_wrap:
        spaced_text = spaced_text.replace(punct_to_wrap, f" {punct_to_wrap} ")
    for char_to_space in chars_to_space:
        spaced_text = spaced_text.replace(char_to_space, " ")
    return spaced_text


def reference_substr_matching(text: str, metadata: list[str]) -> list[int]:
    """The reference, literally: one caption against every entry."""
    spaced_metadata = [f" {entry} " for entry in metadata]
    text = reference_spacing(text)
    return [entry_id for entry_id, entry in enumerate(spaced_metadata) if entry in text]


def reference_matches_all(captions: list[str], metadata: list[str]) -> list[list[int]]:
    """``reference_substr_matching`` for every caption, with the loops swapped (see module doc)."""
    spaced = [reference_spacing(c) for c in captions]
    assert not any("\x00" in s for s in spaced) and not any("\x00" in e for e in metadata)
    starts, pos = [], 0
    for s in spaced:
        starts.append(pos)
        pos += len(s) + 1
    joined = "\x00".join(spaced)
    tokens = {token for s in spaced for token in s.split(" ")}
    result: list[set[int]] = [set() for _ in captions]
    for entry_id, entry in enumerate(metadata):
        if entry.split(" ")[0] not in tokens:
            continue
        needle = f" {entry} "
        at = joined.find(needle)
        while at != -1:
            result[bisect.bisect_right(starts, at) - 1].add(entry_id)
            at = joined.find(needle, at + 1)
    return [sorted(r) for r in result]
