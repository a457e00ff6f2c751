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

    .venv/bin/python metadata/build.py [--wordnet-dir /usr/share/wordnet] [--min-zipf 1.5]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wordnet-dir", type=Path, default=Path("/usr/share/wordnet"))
    parser.add_argument("--min-zipf", type=float, default=1.5)
    parser.add_argument("--out", type=Path, default=HERE / "entries.json")
    args = parser.parse_args()
    from importlib.metadata import version

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
