"""MetaCLIP 2's worldwide matching against the English-only (MetaCLIP 1) stage, on the same
multilingual captions: captions/s per core and every process's peak RSS.

    .venv/bin/python bench/worldwide_matching.py [--captions 1000000] [--per-shard 100000] [--workers 2]
                                                 [--metadata-dir metadata/worldwide] [--json OUT]

Captions: half the bundled LAION captions (cycled, and spliced from two of them past 10,000, as
``bench/metaclip_matching.py`` makes them), half generated in the 41 other languages of the
metadata folder: 5-12 of the language's 3,000 most frequent words (wordfreq), drawn Zipf-like,
joined without spaces for Chinese and Japanese. Web alt-text is about half non-English (the issue).

One pool of listed captions (no download; ``only_downloaded: false``), its caption scores computed
first (the worldwide step reads their fastText language; timed apart), then copied: the
English-only step matches every caption against MetaCLIP 1's list on one copy, the worldwide step
each caption against its language's list on the other. Each side runs in a fresh
:class:`~pipeline.engines.local.LocalEngine` of ``--workers`` processes, so its time includes
starting them and building the automata (MetaCLIP 1: one; worldwide: one per language a worker
meets, 42 here): the first pass. A second pass over another copy, in the same engine's kept
workers, finds the automata built: the matching rate itself. Peaks: VmHWM of the main process and
of every worker (bench/peaks.py); the main process holds the generated captions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def multilingual(n: int, metadata_dir: Path, seed: int = 0) -> tuple[list[str], dict[str, int]]:
    import numpy as np
    from wordfreq import top_n_list

    from bench.metaclip_matching import captions

    wiki_to_wordfreq = {"no": "nb", "tl": "fil"}
    langs = sorted(p.stem for p in metadata_dir.glob("*.json") if p.stem != "en")
    english = captions(n - n // 2, seed)
    rng = np.random.default_rng(seed)
    words = {lang: top_n_list(wiki_to_wordfreq.get(lang, lang), 3000) for lang in langs}
    out, per = list(english), {"en (LAION)": len(english)}
    for i in range(n // 2):
        lang = langs[i % len(langs)]
        pool = words[lang]
        picked = [pool[int(k) % len(pool)] for k in rng.zipf(1.2, size=int(rng.integers(5, 13)))]
        out.append(("" if lang in ("zh", "ja") else " ").join(picked))
        per[lang] = per.get(lang, 0) + 1
    order = rng.permutation(len(out))
    return [out[i] for i in order], per


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--captions", type=int, default=1_000_000)
    parser.add_argument("--per-shard", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--metadata-dir", type=Path, default=REPO / "metadata" / "worldwide")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bench.peaks import Peaks
    from pipeline.config import parse_config
    from pipeline.download import prepare
    from pipeline.engines.local import LocalEngine
    from pipeline.filters.stage import pending_scores, score_shards
    from pipeline.metaclip.stage import match_shards, pending_matches
    from pipeline.store.parquet import Pool

    if not args.metadata_dir.is_dir():
        raise SystemExit(f"{args.metadata_dir}: build it first (make metadata)")
    work = args.work or Path(tempfile.mkdtemp(prefix="worldwide-bench-"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    texts, per_lang = multilingual(args.captions, args.metadata_dir)
    urls = pa.table({"url": [f"http://example.com/{i}.jpg" for i in range(len(texts))], "caption": texts})
    pq.write_table(urls, work / "urls.parquet")
    del texts, urls

    def config(name: str, worldwide: bool):
        download = {"input": str(work / "urls.parquet"), "samples_per_shard": args.per_shard}
        return parse_config({
            "pool": str(work / name), "download": download,
            "metaclip": {"metadata": str(REPO / "metadata/entries.json"), "t": 20_000, "scale_t_to_pool": True,
                         "only_downloaded": False, "worldwide": worldwide, "metadata_dir": str(args.metadata_dir)},
        }, "bench")  # fmt: skip

    english, world = config("english", False), config("worldwide", True)
    pool = Pool(english.pool)
    prepare(pool, english.download, LocalEngine(args.workers))
    engine = LocalEngine(args.workers)
    start = time.perf_counter()
    score_shards(pool, engine, pending_scores(pool, listed=True), progress=False)
    scores_s = time.perf_counter() - start
    engine.close()
    for name in ("english_again", "worldwide", "worldwide_again"):
        shutil.copytree(pool.root, work / name)

    def kind(process, first: bool) -> str:
        return "main" if first else "worker"

    results = {"captions": args.captions, "workers": args.workers, "per_language": per_lang,
               "scores_seconds": round(scores_s, 2)}  # fmt: skip
    for name, cfg in (("english", english), ("worldwide", world)):
        engine = LocalEngine(args.workers)  # its workers are kept from the first pass to the second
        with Peaks([os.getpid()], kind) as peaks:
            passes = []
            for target in (Pool(cfg.pool), Pool(work / f"{name}_again")):
                start = time.perf_counter()
                match_shards(target, cfg.metaclip, engine, pending_matches(target, cfg.metaclip), progress=False)
                passes.append(time.perf_counter() - start)
            engine.close()
            time.sleep(1.5)  # one more poll
        markers = target.completed("metaclip_match").values()
        matched = sum(m["counts"]["matched"] for m in markers)
        matches = sum(m["counts"]["matches"] for m in markers)  # (caption, entry) pairs found: the work
        results[name] = {"first_pass_s": round(passes[0], 2), "second_pass_s": round(passes[1], 2),
                         "first_pass_captions_per_s_per_core": round(args.captions / passes[0] / args.workers),
                         "second_pass_captions_per_s_per_core": round(args.captions / passes[1] / args.workers),
                         "samples_matched": matched, "matches": matches,
                         "second_pass_matches_per_s_per_core": round(matches / passes[1] / args.workers),
                         "peak_gib": {k: round(v, 3) for k, v in sorted(peaks.peaks.items())}}  # fmt: skip
        print(name, results[name], flush=True)
    per_match = [results[side]["second_pass_matches_per_s_per_core"] for side in ("worldwide", "english")]
    results["worldwide_over_english_per_match"] = round(per_match[0] / per_match[1], 3)
    for which in ("first", "second"):
        key = f"{which}_pass_captions_per_s_per_core"
        results[f"worldwide_over_english_{which}_pass"] = round(results["worldwide"][key] / results["english"][key], 3)
    print(json.dumps(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with args.json.open("a") as f:
            f.write(json.dumps(results) + "\n")
    if args.work is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
