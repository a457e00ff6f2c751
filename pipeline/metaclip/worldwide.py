"""MetaCLIP 2's worldwide curation ("MetaCLIP 2: A Worldwide Scaling Recipe", 2025): one metadata
list per language, each caption matched against its own language's list only, and balancing that
keeps the same share of every language's tail.

The spec is MetaCLIP's published code, read for the algorithm (``metaclip/curation/curate.py``,
``substr_matching.py``, ``metaclip/metadata/build_metadata.py`` and ``align_lid_to_wiki.py``):

- **Metadata**: ``{lang}.json`` per language in ``metaclip.metadata_dir``, a JSON list of strings
  (``align_lid_to_wiki.py``'s output) or an object whose keys are the entries
  (``build_metadata.py``'s ``{entry: source}``); an entry's id is its position, per language.
- **Language**: the caption's fastText lid.176 label (the filters' ``lang`` score), folded onto the
  metadata's languages by :func:`fold_language`: a variant code to its base (MetaCLIP merges
  ``zh_yue`` and ``zh_classical`` into ``zh``; lid.176's ``yue`` is ``zh_yue``), and a language
  without a list to ``other`` (MetaCLIP's ``lid_langcode_to_metadata_langcode``). ``other`` is
  matched against ``other.json`` where the metadata has one (MetaCLIP 2's merged list of the
  languages its LID does not name); without one its captions match nothing and are never kept
  (``metaclip.unlisted_languages: other``), or they are matched as English, as MetaCLIP 1 would
  (``english``).
- **Matching** (:func:`spaced_entry`): the caption is spaced as in MetaCLIP 1
  (:func:`pipeline.metaclip.matching.spacing`); an entry is padded with a space on a side unless
  that side's character is CJK, Thai, Lao, Burmese, Khmer, Tibetan or punctuation
  (``get_spaced_metadata``), so Chinese and Japanese entries match inside unspaced text.
- **Balancing** (``global_count``): English keeps its t (t_en); p = :func:`t_to_p` (the share of
  English matches that fall in tail entries); every other language gets t_lang = :func:`p_to_t`
  of its own counts, and an entry's probability is ``min(1, t_lang / count)`` (``count_to_prob``).
  A sample is kept when one of its matched entries is drawn (MetaCLIP 1's rule per language); the
  draws are keyed by (seed, uid, language, entry) (:func:`draw_keys`).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import UserError
from pipeline.metaclip.matching import is_cjk_or_similar, load_entries, spaced_entry  # noqa: F401 - MetaCLIP 2's rules

OTHER = "other"
ENGLISH = "en"
# lid.176 labels that are a variant of a metadata language (MetaCLIP merges a Wikipedia code with
# "_" into the code before it: zh_yue, zh_classical, zh_min_nan -> zh); the rest fold by rule
LID_VARIANTS = {"yue": "zh"}


def t_to_p(entry_counts: np.ndarray, t: float) -> float:
    """The share of matches in tail entries (count < t): MetaCLIP 2's ``t_to_p``."""
    counts = np.asarray(entry_counts)
    total = counts.sum()
    if total == 0:
        raise UserError("worldwide balancing: no English caption matched an English entry, so the tail share "
                        "p that sets every language's t cannot be computed")  # fmt: skip
    return float(counts[counts < t].sum() / total)


def p_to_t(entry_counts: np.ndarray, p: float) -> float:
    """The t whose tail holds about ``p`` of the matches: MetaCLIP 2's ``p_to_t`` (the sorted counts'
    cumulative share nearest ``p``; the first such entry on a tie). 0 for a language with no match."""
    counts = np.sort(np.asarray(entry_counts))
    total = counts.sum()
    if total == 0:
        return 0.0
    portion = np.cumsum(counts) / total
    return float(counts[int(np.abs(portion - p).argmin())])


def lang_probabilities(counts: np.ndarray, t: float) -> np.ndarray:
    """``count_to_prob``: ``t / max(count, t)``, i.e. ``min(1, t / count)`` (1 for an unmatched entry)."""
    counts = np.asarray(counts, np.float64)
    if t <= 0:
        return np.where(counts > 0, 0.0, 1.0)
    return t / np.maximum(counts, t)


def lang_key(lang: str) -> np.uint64:
    """The high 32 bits of a language's draw keys: 0 for English (so an English entry's draw is
    MetaCLIP 1's, keyed by its id alone), else 32 bits of the code's sha256."""
    if lang == ENGLISH:
        return np.uint64(0)
    return np.uint64(int.from_bytes(hashlib.sha256(lang.encode()).digest()[:4], "big") << 32)


def draw_keys(lang: str, entry_ids: np.ndarray) -> np.ndarray:
    """(language, entry) as one uint64 draw key: the language's :func:`lang_key` | the entry id."""
    return lang_key(lang) | np.asarray(entry_ids).astype(np.uint64)


# -- the metadata folder -----------------------------------------------------------------------------


def metadata_files(metadata_dir: str | Path, english: str | Path | None = None) -> dict[str, Path]:
    """The metadata's languages and their files: ``{lang}.json`` in ``metadata_dir``; English from
    ``english`` (``metaclip.metadata``) where the folder has no ``en.json``.

    Raises:
        UserError: the folder is missing or holds no ``{lang}.json``.
    """
    folder = Path(metadata_dir)
    if not folder.is_dir():
        raise UserError(f"{folder}: metaclip.metadata_dir not found (build it: .venv/bin/python metadata/build.py "
                        "--worldwide, or point it at MetaCLIP 2's {lang}.json files)")  # fmt: skip
    files = {p.stem: p for p in sorted(folder.glob("*.json"))}
    if ENGLISH not in files and english is not None:
        files[ENGLISH] = Path(english)
    if not files:
        raise UserError(f"{folder}: no {{lang}}.json metadata file in metaclip.metadata_dir")
    langs = set(files) | {OTHER}
    if len({lang_key(lang) for lang in langs}) < len(langs):  # 32 bits of sha256 each: never seen, but checked
        raise UserError(f"{folder}: two language codes share a draw key (lang_key); rename one file")
    return files


def load_lang_entries(path: str | Path) -> list[str]:
    """One language's entries (:func:`pipeline.metaclip.matching.load_entries` with ``worldwide``)."""
    return load_entries(path, worldwide=True)


def fold_language(lid: str | None, listed: frozenset[str], unlisted: str) -> str:
    """A caption's lid.176 label folded onto the metadata's languages (module docstring):
    ``unlisted`` is ``other`` or ``english``."""
    code = (lid or "").lower().replace("-", "_")
    code = LID_VARIANTS.get(code, code.split("_")[0])
    if code in listed:
        return code
    if unlisted == "english" and ENGLISH in listed:
        return ENGLISH
    return OTHER


def fold_column(langs: pa.Array | pa.ChunkedArray, listed: frozenset[str], unlisted: str) -> pa.Array:
    """:func:`fold_language` over a column: once per distinct label, not per row."""
    if isinstance(langs, pa.ChunkedArray):
        langs = langs.combine_chunks() if langs.num_chunks else pa.array([], pa.string())
    encoded = pc.fill_null(langs.cast(pa.string()), "").dictionary_encode()
    folded = pa.array([fold_language(v, listed, unlisted) for v in encoded.dictionary.to_pylist()], pa.string())
    return folded.take(encoded.indices)


@functools.lru_cache(maxsize=4)
def _dir_digest(files: tuple[tuple[str, str, int, int], ...]) -> str:
    from pipeline.store.parquet import file_sha256

    blob = "|".join(f"{lang}:{file_sha256(path)}" for lang, path, _, _ in files)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def metadata_digest(files: dict[str, Path]) -> str:
    """One digest of every language's file content (hashed once per process while sizes and mtimes stay)."""
    keyed = tuple((lang, str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for lang, p in sorted(files.items()))
    return _dir_digest(keyed)


def lang_table(langs: list[str], entries: list[int], counts: dict[str, np.ndarray], t: dict[str, float],
               kept: dict[str, int], samples: dict[str, int]) -> pa.Table:  # fmt: skip
    """``aggregates/metaclip_languages.parquet``: per language its entries, matches, t, tail share."""
    from pipeline.store import schema as S

    rows: dict[str, list[Any]] = {name: [] for name in S.METACLIP_LANGUAGES_SCHEMA.names}
    for lang, n in zip(langs, entries, strict=True):
        c = counts.get(lang, np.zeros(0, np.int64))
        total = int(c.sum())
        rows["lang"].append(lang)
        rows["entries"].append(n)
        rows["entries_matched"].append(int((c > 0).sum()))
        rows["matches"].append(total)
        rows["t"].append(float(t.get(lang, 0.0)))
        rows["tail_share"].append(float(c[c < t.get(lang, 0.0)].sum() / total) if total else None)
        rows["samples"].append(samples.get(lang, 0))
        rows["kept"].append(kept.get(lang, 0))
    return pa.table(rows, schema=S.METACLIP_LANGUAGES_SCHEMA)
