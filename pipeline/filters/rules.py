"""DataComp's filtering rules as decisions over stored scores, and the named recipes built from them.

Every rule reads score columns (``tables/filters``, ``tables/embed``, ``tables/image_based``,
``tables/dedup``, ``tables/quality``) and answers pass/fail per sample; a null score fails. A recipe is an ordered list
of rules; a sample is kept when it passes all of them, and its ``drop_reason`` is the name of the
first rule it fails. Every recipe starts with the implicit rule ``downloaded`` (the image was
fetched), so ``kept + dropped`` is the whole pool, and, on an embedded pool, the implicit rule
``decoded`` (drop reason ``decode_error``: the image member decoded at embed), so a sample without a
decodable image is never kept.

The rules, with DataComp's definitions ("DataComp: In search of the next generation of multimodal
datasets", Sec. 3.4 and Appendix; ``baselines/apply_filter.py``):

- ``english``: fastText ``lid.176``'s top label is ``en`` (newlines replaced by spaces).
- ``caption_words``: ``len(caption.split()) > 2`` (basic filter).
- ``caption_chars``: ``len(caption) > 5`` (basic and image-based filters).
- ``caption_tokens``: more than 1 fastText token (``fasttext.tokenize``; the image-based filter's
  caption rule).
- ``min_side``: ``min(original_width, original_height) >= 200``.
- ``aspect_ratio``: ``max(w, h) / min(w, h) <= 3.0``.
- ``clip_score``: ``clip_score >= threshold``; with a ``fraction`` instead, the threshold is
  DataComp's ``get_threshold``: the pool's scores sorted in decreasing order, the value at index
  ``int(n * fraction)``; ``score=<name>``: a further scorer's ``clip_score_<name>`` (``embed.scorers``:
  a DFN-style filtering network beside the pool's model); ``column=<name>``: a published score carried
  in at download (``download.extra_cols``), as DataComp's baseline reads ``clip_l14_similarity_score``
  from the pool's metadata: no embed table is needed, and a fraction's threshold is taken over every
  listed row's score, as DataComp's ``get_threshold`` takes it over the whole metadata.
- ``text_entity``: some whitespace-separated word's most likely WordNet synset is an ImageNet-21k
  synset (``does_contain_text_entity``; :mod:`pipeline.filters.wordnet`).
- ``image_cluster``: the sample's nearest pool centroid is nearest to some target embedding
  (:mod:`pipeline.filters.image_based`).
- ``dedup``: not dropped by exact or semantic deduplication (:mod:`pipeline.filters.dedup`).
- ``aesthetic``: LAION's aesthetic score ``> min`` (default 5.0, Stable Diffusion v1-2's
  laion-improved-aesthetics); ``nsfw``: LAION's NSFW probability ``<= max`` (default 0.5,
  clip-retrieval's safe mode, which drops ``> 0.5``). Both read ``tables/quality``
  (:mod:`pipeline.quality`), or, with ``column=NAME``, a published score carried into the download
  table (``download.extra_cols``: LAION's ``AESTHETIC_SCORE``, ``punsafe``).
- ``watermark``: LAION-5B's watermark probability ``< max`` (default 0.5: Stable Diffusion v1-2's
  laion-improved-aesthetics keeps "an estimated watermark probability < 0.5"); it reads the embed
  table's ``watermark`` (``embed.watermark``, :mod:`pipeline.quality.watermark`), or, with
  ``column=pwatermark``, LAION's published column carried in at download.

Parameters override the defaults inline: ``"clip_score(threshold=0.28)"``, ``"min_side(min=256)"``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.errors import UserError
from pipeline.store import schema as S


@dataclass(frozen=True)
class RuleDef:
    """A rule: the stage and columns it reads, its default parameters, and its test."""

    stage: str
    columns: tuple[str, ...]
    defaults: Mapping[str, Any]
    test: Callable[[Mapping[str, np.ndarray], Mapping[str, Any]], np.ndarray]
    drop_reason: str | None = None  # the ``drop_reason`` it records (default: the rule's name)
    optional: tuple[str, ...] = ()  # parameters it also takes, absent unless given (so earlier digests hold)


def _num(x: np.ndarray) -> np.ndarray:
    """Float view with nulls as NaN (every comparison with NaN is False: a null score fails)."""
    return np.asarray(x, dtype=np.float64)


def _is_null(x: np.ndarray) -> np.ndarray:
    return np.array([v is None for v in x], dtype=bool)


IMPLICIT = ("downloaded", "decoded")

RULES: dict[str, RuleDef] = {
    "downloaded": RuleDef("download", (S.STATUS,), {}, lambda c, p: c[S.STATUS] == S.STATUS_SUCCESS),
    # implicit once the pool is embedded: the image decoded (a bomb, a 0-byte file, a missing or
    # non-file image member fail at embed and never reach a release)
    "decoded": RuleDef("embed", (S.DECODE_ERROR,), {}, lambda c, p: _is_null(c[S.DECODE_ERROR]), "decode_error"),
    "english": RuleDef("filters", (S.LANG,), {"lang": "en"}, lambda c, p: c[S.LANG] == p["lang"]),
    "caption_words": RuleDef("filters", (S.CAPTION_WORDS,), {"min": 2},
                             lambda c, p: _num(c[S.CAPTION_WORDS]) > p["min"]),
    "caption_chars": RuleDef("filters", (S.CAPTION_CHARS,), {"min": 5},
                             lambda c, p: _num(c[S.CAPTION_CHARS]) > p["min"]),
    "caption_tokens": RuleDef("filters", (S.CAPTION_TOKENS,), {"min": 1},
                              lambda c, p: _num(c[S.CAPTION_TOKENS]) > p["min"]),
    "min_side": RuleDef("filters", (S.MIN_SIDE,), {"min": 200}, lambda c, p: _num(c[S.MIN_SIDE]) >= p["min"]),
    "aspect_ratio": RuleDef("filters", (S.ASPECT_RATIO,), {"max": 3.0},
                            lambda c, p: _num(c[S.ASPECT_RATIO]) <= p["max"]),
    # ``score``: a further scorer's cosine (``embed.scorers``, ``clip_score_<name>``) instead of the pool model's
    # ``column``: a published score carried in at download (DataComp's clip_l14_similarity_score), no embed table
    "clip_score": RuleDef("embed", (S.CLIP_SCORE,), {"threshold": None, "fraction": None, "score": None},
                          lambda c, p: _num(c[S.CLIP_SCORE]) >= p["threshold"], optional=("column",)),
    "text_entity": RuleDef("filters", (S.TEXT_ENTITY,), {}, lambda c, p: c[S.TEXT_ENTITY] == True),  # noqa: E712
    "image_cluster": RuleDef("image_based", (S.IMAGE_TARGET,), {}, lambda c, p: c[S.IMAGE_TARGET] == True),  # noqa: E712
    "dedup": RuleDef("dedup", (S.DEDUP_KEEP,), {}, lambda c, p: c[S.DEDUP_KEEP] == True),  # noqa: E712
    # LAION's heads (pipeline.quality): an aesthetic score above ``min`` (the improved predictor's > 5.0 of
    # Stable Diffusion v1-2's laion-improved-aesthetics); an NSFW probability of at most ``max`` (clip-retrieval's
    # safe mode drops > 0.5); ``column``: a published score carried in at download (``download.extra_cols``:
    # LAION's AESTHETIC_SCORE, punsafe) read instead of the computed one
    "aesthetic": RuleDef("quality", (S.AESTHETIC,), {"min": 5.0, "column": None},
                         lambda c, p: _num(c[S.AESTHETIC]) > p["min"]),
    "nsfw": RuleDef("quality", (S.NSFW,), {"max": 0.5, "column": None}, lambda c, p: _num(c[S.NSFW]) <= p["max"]),
    # LAION-5B's watermark detector (embed.watermark): a probability below ``max`` (Stable Diffusion v1-2's
    # laion-improved-aesthetics: "estimated watermark probability < 0.5"); ``column=pwatermark``: LAION's own
    "watermark": RuleDef("embed", (S.WATERMARK,), {"max": 0.5, "column": None},
                         lambda c, p: _num(c[S.WATERMARK]) < p["max"]),
}  # fmt: skip

BUILTIN_RECIPES: dict[str, tuple[str, ...]] = {
    "no_filter": (),
    "basic": ("english", "caption_words", "caption_chars", "min_side", "aspect_ratio"),
    "clip_score": ("clip_score",),
    "text_based": ("english", "text_entity"),
    "image_based": ("english", "caption_tokens", "caption_chars", "image_cluster"),
    # DataComp applies the CLIP-score threshold first, then the image-based filter's own rules.
    "image_based_and_clip_score": ("clip_score", "english", "caption_tokens", "caption_chars", "image_cluster"),
    # LAION-2B's rule as DataComp reproduces it: English and a ViT-B/32 score of at least 0.28.
    "laion2b": ("english", "clip_score(threshold=0.28)"),
    "dedup": ("dedup",),
    # LAION-Aesthetics V1 (laion-datasets/laion-aesthetic.md, the linear predictor v1): laion-aesthetic takes a
    # score above 7 (120M samples), laion-art above 8 (8M)
    "laion_aesthetic": ("aesthetic(min=7.0)",),
    "laion_art": ("aesthetic(min=8.0)",),
    # Stable Diffusion v1-2's laion-improved-aesthetics (its model card): original size >= 512x512, an
    # improved-predictor score above 5.0 and an estimated watermark probability below 0.5 (embed.watermark, or
    # LAION's pwatermark with "watermark(column=pwatermark)" in a recipe of your own)
    "laion_improved_aesthetics": ("min_side(min=512)", "aesthetic(min=5.0)", "watermark(max=0.5)"),
}

_SPEC = re.compile(r"^\s*([a-z_]+)\s*(?:\((.*)\))?\s*$")


@dataclass(frozen=True)
class Rule:
    name: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def definition(self) -> RuleDef:
        """The rule's definition; with a ``column`` parameter, the same test over that column of the
        download table (a published score carried in with ``download.extra_cols``); with ``score``
        (``clip_score``), over that further scorer's column of the embed table."""
        base = RULES[self.name]
        column, stage = self.params.get("column"), "download"
        if self.params.get("score"):  # clip_score(score=<name>): a further scorer's column of the embed table
            column, stage = f"{S.SCORER_PREFIX}{self.params['score']}", "embed"
        if not column:
            return base
        (own,) = base.columns
        return RuleDef(stage, (str(column),), base.defaults, lambda c, p: base.test({own: c[str(column)]}, p),
                       base.drop_reason or self.name)  # fmt: skip

    def __str__(self) -> str:
        given = {k: v for k, v in self.params.items() if v is not None and v != self.definition.defaults.get(k)}
        return self.name + (f"({', '.join(f'{k}={v}' for k, v in given.items())})" if given else "")


def _value(text: str) -> Any:
    try:
        return float(text) if any(ch in text for ch in ".eE") else int(text)
    except ValueError:
        return text.strip("'\"")


def parse_rule(spec: str) -> Rule:
    """``"name"`` or ``"name(key=value, ...)"`` -> :class:`Rule` with defaults filled in."""
    m = _SPEC.match(spec)
    if not m or m.group(1) not in RULES:
        name = m.group(1) if m else spec
        raise UserError(f"unknown rule {name!r}; rules are {sorted(r for r in RULES if r not in IMPLICIT)}")
    name, args = m.group(1), m.group(2)
    params = dict(RULES[name].defaults)
    for part in filter(None, (a.strip() for a in (args or "").split(","))):
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or key not in (*params, *RULES[name].optional):
            takes = sorted([*params, *RULES[name].optional]) or "none"
            raise UserError(f"rule {name}: bad parameter {part!r}; it takes {takes}")
        params[key] = _value(value.strip())
    return Rule(name, params)


def parse_recipe(specs: list[str] | tuple[str, ...], decoded: bool = False, listed: bool = False) -> list[Rule]:
    """The recipe's rules, the implicit ``downloaded`` first, then (``decoded``: the pool is
    embedded) the implicit ``decoded``; neither on a pool curated from its metadata alone
    (``listed``: :meth:`pipeline.store.parquet.Pool.metadata_only`), as DataComp's baselines run."""
    implicit = [] if listed else [Rule("downloaded")] + ([Rule("decoded")] if decoded else [])
    return [*implicit, *(parse_rule(s) for s in specs if s.strip() not in IMPLICIT)]


def recipe_rules(name: str, recipes: Mapping[str, list[str]], decoded: bool = False,
                 listed: bool = False) -> list[Rule]:  # fmt: skip
    if name in recipes:
        return parse_recipe(recipes[name], decoded, listed)
    if name in BUILTIN_RECIPES:
        return parse_recipe(BUILTIN_RECIPES[name], decoded, listed)
    raise UserError(f"unknown recipe {name!r}; built-in: {sorted(BUILTIN_RECIPES)}, defined: {sorted(recipes)}")


def get_threshold(scores: np.ndarray, fraction: float) -> float:
    """DataComp's ``get_threshold``: the value at index ``int(n * fraction)`` of the scores sorted
    in decreasing order (nulls left out), so ``>= threshold`` keeps about the top ``fraction``.
    A fraction of 1 (index n, past the end) keeps everything: the lowest score."""
    values = _num(scores)
    values = np.sort(values[~np.isnan(values)])[::-1]
    if not len(values):
        return float("inf")
    return float(values[min(int(len(values) * fraction), len(values) - 1)])


def decide(columns: Mapping[str, np.ndarray], rules: list[Rule]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Apply ``rules`` in order.

    Returns:
        ``keep`` (bool), ``drop_reason`` (object array of rule names, None when kept), and the
        number of samples left after each rule (the funnel).
    """
    n = len(next(iter(columns.values())))
    keep = np.ones(n, dtype=bool)
    reason = np.full(n, None, dtype=object)
    funnel = []
    for rule in rules:
        passed = np.asarray(rule.definition.test(columns, rule.params), dtype=bool)
        failed = keep & ~passed
        reason[failed] = rule.definition.drop_reason or rule.name
        keep &= passed
        funnel.append(int(keep.sum()))
    return keep, reason, funnel
