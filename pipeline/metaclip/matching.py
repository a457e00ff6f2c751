"""MetaCLIP substring matching and entry counts.

Semantics follow MetaCLIP's published ``substr_matching.py`` exactly (Sec. 3.2 of "Demystifying
CLIP Data"): the caption is padded with a space on each side, the characters ``, . ; : ? ! `` are
wrapped in spaces, tabs and newlines become spaces; each entry is padded with one space on each
side; an entry matches when the padded entry is a substring of the spaced caption. Matching is
case-sensitive, as in the reference (entries are mostly lowercase, so "Dog" does not match "dog").
Entries containing those punctuation characters can therefore never match, also as in the
reference. The result is the set of matched entry ids; we return it sorted.

An Aho-Corasick automaton finds all occurrences, overlapping ones included, as MetaCLIP's own
faster variant does with pyahocorasick. We use ``ahocorasick_rs`` (a maintained Rust automaton)
instead, because it scans bytes: a whole batch of spaced captions is one Arrow buffer, scanned in
place with no Python string per caption and no Python object per match until the result array;
on the full entries file it scans about 4x faster than pyahocorasick's iterator
(``bench/metaclip_matching.py``, docs/benchmarks.md). It is built once per process.
"""

from __future__ import annotations

import functools
import json
import string
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.errors import UserError
from pipeline.store.parquet import file_sha256

PUNCTS_TO_WRAP = (",", ".", ";", ":", "?", "!", "`")
CHARS_TO_SPACE = ("\t", "\n", "\r")
_PUNCT_CLASS = "([" + "".join("\\" + p for p in PUNCTS_TO_WRAP) + "])"
_SPACE_CLASS = "[" + "".join(CHARS_TO_SPACE) + "]"


def spacing(text: str) -> str:
    """MetaCLIP's caption normalisation before matching (see the module docstring)."""
    spaced = f" {text} "
    for punct in PUNCTS_TO_WRAP:
        spaced = spaced.replace(punct, f" {punct} ")
    for char in CHARS_TO_SPACE:
        spaced = spaced.replace(char, " ")
    return spaced


def load_entries(path: str | Path, worldwide: bool = False) -> list[str]:
    """Metadata entries from a JSON list of strings (MetaCLIP's ``metadata.json`` format); with
    ``worldwide``, one language's ``{lang}.json`` of MetaCLIP 2, which may also be the object
    ``build_metadata.py`` writes (``{entry: source}``: its keys), and whose entries must be
    non-empty and free of NUL.

    Raises:
        UserError: the file is not such a list; names the file (and the entry).
    """
    path = Path(path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: metadata file not found") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON: {exc}") from None
    if worldwide and isinstance(entries, dict):
        entries = list(entries)
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        name = "{lang}.json" if worldwide else "metadata.json"
        raise UserError(f"{path}: expected a JSON list of strings (MetaCLIP's {name} format)")
    for i, entry in enumerate(entries if worldwide else ()):
        if not entry or "\x00" in entry:
            raise UserError(f"{path}: entry {i} is empty or contains a NUL character")
    return entries


# get_spaced_metadata's punctuation: ASCII's and these (substr_matching.py's additional_punctuation,
# with build_metadata.py's inverted question mark)
PUNCTUATION = frozenset(string.punctuation) | frozenset("，。、；：？¿！“”‘’（）【】《》〈〉「」『』～—")
# is_cjk_or_similar's code point ranges: CJK ideographs, radicals and description characters;
# Thai, Lao, Burmese, Khmer, Tibetan
_NO_SPACE_RANGES = (
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF), (0x2CEB0, 0x2EBEF), (0xF900, 0xFAFF), (0x2E80, 0x2EFF), (0x2F00, 0x2FDF), (0x2FF0, 0x2FFF),
    (0x0E00, 0x0E7F), (0x0E80, 0x0EFF), (0x1000, 0x109F), (0x1780, 0x17FF), (0x0F00, 0x0FFF),
)  # fmt: skip


@functools.lru_cache(maxsize=65536)  # a few thousand distinct first and last characters per language
def is_cjk_or_similar(char: str) -> bool:
    """MetaCLIP 2's test for a character that needs no space beside it (``is_cjk_or_similar``)."""
    code = ord(char)
    return any(lo <= code <= hi for lo, hi in _NO_SPACE_RANGES) or char in PUNCTUATION


def spaced_entry(entry: str) -> str:
    """An entry as MetaCLIP 2's automaton holds it (``get_spaced_metadata``): a space before it
    unless its first character is CJK-like or punctuation, and after it likewise for its last."""
    if not is_cjk_or_similar(entry[0]):
        entry = f" {entry}"
    if not is_cjk_or_similar(entry[-1]):
        entry = f"{entry} "
    return entry


def file_digest(path: str | Path) -> str:
    """The file's sha256 (16 hex digits), hashed once per process while its size and mtime stay."""
    st = Path(path).stat()
    return _digest(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)[:16]


class SubstringMatcher:
    """Matches captions against metadata entries. ``setup()`` builds the automaton once.

    Args:
        metadata: Path of the entries file.
        case_sensitive: MetaCLIP matches case-sensitively (the default); ``False`` lowercases the
            caption first, a documented departure for metadata that is all lowercase.
        worldwide: MetaCLIP 2's entries (:mod:`pipeline.metaclip.worldwide`): a ``{lang}.json`` list
            or ``{entry: source}`` object, each entry padded only on a side that is not CJK-like or
            punctuation (``get_spaced_metadata``); held as a contiguous NFA, the smallest of the
            automaton's layouts, since a worker may hold one per language (docs/benchmarks.md).
    """

    def __init__(self, metadata: str | Path, case_sensitive: bool = True, worldwide: bool = False):
        self.metadata = Path(metadata)
        self.case_sensitive = case_sensitive
        self.worldwide = worldwide
        self.entries: list[str] = []  # kept for MetaCLIP 1's list; a worldwide matcher keeps only their number
        self.num_entries = 0
        self._automaton: Any = None
        self._pattern_ids = np.zeros(0, np.int64)  # automaton pattern -> first entry id
        self._repeats: dict[int, list[int]] = {}

    def setup(self) -> SubstringMatcher:
        if self._automaton is None:
            import ahocorasick_rs

            if self.worldwide:
                self.entries, pad = load_entries(self.metadata, worldwide=True), spaced_entry
            else:
                self.entries, pad = load_entries(self.metadata), lambda entry: f" {entry} "
            self.num_entries = len(self.entries)
            first: dict[str, int] = {}
            for entry_id, entry in enumerate(self.entries):
                if "\x00" in entry:
                    raise UserError(f"{self.metadata}: entry {entry_id} contains a NUL character")
                if entry in first:  # a repeated entry: MetaCLIP's loop returns every id of it
                    self._repeats.setdefault(first[entry], [first[entry]]).append(entry_id)
                    continue
                first[entry] = entry_id
            self._pattern_ids = np.fromiter(first.values(), dtype=np.int64, count=len(first))
            layout = {"implementation": ahocorasick_rs.Implementation.ContiguousNFA} if self.worldwide else {}
            patterns = [pad(entry).encode() for entry in first]
            self._automaton = ahocorasick_rs.BytesAhoCorasick(patterns, matchkind=ahocorasick_rs.MatchKind.Standard,
                                                              **layout)  # fmt: skip
            if self.worldwide:  # a worker may hold 42 of these: the automaton only (docs/benchmarks.md)
                self.entries = []
        return self

    def match(self, caption: str | None) -> list[int]:
        """Sorted ids of the entries ``caption`` contains (none for a null caption)."""
        return self(pa.array([caption], pa.string()))[0].as_py()

    def __call__(self, captions: pa.Array | pa.ChunkedArray) -> pa.ListArray:
        """``matched_entry_ids`` (list<int32>) for a column of captions, the whole batch at once:
        Arrow spaces every caption (the same replacements as :func:`spacing`), the spaced captions
        are joined with NUL (which no entry contains, so no match crosses two captions) and the
        automaton scans the batch's UTF-8 buffer in one call; each match's end offset gives its
        caption. No Python runs per caption or per match, which is what makes the stage faster
        than MetaCLIP's matchers (``bench/metaclip_matching.py``)."""
        if isinstance(captions, pa.ChunkedArray):
            captions = captions.combine_chunks() if captions.num_chunks else pa.array([], pa.string())
        if not self.case_sensitive:
            captions = pa.array([None if c is None else c.lower() for c in captions.to_pylist()], pa.string())
        return self._match_batch(captions.cast(pa.string()))

    def _match_batch(self, captions: pa.Array) -> pa.ListArray:
        import pyarrow.compute as pc

        automaton = self.setup()._automaton
        n = len(captions)
        # the replacements of spacing(), one pass per character class (RE2 over the whole column)
        spaced = pc.replace_substring_regex(captions, pattern=_PUNCT_CLASS, replacement=r" \1 ")
        spaced = pc.replace_substring_regex(spaced, pattern=_SPACE_CLASS, replacement=" ")
        spaced = pc.binary_join_element_wise(" ", pc.fill_null(spaced, ""), " \x00", "").cast(pa.large_string())
        _, offsets_buf, data = spaced.buffers()
        offsets = np.frombuffer(offsets_buf, dtype=np.int64)[spaced.offset : spaced.offset + n + 1]
        haystack = np.frombuffer(data, dtype=np.uint8)[offsets[0] : offsets[-1]] if n else np.zeros(0, np.uint8)
        found = np.array(automaton.find_matches_as_indexes(haystack, overlapping=True), dtype=np.int64).reshape(-1, 3)
        entry = self._pattern_ids[found[:, 0]]
        at = offsets[0] + found[:, 2] - 1  # the match's last byte, in the buffer
        if self._repeats:
            at, entry = self._expand(at, entry)
        row = np.searchsorted(offsets, at, side="right") - 1
        pairs = np.unique(row * np.int64(self.num_entries + 1) + entry)  # sorted, each entry once per caption
        rows, ids = pairs // (self.num_entries + 1), (pairs % (self.num_entries + 1)).astype(np.int32)
        list_offsets = np.searchsorted(rows, np.arange(n + 1)).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(list_offsets), pa.array(ids, pa.int32()))

    def _expand(self, at: np.ndarray, entry: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        extra_at, extra_id = [], []
        for first, ids in self._repeats.items():
            where = at[entry == first]
            for i in ids[1:]:
                extra_at.append(where)
                extra_id.append(np.full(len(where), i, dtype=np.int64))
        return np.concatenate([at, *extra_at]), np.concatenate([entry, *extra_id])


_MATCHERS: dict[tuple[str, bool, bool], SubstringMatcher] = {}


def matcher_for(metadata: str | Path, case_sensitive: bool = True, worldwide: bool = False) -> SubstringMatcher:
    """The process's matcher for a metadata file: built once per worker process or Spark executor."""
    key = (str(Path(metadata).resolve()), case_sensitive, worldwide)
    if key not in _MATCHERS:
        from pipeline.loads import note_load

        _MATCHERS[key] = SubstringMatcher(metadata, case_sensitive, worldwide).setup()
        note_load("metaclip-matcher")
    return _MATCHERS[key]


def entry_counts(
    matched: pa.ListArray | pa.ChunkedArray, num_entries: int, mask: np.ndarray | None = None
) -> np.ndarray:
    """How many samples match each entry (a sample counts once per entry), over rows in ``mask``.

    Counts of shards add up to the pool's counts, so each shard (or Spark partition) computes its
    own and one sum gives the global figure (MetaCLIP uses ``numpy.unique`` over the pool likewise).
    """
    if isinstance(matched, pa.ChunkedArray):
        matched = matched.combine_chunks() if matched.num_chunks else pa.array([], matched.type)
    if mask is not None:
        matched = matched.filter(pa.array(mask))
    flat = matched.flatten().to_numpy(zero_copy_only=False)
    return np.bincount(flat, minlength=num_entries).astype(np.int64)
