"""DataComp's text-based filter: does some word of the caption have, as its most likely WordNet
synset, an ImageNet-21k synset?

DataComp (``baselines/apply_filter.py``, ``does_contain_text_entity``) splits the caption on
whitespace and, for each word, takes ``nltk.corpus.wordnet.synsets(word)[0].offset()`` and checks it
against the ImageNet-21k WordNet ids (``n########`` read as integers, so the part-of-speech is not
compared). NLTK's ``synsets`` lower-cases the word, then for each part of speech in the order
noun, verb, adjective, adverb lemmatises it with ``morphy`` and lists the synsets of each base form
in WordNet's sense order; the first of that list is the "most likely" synset.

We reproduce that without NLTK's data download: ``metadata/wordnet_first_synsets.json.gz`` holds,
for every lemma of WordNet 3.0 and each part of speech, the offset of its first sense, plus the
morphological exception lists, built from Debian's ``wordnet-base`` by ``metadata/build_wordnet.py``
(which also checks this module against NLTK reading the same files). ``morphy`` below is NLTK 3.10's
algorithm over that table: the word itself plus either its exception-list bases or the suffix rules
applied once (older NLTK releases kept applying the rules; 3.10 does not, and we follow it). The
ImageNet-21k ids are timm's ``imagenet21k_goog_synsets.txt`` (21,843 synsets, the same list as
DataComp's ``imagenet21k_wordnet_ids.txt`` from Google's BiT release).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable
from functools import cache
from pathlib import Path

REPO_METADATA = Path(__file__).resolve().parents[2] / "metadata"
FIRST_SYNSETS = REPO_METADATA / "wordnet_first_synsets.json.gz"
POS_ORDER = ("n", "v", "a", "r")  # NLTK's POS_LIST: noun, verb, adjective, adverb

# NLTK's WordNetCorpusReader.MORPHOLOGICAL_SUBSTITUTIONS (from WordNet's own morphy(7)).
SUBSTITUTIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "n": (("s", ""), ("ses", "s"), ("ves", "f"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
          ("men", "man"), ("ies", "y")),
    "v": (("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"), ("ing", "")),
    "a": (("er", ""), ("est", ""), ("er", "e"), ("est", "e")),
    "r": (),
}  # fmt: skip


class WordNet:
    """First-sense lookup over the derived WordNet table (module docstring)."""

    def __init__(self, path: Path = FIRST_SYNSETS) -> None:
        if not path.exists():
            raise FileNotFoundError(f"{path}: WordNet table missing; rebuild it with metadata/build_wordnet.py")
        with gzip.open(path, "rt", encoding="utf-8") as f:
            data = json.load(f)
        self.source: str = data["source"]
        self.first: dict[str, dict[str, int]] = data["first_offset"]
        self.exceptions: dict[str, dict[str, list[str]]] = data["exceptions"]

    def morphy(self, form: str, pos: str) -> list[str]:
        """Base forms of ``form`` that WordNet has for ``pos``, in NLTK's order."""
        lemmas = self.first[pos]
        rules = SUBSTITUTIONS[pos]

        def known(forms: Iterable[str]) -> list[str]:
            out: list[str] = []
            for f in forms:
                if f in lemmas and f not in out:
                    out.append(f)
            return out

        def apply(forms: list[str]) -> list[str]:
            return [f[: -len(old)] + new for f in forms for old, new in rules if f.endswith(old)]

        forms = self.exceptions[pos][form] if form in self.exceptions[pos] else apply([form])
        return known([form, *forms])

    def first_synset(self, word: str) -> int | None:
        """Offset of ``synsets(word)[0]`` (any part of speech), or None if WordNet has none."""
        word = word.lower()
        for pos in POS_ORDER:
            bases = self.morphy(word, pos)
            if bases:
                return self.first[pos][bases[0]]
        return None


@cache
def wordnet() -> WordNet:
    return WordNet()


def imagenet21k_offsets() -> frozenset[int]:
    """ImageNet-21k synset offsets from timm's ``imagenet21k_goog_synsets.txt`` (``n01440764`` -> 1440764)."""
    import importlib.util

    spec = importlib.util.find_spec("timm")  # locate the file without importing timm (which imports torch)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("timm is not installed; it ships the ImageNet-21k synset list (pip install timm)")
    path = Path(spec.submodule_search_locations[0]) / "data" / "_info" / "imagenet21k_goog_synsets.txt"
    ids = path.read_text().split()
    return frozenset(int(i[1:]) for i in ids)


class EntityMatcher:
    """``contains(caption)``: DataComp's ``does_contain_text_entity`` against an entity set."""

    def __init__(self, entities: frozenset[int] | None = None, table: WordNet | None = None) -> None:
        self.entities = imagenet21k_offsets() if entities is None else entities
        self.wn = table or wordnet()
        self._cache: dict[str, bool] = {}

    def word_hit(self, word: str) -> bool:
        hit = self._cache.get(word)
        if hit is None:
            offset = self.wn.first_synset(word)
            hit = offset is not None and offset in self.entities
            if len(self._cache) < 1_000_000:
                self._cache[word] = hit
        return hit

    def contains(self, caption: str | None) -> bool:
        return any(self.word_hit(w) for w in (caption or "").split())
