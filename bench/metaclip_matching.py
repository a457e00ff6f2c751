"""MetaCLIP substring matching: the whole stage (Parquet in and out) against MetaCLIP's two
published matchers (without I/O), side by side on the same captions and the full entries file.

    .venv/bin/python bench/metaclip_matching.py [--captions 20000] [--loop-captions 300] [--repeats 3]
                                                [--per-shard 10000]

- ``stage``: ``pipeline.metaclip.stage.Match`` run by ``pipeline.core.runner.run_shard`` over a
  pool of ``download`` tables (shards of ``--per-shard`` captions): read the shard's Parquet,
  match, write ``tables/metaclip_match``, the shard's entry counts and the marker, one process (so
  the figure is per core).
- ``aho-corasick``: a transcription of MetaCLIP's ``substr_matching.py`` (pyahocorasick, one
  automaton, per caption: spacing, ``automaton.iter``, a set of ids), captions already in memory.
- ``loop``: a transcription of MetaCLIP's pure-Python version (every padded entry tested with ``in``
  against every spaced caption), on ``--loop-captions`` captions since it runs at a few captions/s.

Captions: the bundled 10k LAION captions, then captions spliced from two of them (as the other
benchmarks make them) up to ``--captions``. The automaton's build is timed apart (built once per
process by every side). All three sides' matches are checked equal on the captions they share.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ENTRIES = REPO / "metadata" / "entries.json"


def captions(n: int, seed: int = 0) -> list[str]:
    import numpy as np
    import pyarrow.parquet as pq

    real = [c for c in pq.read_table(REPO / "data" / "laion_10k.parquet")["TEXT"].to_pylist() if c]
    rng = np.random.default_rng(seed)
    words = [c.split() for c in real]
    out = real[:n]
    while len(out) < n:
        i, j, cut = rng.integers(0, len(words)), rng.integers(0, len(words)), rng.random()
        out.append(" ".join(words[i][: max(1, int(len(words[i]) * cut))] + words[j][int(len(words[j]) * cut):]))
    return out


# -- transcriptions of MetaCLIP's matchers (their behaviour, written here) ------------------------------


def _spaced(text: str) -> str:
    text = f" {text} "
    for p in (",", ".", ";", ":", "?", "!", "`"):
        text = text.replace(p, f" {p} ")
    for c in ("\t", "\n", "\r"):
        text = text.replace(c, " ")
    return text


class AhoCorasickReference:
    """MetaCLIP's pyahocorasick matcher: entries padded with spaces, value (id, padded entry)."""

    def __init__(self, entries: list[str]):
        import ahocorasick

        self.automaton = ahocorasick.Automaton()
        for entry_id, entry in enumerate(entries):
            padded = f" {entry} "
            self.automaton.add_word(padded, (entry_id, padded))
        self.automaton.make_automaton()

    def __call__(self, text: str) -> list[int]:
        found = set()
        for _end, (entry_id, _padded) in self.automaton.iter(_spaced(text)):
            found.add(entry_id)
        return list(found)


def loop_reference(text: str, padded_entries: list[str]) -> list[int]:
    """MetaCLIP's pure-Python matcher: every padded entry tested against the spaced caption."""
    spaced = _spaced(text)
    return [i for i, entry in enumerate(padded_entries) if entry in spaced]


# -- the sides ------------------------------------------------------------------------------------------


def stage_side(texts: list[str], work: Path, per_shard: int = 10_000) -> tuple[float, list[list[int]]]:
    import pyarrow as pa

    from pipeline.config import MetaclipConfig
    from pipeline.core.runner import run_shard
    from pipeline.metaclip.matching import matcher_for
    from pipeline.metaclip.stage import Match
    from pipeline.store import schema as S
    from pipeline.store.parquet import Pool, write_json_atomic

    pool = Pool(work / "pool")
    shards = (len(texts) + per_shard - 1) // per_shard
    write_json_atomic(pool.plan_path, {"num_shards": shards, "samples_per_shard": per_shard, "num_rows": len(texts)})
    for s in range(shards):
        part = texts[s * per_shard : (s + 1) * per_shard]
        table = S.conform(pa.table({S.UID: [f"{s:016x}{i:016x}" for i in range(len(part))],
                                    S.SHARD: pa.array([s] * len(part), pa.int32()),
                                    S.ROW: pa.array(range(len(part)), pa.int64()), S.CAPTION: part,
                                    S.STATUS: ["success"] * len(part)}), S.DOWNLOAD_SCHEMA)  # fmt: skip
        pool.write_table("download", s, table)
        pool.mark_done("download", s, "bench", {"samples": len(part)})  # downloaded: the stage reads its table
    cfg = MetaclipConfig(metadata=str(ENTRIES))
    matcher_for(cfg.metadata)  # the automaton is built once per process, as in the stage: not timed
    step = Match(cfg)
    t = time.perf_counter()
    for s in range(shards):
        run_shard(str(pool.root), step, s)
    seconds = time.perf_counter() - t
    matched = pool.read_table("metaclip_match", ["matched_entry_ids"])["matched_entry_ids"].to_pylist()
    return seconds, matched


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--captions", type=int, default=20_000)
    ap.add_argument("--loop-captions", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--per-shard", type=int, default=10_000, help="captions per shard (img2dataset's default)")
    args = ap.parse_args()

    from pipeline.metaclip.matching import load_entries

    entries = load_entries(ENTRIES)
    texts = captions(args.captions)
    t = time.perf_counter()
    reference = AhoCorasickReference(entries)
    build = time.perf_counter() - t
    rows = []
    for repeat in range(args.repeats):
        work = Path(tempfile.mkdtemp(prefix="clipcurate-matching-"))
        try:
            stage_s, stage_out = stage_side(texts, work, args.per_shard)
        finally:
            shutil.rmtree(work)
        t = time.perf_counter()
        ac_out = [reference(c) for c in texts]
        ac_s = time.perf_counter() - t
        assert [sorted(m) for m in ac_out] == stage_out, "the stage and MetaCLIP's Aho-Corasick disagree"
        rows.append({"repeat": repeat, "stage": len(texts) / stage_s, "aho-corasick": len(texts) / ac_s})
        print(json.dumps({k: round(v, 1) for k, v in rows[-1].items()}), flush=True)
    padded = [f" {e} " for e in entries]
    subset = texts[: args.loop_captions]
    t = time.perf_counter()
    loop_out = [loop_reference(c, padded) for c in subset]
    loop_rate = len(subset) / (time.perf_counter() - t)
    # the loop returns every id of a repeated entry; the Aho-Corasick version only the last one
    assert all(set(a) <= set(b) for a, b in zip((reference(c) for c in subset), loop_out, strict=True))
    median = {side: sorted(r[side] for r in rows)[len(rows) // 2] for side in ("stage", "aho-corasick")}
    print(json.dumps({"captions": len(texts), "entries": len(entries), "automaton_build_s": round(build, 2),
                      "stage_captions_per_s": round(median["stage"]),
                      "aho_corasick_captions_per_s": round(median["aho-corasick"]),
                      "loop_captions_per_s": round(loop_rate, 1), "loop_captions": len(subset),
                      "stage_over_aho_corasick": round(median["stage"] / median["aho-corasick"], 2)},
                     indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
