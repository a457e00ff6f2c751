"""Build MetaCLIP-style metadata entries offline: ``metadata/entries.json`` + ``metadata/PROVENANCE.md``.

MetaCLIP ("Demystifying CLIP Data", Sec. 3.1) builds ~500k entries from four sources: WordNet
synsets, Wikipedia unigrams (count >= 100), Wikipedia bigrams (PMI >= 30) and Wikipedia titles
(view threshold). Their ``build_metadata.py`` starts from the strings "0".."99", adds each source's
entries and skips empty strings and single punctuation characters. The official ``metadata.json``
cannot be downloaded here, so this script rebuilds what installable packages allow:

- **WordNet synsets**, exactly as MetaCLIP names them: NLTK's synset name is
  ``<first lemma, lowercased>.<pos>.<nn>``; MetaCLIP cuts it at its first ``.`` and turns ``_`` into
  spaces (so a lemma with a dot, like ``st._louis``, becomes ``st``: reproduced on purpose). We read
  Debian's WordNet 3.0 files (``apt-get install wordnet-base``) directly, because NLTK 3.10's reader
  refuses folders outside its data paths and wants a ``lexnames`` file Debian does not ship. The
  first lemma of a synset is the first word of its line in ``data.<pos>``; adjective markers such
  as ``(a)``/``(p)`` are dropped, as NLTK drops them.
- **Frequent English unigrams** from ``wordfreq``'s ``large`` English list, standing in for
  Wikipedia unigram counts: a count of 100 in English Wikipedia (about 3.5 billion words) is a
  frequency of about 29 per billion, Zipf 1.46; we keep Zipf >= 1.5. wordfreq replaces every digit
  of a multi-digit number by ``0`` ("0,000km"), so its tokens with digits are not real words and
  are skipped; the numbers 0..99 come in as in MetaCLIP.
- **Bigrams and titles**: no offline source with counts was found; left out and said so in
  PROVENANCE.md. A user with the official ``metadata.json`` passes it as ``metaclip.metadata``.

The output is a JSON list of strings, MetaCLIP's own format, sorted so entry ids (list positions)
are stable across rebuilds.

``--worldwide`` builds MetaCLIP 2's per-language lists instead ("MetaCLIP 2: A Worldwide Scaling
Recipe"; its ``metaclip/metadata/build_metadata.py``), one ``{lang}.json`` per language in
``metadata/worldwide/`` (:func:`worldwide_lists`): English is the list above (copied as ``en.json``);
every other language ``wordfreq`` ships a list for (41) gets the numbers 0-99 (MetaCLIP 2: "every
lang has numbers"), then its words in frequency order, skipping empty ones, ones longer than 256
characters and ones of punctuation only (MetaCLIP 2's rules), and tokens with digits (wordfreq's
digit folding, as above), up to MetaCLIP 2's cap of 251,465 unigrams. MetaCLIP 2 keeps the top 10%
of a language's distinct Wikipedia unigrams under that cap; wordfreq's lists are already cut at a
frequency floor (Zipf 1 for its ``large`` lists, Zipf 3 for its ``small`` ones) and do not give the
vocabulary's size, so each list is taken whole up to the cap. No multilingual WordNet, Wikipedia
bigram or title source is installable offline: those parts are left out (PROVENANCE.md, README's
departures). Files are named by MetaCLIP's (Wikipedia's) codes: wordfreq's ``nb`` is ``no``, ``fil``
is ``tl``.

    .venv/bin/python metadata/build.py [--wordnet-dir /usr/share/wordnet] [--min-zipf 1.5]
    .venv/bin/python metadata/build.py --worldwide [--out metadata/worldwide]
"""

from __future__ import annotations

import argparse
import json
import re
import string
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
POS_FILES = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}
_MARKER = re.compile(r"\([a-z]+\)$")  # adjective syntactic markers: (a), (p), (ip)


def wordnet_entries(wordnet_dir: Path) -> list[str]:
    """One entry per WordNet synset, named the way MetaCLIP names it (see module docstring)."""
    entries = []
    for suffix in POS_FILES:
        path = wordnet_dir / f"data.{suffix}"
        if not path.exists():
            raise SystemExit(f"{path}: not found; install WordNet 3.0 (apt-get install wordnet-base)")
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.startswith("  "):  # licence header
                    continue
                first_lemma = _MARKER.sub("", line.split(" ", 5)[4])
                name = first_lemma.lower()  # NLTK: synset name = first lemma, lowercased, + .pos.nn
                entries.append(name[: name.find(".")] if "." in name else name)
    return [e.replace("_", " ") for e in entries]


def unigram_entries(min_zipf: float) -> list[str]:
    from wordfreq import iter_wordlist, zipf_frequency

    return [
        w
        for w in iter_wordlist("en", wordlist="large")
        if not any(c.isdigit() for c in w) and zipf_frequency(w, "en", wordlist="large") >= min_zipf
    ]


def build(wordnet_dir: Path, min_zipf: float) -> tuple[list[str], dict[str, int]]:
    forbidden = set(string.punctuation)
    entries = {str(i) for i in range(100)}
    added: Counter[str] = Counter({"numbers 0-99": len(entries)})
    sources = {
        "wordnet synsets": wordnet_entries(wordnet_dir),
        f"wordfreq unigrams (zipf >= {min_zipf}, no digits)": unigram_entries(min_zipf),
    }
    for source, items in sources.items():
        before = len(entries)
        entries.update(e for e in items if e and e not in forbidden)
        added[source] = len(entries) - before
    return sorted(entries), dict(added)


WORLDWIDE_CAP = 251_465  # build_metadata.py: upper_bound_unigram
MAX_ENTRY_CHARS = 256  # build_metadata.py: max_len
WORDFREQ_TO_WIKI = {"nb": "no", "fil": "tl"}  # wordfreq's code -> MetaCLIP's (Wikipedia's)
def _pure_punctuation(word: str) -> bool:
    """MetaCLIP 2's ``is_pure_punctuations``: ASCII punctuation and its additional (CJK) marks."""
    from pipeline.metaclip.matching import PUNCTUATION

    return all(c in PUNCTUATION for c in word)


def language_list(lang: str, cap: int = WORLDWIDE_CAP) -> tuple[list[str], str]:
    """One language's MetaCLIP 2-style list from wordfreq (module docstring), and the wordfreq list used."""
    from wordfreq import available_languages, iter_wordlist

    entries = {str(i): None for i in range(100)}  # insertion-ordered: numbers first, then by frequency
    words = 0
    for word in iter_wordlist(lang, wordlist="best"):
        word = word.strip()
        if not word or len(word) > MAX_ENTRY_CHARS or _pure_punctuation(word) or any(c.isdigit() for c in word):
            continue
        if word not in entries:
            entries[word] = None
            words += 1
            if words >= cap:
                break
    source = Path(available_languages(wordlist="best")[lang]).name
    return list(entries), source


def worldwide_lists(out: Path, english: Path) -> list[dict]:
    """Write ``{lang}.json`` for English (a copy of ``english``) and every language wordfreq has; the rows of
    PROVENANCE.md."""
    import shutil

    from wordfreq import available_languages

    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(english, out / "en.json")
    rows = [{"lang": "en", "entries": len(json.loads(english.read_text(encoding="utf-8"))),
             "source": f"`{english.name}` (MetaCLIP 1's list, above)"}]  # fmt: skip
    for code in sorted(available_languages(wordlist="best")):
        if code == "en":
            continue
        entries, source = language_list(code)
        lang = WORDFREQ_TO_WIKI.get(code, code)
        tmp = out / f".{lang}.json.tmp"
        tmp.write_text(json.dumps(entries, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(out / f"{lang}.json")
        rows.append({"lang": lang, "entries": len(entries), "source": f"wordfreq `{source}` ({code})"})
    return rows[:1] + sorted(rows[1:], key=lambda r: r["lang"])


def write_worldwide_provenance(out: Path, rows: list[dict]) -> None:
    from importlib.metadata import version

    lines = [
        "# metadata/worldwide/: provenance",
        "",
        "Built by `metadata/build.py --worldwide` (see its docstring for the method): one `{lang}.json`",
        "per language, MetaCLIP 2's format (a JSON list of strings; an entry's id is its position).",
        "The JSON files are generated (`make metadata`), not committed; this file is.",
        "",
        f"Each non-English list: the numbers 0-99, then wordfreq {version('wordfreq')}'s words in frequency order",
        f"(skipping empty, longer than {MAX_ENTRY_CHARS} characters, punctuation only, or with a digit), up to",
        f"MetaCLIP 2's cap of {WORLDWIDE_CAP:,} unigrams. wordfreq data: CC BY-SA 4.0.",
        "",
        "| language | entries | source |",
        "|---|---:|---|",
        *[f"| {r['lang']} | {r['entries']} | {r['source']} |" for r in rows],
        "",
        "Not included, for want of an offline source: a multilingual WordNet (MetaCLIP 2 adds the Open",
        "Multilingual Wordnet's synsets for 30 languages), Wikipedia bigrams (PMI > 30) and Wikipedia",
        "titles, and every language wordfreq has no list for (their captions fold to `other`).",
    ]
    (out / "PROVENANCE.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wordnet-dir", type=Path, default=Path("/usr/share/wordnet"))
    parser.add_argument("--min-zipf", type=float, default=1.5)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worldwide", action="store_true", help="MetaCLIP 2's per-language lists (docstring)")
    args = parser.parse_args()
    from importlib.metadata import version

    if args.worldwide:
        out = args.out or HERE / "worldwide"
        rows = worldwide_lists(out, HERE / "entries.json")
        write_worldwide_provenance(out, rows)
        print(f"{out}: {len(rows)} languages, {sum(r['entries'] for r in rows)} entries")
        return
    args.out = args.out or HERE / "entries.json"

    entries, added = build(args.wordnet_dir, args.min_zipf)
    args.out.write_text(json.dumps(entries, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    lines = [
        "# metadata/entries.json: provenance",
        "",
        f"Built by `metadata/build.py` (see its docstring for the method). {len(entries)} entries, sorted;",
        "an entry's id is its position in the list. Same format as MetaCLIP's `metadata.json`.",
        "",
        "| source | new entries |",
        "|---|---|",
        *[f"| {source} | {n} |" for source, n in added.items()],
        "",
        "Sources: WordNet 3.0 from Debian's `wordnet-base` (Princeton WordNet licence);",
        f"`wordfreq` {version('wordfreq')} `large` English list (CC BY-SA 4.0 data).",
        "Not included, for want of an offline source: MetaCLIP's Wikipedia bigrams (PMI >= 30) and",
        "Wikipedia titles. Expect fewer matches per caption than with the official 500k entries.",
    ]
    (HERE / "PROVENANCE.md").write_text("\n".join(lines) + "\n")
    print(f"{args.out}: {len(entries)} entries; {added}")


if __name__ == "__main__":
    main()
