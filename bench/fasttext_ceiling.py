"""How close the caption-scores step gets to fastText's own speed, per core.

DataComp's basic filter is bound by fastText's language ID (``get_fasttext_language`` per caption);
so is clipcurate's scores step. On ``--n`` real LAION captions (cycled), in this one process (one
core), captions per second of:

1. fastText's C++ ``predict`` alone, one caption at a time (the floor: nothing else is done);
2. DataComp's call, ``model.predict(text.replace("\\n", " "))`` through fastText's Python wrapper
   (``get_fasttext_language``: what each DataComp worker does per caption);
3. ``pipeline.filters.language.identify`` (1 with the labels and probabilities kept);
4. ``pipeline.filters.stage.caption_scores``: the step's whole per-caption work (language, word,
   token and character counts, the WordNet entity).

    .venv/bin/python bench/fasttext_ceiling.py [--n 200000]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def rate(fn, captions: list[str]) -> float:
    start = time.perf_counter()
    fn(captions)
    return len(captions) / (time.perf_counter() - start)


def main() -> None:
    import pyarrow.parquet as pq

    from pipeline.filters.language import _model, identify
    from pipeline.filters.stage import caption_scores

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    args = ap.parse_args()
    base = [c or "" for c in pq.read_table(REPO / "data/laion_10k.parquet", columns=["TEXT"])["TEXT"].to_pylist()]
    captions = (base * (args.n // len(base) + 1))[: args.n]
    model = _model()
    caption_scores(captions[:2000])  # load WordNet and the model first

    def floor(texts: list[str]) -> None:
        predict = model.f.predict
        for t in texts:
            predict(t.replace("\n", " ") + "\n", 1, 0.0, "replace")

    def datacomp(texts: list[str]) -> None:
        for t in texts:
            model.predict(t.replace("\n", " "))[0][0].split("__label__")[1]

    rows = [("fastText predict alone (C++ binding)", rate(floor, captions)),
            ("DataComp's get_fasttext_language (Python wrapper)", rate(datacomp, captions)),
            ("identify (language and probability)", rate(identify, captions)),
            ("caption_scores (the step's whole work)", rate(caption_scores, captions))]  # fmt: skip
    print(f"{args.n:,} captions, one core")
    for name, per_second in rows:
        print(f"  {name}: {per_second:,.0f} captions/s ({per_second / rows[0][1]:.2f}x the floor)")


if __name__ == "__main__":
    main()
