"""MetaCLIP 2's worldwide curation (``metaclip.worldwide``) on multilingual pools made here.

The captions are built from several languages' frequent words (wordfreq's, installed), Chinese and
Japanese written without spaces, plus English; the metadata lists are written here too. Every
expected answer is computed in this file from MetaCLIP 2's published rules, written out literally:
its entry padding (``get_spaced_metadata``), its ``t_to_p``/``p_to_t`` and its entry probability.
"""

from __future__ import annotations

import json
import math
import string

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import parse_config
from pipeline.download import prepare
from pipeline.engines.local import LocalEngine
from pipeline.metaclip.stage import run_metaclip
from pipeline.metaclip.worldwide import p_to_t, t_to_p
from pipeline.query import connect
from pipeline.store.parquet import Pool
from tests.conftest import REPO

SPACED = ("en", "fr", "de", "es")
UNSPACED = ("zh", "ja")


def _words(lang: str, lo: int, hi: int) -> list[str]:
    from wordfreq import top_n_list

    words = [w for w in top_n_list(lang, 3000) if not any(c.isdigit() or c in string.punctuation for c in w)]
    return words[lo:hi]


# -- MetaCLIP 2's rules, written out (metaclip/curation/substr_matching.py) ---------------------------

def _no_space(char: str) -> bool:
    c = ord(char)
    cjk = (0x4E00 <= c <= 0x9FFF or 0x3400 <= c <= 0x4DBF or 0x20000 <= c <= 0x2A6DF or 0x2A700 <= c <= 0x2B73F
           or 0x2B740 <= c <= 0x2B81F or 0x2B820 <= c <= 0x2CEAF or 0x2CEB0 <= c <= 0x2EBEF or 0xF900 <= c <= 0xFAFF
           or 0x2E80 <= c <= 0x2EFF or 0x2F00 <= c <= 0x2FDF or 0x2FF0 <= c <= 0x2FFF)  # fmt: skip
    other = (0x0E00 <= c <= 0x0E7F or 0x0E80 <= c <= 0x0EFF or 0x1000 <= c <= 0x109F or 0x1780 <= c <= 0x17FF
             or 0x0F00 <= c <= 0x0FFF)  # fmt: skip
    return cjk or other or char in string.punctuation or char in "，。、；：？¿！“”‘’（）【】《》〈〉「」『』～—"


def _padded(entry: str) -> str:
    if not _no_space(entry[0]):
        entry = " " + entry
    if not _no_space(entry[-1]):
        entry = entry + " "
    return entry


def _spacing(text: str) -> str:
    text = f" {text} "
    for p in [",", ".", ";", ":", "?", "!", "`"]:
        text = text.replace(p, f" {p} ")
    for c in ["\t", "\n", "\r"]:
        text = text.replace(c, " ")
    return text


def _fold(lid: str | None, listed: set[str]) -> str:
    code = {"yue": "zh"}.get(lid or "", lid or "")
    return code if code in listed else "other"


# -- pools --------------------------------------------------------------------------------------------

def _lists(folder, langs) -> dict[str, list[str]]:
    folder.mkdir(parents=True, exist_ok=True)
    lists = {}
    for lang in langs:
        entries = [str(i) for i in range(100)] + _words(lang, 0, 400)
        if lang == "en":
            entries.append("(film)")  # starts and ends with punctuation: MetaCLIP 2 pads neither side
        if lang in UNSPACED:  # two-word entries written together, as a no-space language's bigrams are
            entries += [a + b for a, b in zip(_words(lang, 0, 20), _words(lang, 20, 40), strict=True)]
        lists[lang] = entries
        (folder / f"{lang}.json").write_text(json.dumps(entries, ensure_ascii=False))
    return lists


def _captions(n_per_lang: int, langs, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    captions = []
    for lang in langs:
        words = _words(lang, 0, 600)
        for _ in range(n_per_lang):
            picked = [words[int(i)] for i in rng.zipf(1.3, size=int(rng.integers(5, 10))) % len(words)]
            captions.append(("" if lang in UNSPACED else " ").join(picked))
    captions.append("watching a good old(film)tonight with friends")
    return captions


def _pool(root, captions, metadata_dir, engine, **metaclip):
    root.mkdir(parents=True, exist_ok=True)
    urls = pa.table({"url": [f"http://example.com/{i}.jpg" for i in range(len(captions))], "caption": captions})
    pq.write_table(urls, root / "urls.parquet")
    cfg = parse_config({
        "pool": str(root / "pool"), "download": {"input": str(root / "urls.parquet"), "samples_per_shard": 250},
        "metaclip": {"metadata": str(REPO / "metadata/entries.json"), "t": 6, "only_downloaded": False,
                     "worldwide": True, "metadata_dir": str(metadata_dir), **metaclip}}, "test")  # fmt: skip
    pool = Pool(cfg.pool)
    prepare(pool, cfg.download, engine)
    return pool, run_metaclip(pool, cfg.metaclip, engine, progress=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("worldwide")
    lists = _lists(root / "metadata", SPACED + UNSPACED)
    engine = LocalEngine(2)
    pool, summary = _pool(root / "a", _captions(150, SPACED + UNSPACED), root / "metadata", engine)
    return pool, summary, lists, root, engine


def _rows(pool):
    con = connect(pool)
    try:
        return con.execute("select uid, caption, lang, matched_entry_ids, metaclip_keep, metaclip_p "
                           "from samples order by uid").fetchall()  # fmt: skip
    finally:
        con.close()


def test_matching_equals_a_literal_loop_over_the_captions_language_list(world):
    pool, _, lists, _, _ = world
    rows = _rows(pool)
    listed = set(lists)
    by_lang: dict[str, int] = {}
    unspaced_inside = 0
    for _uid, caption, lid, matched, _keep, _p in rows:
        lang = _fold(lid, listed)
        by_lang[lang] = by_lang.get(lang, 0) + 1
        entries = lists.get(lang, [])
        spaced = _spacing(caption)
        expected = sorted(i for i, e in enumerate(entries) if _padded(e) in spaced)
        assert sorted(matched) == expected, (caption, lang)
        if lang in UNSPACED:
            unspaced_inside += any(len(entries[i]) > 1 and f" {entries[i]} " not in spaced for i in matched)
    # fastText names most of these captions' languages; Chinese and Japanese entries match inside unspaced text
    assert all(by_lang.get(lang, 0) >= 100 for lang in SPACED + UNSPACED), by_lang
    assert unspaced_inside > 50
    film = next(r for r in rows if r[1] == "watching a good old(film)tonight with friends")
    assert lists["en"].index("(film)") in film[3]


def test_t_to_p_and_p_to_t_are_metaclip_2s():
    counts = np.array([5, 1, 1, 3, 0, 10])
    assert t_to_p(counts, 3) == pytest.approx(2 / 20)  # tail: the entries below 3 hold 1 + 1 + 0 of 20
    assert t_to_p(counts, 1) == 0.0
    assert t_to_p(counts, 11) == 1.0
    # sorted 0 1 1 3 5 10, cumulative share 0 .05 .1 .25 .5 1: the nearest to p gives t
    assert p_to_t(counts, 0.1) == 1
    assert p_to_t(counts, 0.3) == 3
    assert p_to_t(counts, 0.45) == 5
    assert p_to_t(counts, 0.9) == 10
    # a tie (.25 and .5 are both .125 from .375): the first, as numpy's argmin takes
    assert p_to_t(np.array([0, 1, 1, 2, 4]), 0.375) == 1
    # one entry: every p gives its count; no match at all gives 0
    assert p_to_t(np.array([7]), 0.3) == 7
    assert t_to_p(np.array([7]), 7) == 0.0 and t_to_p(np.array([7]), 8) == 1.0
    assert p_to_t(np.array([0, 0]), 0.5) == 0


def test_every_language_is_balanced_with_its_own_t(world):
    pool, summary, lists, _, _ = world
    ww = summary["worldwide"]
    entries = pq.read_table(pool.aggregates_dir / "metaclip_lang_entries.parquet").to_pylist()
    counts = {lang: np.zeros(len(lists[lang]), np.int64) for lang in lists}
    for row in entries:
        counts[row["lang"]][row["entry_id"]] = row["count"]
    # the counts are the table's own: counted samples matching each entry, per language
    rows = _rows(pool)
    listed = set(lists)
    direct = {lang: np.zeros(len(lists[lang]), np.int64) for lang in lists}
    for _uid, _c, lid, matched, _k, _p in rows:
        lang = _fold(lid, listed)
        if lang in direct:
            np.add.at(direct[lang], matched, 1)
    for lang in lists:
        assert (direct[lang] == counts[lang]).all(), lang
    # English keeps t; p is English's tail share; every other language's t is p_to_t of its counts
    en = counts["en"]
    p = en[en < 6].sum() / en.sum()
    assert ww["t_en"] == 6 and ww["tail_share_p"] == pytest.approx(p)
    ts = {row["lang"]: row["t"] for row in ww["languages"]}
    for lang, c in counts.items():
        s = np.sort(c)
        want = 6 if lang == "en" else s[np.abs(np.cumsum(s) / s.sum() - p).argmin()]
        assert ts[lang] == want, lang
    # each sample's keep probability is 1 - prod(1 - min(1, t_lang / count)), and the kept samples of
    # every language are within the binomial bound of its expected number
    expected, variance, kept = {}, {}, {}
    for _uid, _c, lid, matched, keep, prob in rows:
        lang = _fold(lid, listed)
        if lang not in counts:
            assert not keep and prob == 0
            continue
        q = 1.0 - math.prod(1.0 - min(1.0, ts[lang] / counts[lang][e]) for e in matched)
        assert prob == pytest.approx(q, abs=1e-12)
        expected[lang] = expected.get(lang, 0) + q
        variance[lang] = variance.get(lang, 0) + q * (1 - q)
        kept[lang] = kept.get(lang, 0) + bool(keep)
    for lang in lists:
        assert abs(kept[lang] - expected[lang]) <= 4 * math.sqrt(variance[lang]) + 1, (lang, kept, expected)
        assert kept[lang] < sum(1 for r in rows if _fold(r[2], listed) == lang)  # heads were cut
    table = {row["lang"]: row for row in ww["languages"]}
    assert all(table[lang]["kept"] == kept[lang] for lang in lists)


def test_adding_a_language_leaves_the_others_draws_unchanged(world, tmp_path):
    pool, _, lists, root, engine = world
    fewer = tmp_path / "metadata"
    fewer.mkdir()
    for lang in lists:
        if lang != "es":
            (fewer / f"{lang}.json").write_text((root / "metadata" / f"{lang}.json").read_text())
    without, summary = _pool(tmp_path / "b", _captions(150, SPACED + UNSPACED), fewer, engine)
    assert "es" not in {row["lang"] for row in summary["worldwide"]["languages"]}
    with_es = {r[0]: r for r in _rows(pool)}
    rows = _rows(without)
    others = [r for r in rows if _fold(r[2], set(lists)) != "es"]
    assert len(others) > 700
    assert all(r[4] == with_es[r[0]][4] and r[5] == with_es[r[0]][5] for r in others)
    # Spanish captions fold to `other`: with no other.json they match nothing and are never kept
    spanish = [r for r in rows if _fold(r[2], set(lists)) == "es"]
    assert spanish and all(not r[3] and not r[4] for r in spanish)
    assert sum(with_es[r[0]][4] for r in spanish) > 0


def test_unlisted_languages_can_match_as_english(world, tmp_path):
    _, _, lists, root, engine = world
    only_en = tmp_path / "metadata"
    only_en.mkdir()
    (only_en / "en.json").write_text((root / "metadata" / "en.json").read_text())
    pool, summary = _pool(tmp_path / "c", _captions(40, ("en", "fr")), only_en, engine, unlisted_languages="english")
    langs = {row["lang"]: row for row in summary["worldwide"]["languages"]}
    assert set(langs) == {"en"} and langs["en"]["samples"] == 81  # French captions counted as English
    rows = _rows(pool)
    french = [r for r in rows if r[2] == "fr"]
    spaced = [_spacing(r[1]) for r in french]
    assert french and all(sorted(r[3]) == sorted(i for i, e in enumerate(lists["en"]) if _padded(e) in s)
                          for r, s in zip(french, spaced, strict=True))  # fmt: skip


def test_stats_and_the_report_show_each_languages_t_and_kept_samples(world, tmp_path):
    import shutil

    from pipeline.query import format_stats, stats
    from pipeline.report import write_report

    pool, summary, _, _, _ = world
    table = {row["lang"]: row for row in pq.read_table(pool.aggregates_dir / "metaclip_languages.parquet").to_pylist()}
    assert table == {row["lang"]: row for row in summary["worldwide"]["languages"]}
    text = format_stats(stats(pool))
    for lang in ("en", "zh", "other"):
        row = table[lang]
        assert any(line.split()[:3] == [lang, str(row["samples"]), str(row["matches"])] for line in text.splitlines())
    copy = Pool(shutil.copytree(pool.root, tmp_path / "pool"))
    page = write_report(copy).read_text()
    assert "MetaCLIP 2 worldwide balancing, per language" in page
    assert f"<tr><td>zh</td><td>{table['zh']['entries']:,}</td><td>{table['zh']['samples']:,}</td>" in page
