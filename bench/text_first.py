"""Curating before the download vs downloading everything first, on the demo's 10,000 LAION rows.

    python bench/text_first.py [--work runs/bench_text_first] [--rows 10000]

Both runs use the demo's loopback image server and download settings (``configs/demo.yaml``) and
MetaCLIP as the demo configures it (entries, ``t`` scaled to the pool), with
``only_downloaded: false``. *Download first*: the whole list is fetched, then MetaCLIP and the
caption scores run. *Text first*: MetaCLIP and the caption scores run on the listed captions, then
``download.where`` fetches only ``metaclip_keep and lang = 'en' and caption_words > 2``. Printed
per run and phase: wall time, rows fetched, bytes of the shards written, and the peak RSS of the
main process and of its children (the engine's worker processes; ``RUSAGE_CHILDREN``). Then the
check a user relies on: the text-first selection among downloaded rows equals the download-first
selection among downloaded rows.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WHERE = "metaclip_keep and lang = 'en' and caption_words > 2"


def _rss() -> tuple[float, float]:
    main = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return round(main, 3), round(children, 3)


def _config(pool: Path, url_list: Path, where: str | None):
    import yaml

    from pipeline.config import parse_config

    demo = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    download = {**demo["download"], "input": str(url_list), "where": where}
    metaclip = {**demo["metaclip"], "metadata": str(REPO / demo["metaclip"]["metadata"]), "only_downloaded": False}
    return parse_config({"pool": str(pool), "download": download, "metaclip": metaclip}, "bench")


def _phase(name: str, fn, out: dict) -> None:
    start = time.perf_counter()
    fn()
    out[name] = round(time.perf_counter() - start, 1)


def _text_stages(pool, cfg, engine, listed: bool) -> None:
    from pipeline.filters.stage import pending_scores, score_shards
    from pipeline.metaclip.stage import run_metaclip

    run_metaclip(pool, cfg.metaclip, engine, progress=False)
    score_shards(pool, engine, pending_scores(pool, listed=listed), progress=False)


def _fetched(pool) -> dict:
    from pipeline.query import connect

    con = connect(pool)
    try:
        fetched, ok = con.execute("select count(*) filter (where status <> 'not_selected'), "
                                  "count(*) filter (where status = 'success') from download").fetchone()  # fmt: skip
    finally:
        con.close()
    tar_bytes = sum(p.stat().st_size for p in (pool.root / "shards").glob("*.tar"))
    return {"rows_fetched": int(fetched), "downloaded": int(ok), "tar_bytes": tar_bytes}


def _selected(pool) -> set[str]:
    from pipeline.query import connect

    con = connect(pool)
    try:
        sql = f"select uid from samples where status = 'success' and ({WHERE})"
        return set(con.sql(sql).to_arrow_table()["uid"].to_pylist())
    finally:
        con.close()


def main() -> int:
    import pyarrow.parquet as pq

    from pipeline.devserver import DemoImageServer, rewrite_url_list
    from pipeline.download import prepare, run_download
    from pipeline.engines.local import LocalEngine
    from pipeline.store.parquet import Pool

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench_text_first")
    parser.add_argument("--rows", type=int, default=10_000)
    args = parser.parse_args()
    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    source = args.work / "laion.parquet"
    pq.write_table(pq.read_table(REPO / "data" / "laion_10k.parquet").slice(0, args.rows), source)
    results = {}
    with DemoImageServer(slow_seconds=3.0) as server:
        url_list = args.work / "urls.parquet"
        rewrite_url_list(source, url_list, server.base_url)
        engine = LocalEngine(2)

        cfg = _config(args.work / "download_first", url_list, None)
        pool, out = Pool(cfg.pool), {}
        _phase("download_s", lambda: run_download(pool, cfg.download, engine, progress=False), out)
        _phase("text_stages_s", lambda: _text_stages(pool, cfg, engine, listed=False), out)
        out.update(_fetched(pool))
        out["main_rss_gib"], out["children_rss_gib"] = _rss()
        results["download_first"] = out
        reference = _selected(pool)

        cfg = _config(args.work / "text_first", url_list, WHERE)
        pool, out = Pool(cfg.pool), {}
        _phase("prepare_s", lambda: prepare(pool, cfg.download, engine), out)
        _phase("text_stages_s", lambda: _text_stages(pool, cfg, engine, listed=True), out)
        _phase("download_s", lambda: run_download(pool, cfg.download, engine, progress=False), out)
        out.update(_fetched(pool))
        out["main_rss_gib"], out["children_rss_gib"] = _rss()
        results["text_first"] = out
        kept = _selected(pool)
    results["same_selection"] = kept == reference
    results["selected_downloaded"] = len(kept)
    for name in ("download_first", "text_first"):
        r = results[name]
        r["total_s"] = round(sum(v for k, v in r.items() if k.endswith("_s")), 1)
    print(json.dumps(results, indent=2))
    return 0 if results["same_selection"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
