"""Build ``metadata/wordnet_first_synsets.json.gz`` for DataComp's text-based filter, offline.

For every lemma of WordNet 3.0 and each part of speech (noun, verb, adjective, adverb) the table
keeps the offset of the lemma's first sense (the first offset of its line in ``index.<pos>``, which
is what NLTK's ``synsets(word)`` lists first), and the morphological exception lists
(``<pos>.exc``). :mod:`pipeline.filters.wordnet` runs NLTK's ``morphy`` over it.

Source: Debian's WordNet 3.0 (``apt-get install wordnet-base``), read directly.

``--check-nltk`` compares :meth:`pipeline.filters.wordnet.WordNet.first_synset` with
``nltk.corpus.wordnet.synsets(word)[0].offset()`` for every lemma, every exception form, the words of
the bundled LAION captions and inflections made from the lemmas. NLTK 3.10 only reads WordNet from
its data paths and wants a ``lexnames`` file Debian lacks, so the check copies Debian's files into a
temporary ``nltk_data`` folder with that (fixed, 45-line) file added.

    .venv/bin/python metadata/build_wordnet.py [--wordnet-dir /usr/share/wordnet] [--check-nltk]
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
LEXNAMES = [
    "adj.all",
    "adj.pert",
    "adv.all",
    "noun.Tops",
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.attribute",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.event",
    "noun.feeling",
    "noun.food",
    "noun.group",
    "noun.location",
    "noun.motive",
    "noun.object",
    "noun.person",
    "noun.phenomenon",
    "noun.plant",
    "noun.possession",
    "noun.process",
    "noun.quantity",
    "noun.relation",
    "noun.shape",
    "noun.state",
    "noun.substance",
    "noun.time",
    "verb.body",
    "verb.change",
    "verb.cognition",
    "verb.communication",
    "verb.competition",
    "verb.consumption",
    "verb.contact",
    "verb.creation",
    "verb.emotion",
    "verb.motion",
    "verb.perception",
    "verb.possession",
    "verb.social",
    "verb.stative",
    "verb.weather",
    "adj.ppl",
]


def read_index(path: Path) -> dict[str, int]:
    """lemma -> offset of its first sense, from a WordNet ``index.<pos>`` file."""
    first = {}
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.startswith("  "):  # licence header
                continue
            t = line.split()
            n_synsets, n_pointers = int(t[2]), int(t[3])
            offsets = t[4 + n_pointers + 2 :]
            assert len(offsets) == n_synsets, line
            first[t[0]] = int(offsets[0])
    return first


def read_exceptions(path: Path) -> dict[str, list[str]]:
    out = {}
    with path.open(encoding="utf-8") as f:
        for line in f:
            t = line.split()
            out[t[0]] = t[1:]
    return out


def build(wordnet_dir: Path, out: Path) -> dict:
    for name in ("index.noun", "noun.exc"):
        if not (wordnet_dir / name).exists():
            raise SystemExit(f"{wordnet_dir / name}: not found; install WordNet 3.0 (apt-get install wordnet-base)")
    data = {
        "source": "WordNet 3.0, Debian wordnet-base (Princeton WordNet licence)",
        "first_offset": {p: read_index(wordnet_dir / f"index.{n}") for p, n in POS_FILES.items()},
        "exceptions": {p: read_exceptions(wordnet_dir / f"{n}.exc") for p, n in POS_FILES.items()},
    }
    with gzip.GzipFile(out, "wb", mtime=0) as f:  # mtime=0: byte-identical rebuilds
        f.write(json.dumps(data, sort_keys=True, separators=(",", ":")).encode())
    return data


def check_nltk(wordnet_dir: Path, data: dict) -> None:
    import nltk
    import pyarrow.parquet as pq

    from pipeline.filters.wordnet import WordNet

    tmp = Path(tempfile.mkdtemp()) / "corpora" / "wordnet"
    tmp.mkdir(parents=True)
    for f in wordnet_dir.iterdir():
        if f.is_file():
            shutil.copyfile(f, tmp / f.name)  # NLTK refuses symlinks that leave its root
    (tmp / "lexnames").write_text("".join(f"{i:02d}\t{n}\t{1}\n" for i, n in enumerate(LEXNAMES)))
    nltk.data.path.insert(0, str(tmp.parent.parent))
    from nltk.corpus import wordnet as nltk_wn

    ours = WordNet(OUT)
    words = set()
    for pos in data["first_offset"]:
        lemmas = list(data["first_offset"][pos])
        words.update(lemmas)
        words.update(data["exceptions"][pos])
        words.update(w + s for w in lemmas[::7] for s in ("s", "es", "ed", "ing", "er", "est", "ies", "men"))
    captions = pq.read_table(HERE.parent / "data" / "laion_10k.parquet", columns=["TEXT"])["TEXT"].to_pylist()
    words.update(w for c in captions if c for w in c.split())
    bad = []
    for w in sorted(words):
        syn = nltk_wn.synsets(w)
        want = syn[0].offset() if syn else None
        if ours.first_synset(w) != want:
            bad.append((w, want, ours.first_synset(w)))
    print(f"checked {len(words)} words against NLTK {nltk.__version__}: {len(bad)} differ")
    for b in bad[:20]:
        print("  ", b)
    if bad:
        raise SystemExit(1)


OUT = HERE / "wordnet_first_synsets.json.gz"

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wordnet-dir", type=Path, default=Path("/usr/share/wordnet"))
    ap.add_argument("--check-nltk", action="store_true")
    args = ap.parse_args()
    data = build(args.wordnet_dir, OUT)
    print(f"{OUT}: {sum(len(v) for v in data['first_offset'].values())} (lemma, pos) first senses, "
          f"{sum(len(v) for v in data['exceptions'].values())} exceptions, {OUT.stat().st_size} bytes")  # fmt: skip
    if args.check_nltk:
        check_nltk(args.wordnet_dir, data)
