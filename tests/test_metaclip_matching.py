from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import UserError
from pipeline.metaclip.matching import SubstringMatcher, entry_counts, load_entries, spacing
from tests.conftest import LAION, REPO
from tests.metaclip_reference import reference_matches_all, reference_spacing, reference_substr_matching

ENTRIES = REPO / "metadata" / "entries.json"


@pytest.fixture
def small(tmp_path: Path) -> SubstringMatcher:
    entries = ["dog", "hot dog", "new york", "york", "st. louis", "cat", "Paris", "t-shirt", "a"]
    path = tmp_path / "m.json"
    path.write_text(json.dumps(entries))
    return SubstringMatcher(path).setup()


def _names(m: SubstringMatcher, caption: str) -> list[str]:
    return sorted(m.entries[i] for i in m.match(caption))


def test_spacing_wraps_punctuation_and_spaces_whitespace():
    assert spacing("a,b.c;d:e?f!g`h") == " a , b . c ; d : e ? f ! g ` h "
    assert spacing("tab\there\nnew\rline") == " tab here new line "


def test_whole_entries_only_overlaps_included(small):
    assert _names(small, "Hot dog stand in New york") == ["dog", "york"]  # case-sensitive: "Hot", "New"
    assert _names(small, "a new york t-shirt, with a cat.") == ["a", "cat", "new york", "t-shirt", "york"]
    assert _names(small, "dogs and hotdog cats") == []  # no partial words
    assert _names(small, "Paris,London") == ["Paris"]  # punctuation separates words


def test_case_and_punctuated_entries_follow_the_reference(small):
    assert _names(small, "St. Louis") == []  # the caption's "." is spaced, the entry's is not
    assert _names(small, "PARIS dog") == ["dog"]
    lower = SubstringMatcher(small.metadata, case_sensitive=False).setup()
    assert _names(lower, "PARIS Dog") == ["dog"]  # lowercasing the caption cannot reach "Paris"


def test_null_caption_matches_nothing(small):
    assert small(pa.array(["a cat", None], pa.string())).to_pylist() == [[5, 8], []]


def test_entry_counts_count_each_sample_once_per_entry():
    matched = pa.array([[0, 2], [2], [], [1, 2]], pa.list_(pa.int32()))
    assert entry_counts(matched, 4).tolist() == [1, 1, 3, 0]
    assert entry_counts(matched, 4, mask=[True, False, True, True]).tolist() == [1, 1, 2, 0]


def test_bad_entries_file_is_named(tmp_path: Path):
    (tmp_path / "bad.json").write_text('{"not": "a list"}')
    with pytest.raises(UserError, match=r"bad\.json: expected a JSON list of strings"):
        load_entries(tmp_path / "bad.json")
    with pytest.raises(UserError, match="metadata file not found"):
        load_entries(tmp_path / "missing.json")


def test_fast_reference_equals_literal_reference_on_a_sample():
    entries = load_entries(ENTRIES)
    rng = random.Random(0)
    some = [*rng.sample(entries, 3000), "of", "the", "dog", "photo"]
    captions = pq.read_table(LAION, columns=["TEXT"])["TEXT"].to_pylist()[:40]
    assert reference_matches_all(captions, some) == [reference_substr_matching(c, some) for c in captions]
    assert all(reference_spacing(c) == spacing(c) for c in captions)


@pytest.mark.slow
def test_parity_with_metaclip_reference_on_every_demo_caption():
    entries = load_entries(ENTRIES)
    captions = pq.read_table(LAION, columns=["TEXT"])["TEXT"].to_pylist()
    ours = SubstringMatcher(ENTRIES).setup()(pa.array(captions)).to_pylist()
    reference = reference_matches_all(captions, entries)
    mismatches = [i for i, (a, b) in enumerate(zip(ours, reference, strict=True)) if a != b]
    assert not mismatches, f"{len(mismatches)} captions differ, first: {captions[mismatches[0]]!r}"
    assert sum(map(len, ours)) > 20_000  # the test compares real matches, not empty lists


def test_a_repeated_entry_matches_every_id(tmp_path):
    """MetaCLIP's loop tests every entry in turn, so an entry string listed twice yields both ids."""
    from pipeline.metaclip.matching import SubstringMatcher

    path = tmp_path / "entries.json"
    entries = ["dog", "cat", "dog", "red car", "cat"]
    path.write_text(json.dumps(entries))
    matcher = SubstringMatcher(path)
    captions = ["a dog and a red car", "a cat", "a dog, a cat", "no match"]
    expected = [reference_substr_matching(c, entries) for c in captions]
    assert [matcher.match(c) for c in captions] == expected
    assert matcher(pa.array(captions)).to_pylist() == expected  # the batch path too
    assert matcher.match("a dog and a red car") == [0, 2, 3]
