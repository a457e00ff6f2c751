"""``curate``: the command line. Stages run directly; ``run`` and ``demo`` go through the Prefect flow.

curate run CONFIG [--set KEY=VALUE ...]      the curate flow (Prefect, no server needed)
curate download CONFIG [--set ...]           the download stage alone, without Prefect
curate download CONFIG|POOL --retry CLASS[,CLASS...]   fetch again only the rows that failed so
curate demo CONFIG                           the offline demo: image server + the flow
curate filter POOL|CONFIG [--recipe NAME]    DataComp filters and dedup, then keep / drop_reason
curate export POOL --out DIR [--where SQL] [--recipe NAME] [--shuffle-seed S] [--overwrite]   a release
curate report POOL [--out DIR]               <pool>/report/index.html (or DIR for a read-only pool)
curate verify POOL [--deep]                  check every completion marker against its files
curate serve CONFIG --cron "0 3 * * *"       the flow on a schedule (Prefect server)
curate query POOL SQL | --name NAME [--config CONFIG] [--format table|csv|json]
curate stats POOL [--json]
curate index POOL [--space image|caption]   a faiss index of the pool's embeddings (incremental)
curate search POOL (--uid U | --text T | --image FILE) [-k 20] [--where SQL]   nearest samples
curate browse POOL [--port 8765] [--host 127.0.0.1] [--token T]   a read-only web app over the pool
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, load_config
from pipeline.errors import UserError
from pipeline.store.parquet import Pool


def _overrides(pairs: list[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. download.processes=4")
        out[key] = yaml.safe_load(value)
    return out


def _existing_pool(path: str) -> Pool:
    pool = Pool(path)
    if not (pool.root / "completions").is_dir():
        raise UserError(f"{path}: not a pool (no completions/ directory); run a stage first")
    return pool


def _locked(args: argparse.Namespace, pool: Pool) -> Any:
    """The writer lock on ``pool`` for this command (one writer per pool; ``--wait`` waits)."""
    from pipeline.store.lock import writer_lock

    return writer_lock(pool.root, wait=args.wait)


def _pool_error(pool: Pool, exc: Exception, where: str) -> UserError:
    """A DuckDB error while reading ``pool`` as one line: DuckDB's own message, which names a table
    file that does not match its stage's schema, with the stage to re-run. (Damaged files never get
    this far: ``query`` and ``export`` check every marker's files first, ``Pool.require_intact``.)"""
    import re

    from pipeline.store.parquet import redo_hint

    text = str(exc).splitlines()[0]
    named = re.search(re.escape(str(pool.root / "tables")) + r"/(\w+)/\d+\.parquet", text)
    return UserError(f"{where}: {text}" + (f"; {redo_hint(named.group(1))}" if named else ""))


def _engine(config: str | None, pool: Pool, workers: int | None = None) -> Any:
    """The engine of ``config`` (``engine:`` and its section), or, for a command given only a pool,
    the local engine with ``workers`` processes: every command gets its engine here."""
    from pipeline.config import parse_config
    from pipeline.engines import get_engine

    if config:
        return get_engine(load_config(config), workers)
    settings = {"pool": str(pool.root), "download": {"input": "-", "processes": workers or 2}}
    return get_engine(parse_config(settings, "curate"), workers)


def cmd_run(args: argparse.Namespace) -> int:
    from flows.curate import run

    result = run(args.config, _overrides(args.set))
    cfg = load_config(args.config, _overrides(args.set))
    code = _print_stats(Pool(cfg.pool))
    if cfg.export is not None:
        print(_release_line(result, Path(cfg.export.out)))
    return code


def _release_line(result: dict[str, Any], out: Path) -> str:
    """What the run released: the folder, its version (new, or the latest unchanged) and samples."""
    from pipeline.export.versions import latest_version

    if result.get("cycle") == "unchanged":
        return f"release: nothing new (no new input, the same config): {latest_version(out) or out} is current"
    release = result.get("release") or {}
    if not release:
        return f"release: none made ({out})"
    version = release.get("version")
    folder = out / version if version else out
    state = "" if version is None else (" (new version)" if release.get("new_version") else " (unchanged)")
    return f"release: {folder}{state}, {release['counts']['samples']} samples in {release['counts']['shards']} shards"


def cmd_download(args: argparse.Namespace) -> int:
    from pipeline.download import run_download
    from pipeline.engines import get_engine

    if args.retry is not None:
        return _retry(args)
    cfg = load_config(args.config, _overrides(args.set))
    with _locked(args, Pool(cfg.pool)):
        run_download(Pool(cfg.pool), cfg.download, get_engine(cfg))
    return _print_stats(Pool(cfg.pool))


def _retry(args: argparse.Namespace) -> int:
    """``curate download CONFIG|POOL --retry CLASSES``: one retry pass; given a pool, with the
    download settings it recorded and the local engine."""
    from pipeline.config import parse_config, with_overrides
    from pipeline.download.errors import check_retry_classes
    from pipeline.download.retry import format_retry, run_retry
    from pipeline.engines import get_engine

    classes = check_retry_classes(args.retry, "--retry")
    if Path(args.config).is_dir():
        pool = _existing_pool(args.config)
        recorded = pool.stage_config("download")
        if recorded is None:
            raise UserError(f"{args.config}: nothing downloaded yet, so nothing to retry")
        settings = {"pool": str(pool.root), "download": {**recorded["config"], "input": "-"}}
        cfg = parse_config(with_overrides(settings, _overrides(args.set)), "curate download")
    else:
        cfg = load_config(args.config, _overrides(args.set))
        pool = Pool(cfg.pool)
    with _locked(args, pool):
        result = run_retry(pool, cfg.download, get_engine(cfg), classes)
    print(format_retry(result))
    if result["shards"]:
        print("the retried shards' later stages are redone by the next `curate run`")
    return 0


def cmd_import_embeddings(args: argparse.Namespace) -> int:
    from pipeline.config import EmbedConfig, EmbedSourceConfig
    from pipeline.embed import run_embed

    pool = _existing_pool(args.pool)
    source = EmbedSourceConfig(path=args.path, format=args.format, key=args.key)
    embed = EmbedConfig(model=args.model, source=source, caption_model=None if args.no_captions else "clip")
    with _locked(args, pool):
        done = run_embed(pool, embed, _engine(args.config, pool, args.workers))
    print(f"imported {len(done)} shard(s): {sum(c['imported'] for c in done.values())} samples, "
          f"{sum(c['missing'] for c in done.values())} without a published embedding")  # fmt: skip
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from pipeline.config import EmbedConfig, text_uses
    from pipeline.embed import run_embed
    from pipeline.engines import get_engine

    if Path(args.target).is_dir():
        if not args.checkpoint:
            raise ConfigError("curate embed POOL needs --checkpoint (or give a config file instead of POOL)")
        pool, embed = Pool(args.target), EmbedConfig(model=args.model, checkpoint=args.checkpoint)
        engine = _engine(None, pool)
        needed = True  # no config says what reads the embed table: as before embed.text
    else:
        cfg = load_config(args.target, _overrides(args.set))
        if cfg.embed is None:
            raise ConfigError(f"{args.target}: has no `embed` section")
        pool, embed, engine = Pool(cfg.pool), cfg.embed, get_engine(cfg)
        needed = bool(text_uses(cfg))
    with _locked(args, pool):
        done = run_embed(pool, embed, engine, text_needed=needed)
    print(f"embedded {len(done)} shard(s): {sum(c['samples'] for c in done.values())} samples, "
          f"{sum(c['decode_errors'] for c in done.values())} decode errors")  # fmt: skip
    return 0


def cmd_random_checkpoint(args: argparse.Namespace) -> int:
    from pipeline.embed import save_random_checkpoint

    print(save_random_checkpoint(args.model, args.out, seed=args.seed))
    return 0


def _section(args: argparse.Namespace, name: str) -> tuple[Any, Any]:
    cfg = load_config(args.config, _overrides(args.set))
    if getattr(cfg, name) is None:
        raise ConfigError(f"{args.config}: has no `{name}` section")
    return cfg, getattr(cfg, name)


def cmd_mode(args: argparse.Namespace) -> int:
    from pipeline.engines import get_engine
    from pipeline.mode import run_mode

    cfg, mode = _section(args, "mode")
    with _locked(args, Pool(cfg.pool)):
        summary = run_mode(Pool(cfg.pool), mode, get_engine(cfg))
    print(json.dumps(summary["report"], indent=2))
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    from pipeline.mode import route

    names = [line.strip() for line in Path(args.classes).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise ConfigError(f"{args.classes}: no class names (one per line)")
    weights = route(_existing_pool(args.pool), names)
    for expert, weight in enumerate(weights):
        print(f"expert {expert}: {weight:.4f}")
    return 0


def cmd_rebalance(args: argparse.Namespace) -> int:
    from pipeline.rebalance import run_rebalance

    cfg, rebalance = _section(args, "rebalance")
    from pipeline.engines import get_engine

    with _locked(args, Pool(cfg.pool)):
        print(json.dumps(run_rebalance(Pool(cfg.pool), rebalance, get_engine(cfg)), indent=2))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """Validate the URL list into the pool (``input/urls.parquet``): the text stages can then run
    before any download (``download.where``)."""
    from pipeline.download import prepare

    cfg = load_config(args.config, _overrides(args.set))
    from pipeline.engines import get_engine

    with _locked(args, Pool(cfg.pool)):
        plan = prepare(Pool(cfg.pool), cfg.download, get_engine(cfg))
    print(f"{cfg.pool}: {plan['num_rows']} rows listed in {plan['num_shards']} shard(s) "
          f"({plan['duplicates_dropped']} exact duplicates dropped)")  # fmt: skip
    return 0


def cmd_metaclip(args: argparse.Namespace) -> int:
    from pipeline.engines import get_engine
    from pipeline.metaclip.stage import run_metaclip

    cfg = load_config(args.config, _overrides(args.set))
    if cfg.metaclip is None:
        raise ConfigError(f"{args.config}: has no `metaclip` section")
    with _locked(args, Pool(cfg.pool)):
        summary = run_metaclip(Pool(cfg.pool), cfg.metaclip, get_engine(cfg))
    worldwide = summary.get("worldwide")
    if worldwide:  # the per-language rows as a table after the JSON, not 40 JSON objects in it
        summary = {**summary, "worldwide": {k: v for k, v in worldwide.items() if k != "languages"}}
    print(json.dumps(summary, indent=2))
    if worldwide:
        from pipeline.metaclip.report import languages_markdown

        print("\n".join(languages_markdown(worldwide)))
    return 0


def cmd_filter(args: argparse.Namespace) -> int:
    """``curate filter POOL --recipe R`` or ``curate filter CONFIG [--recipe R]``."""
    import dataclasses

    from pipeline.config import EmbedConfig, FilterConfig, parse_config
    from pipeline.engines import get_engine
    from pipeline.filters.stage import run_filters

    target = Path(args.target)
    if target.is_dir():
        pool = _existing_pool(args.target)
        settings = _overrides(args.set)
        filters = parse_config({"pool": str(pool.root), "download": {"input": "-"},
                                "filters": {**{k.removeprefix("filters."): v for k, v in settings.items()},
                                            **({"recipe": args.recipe} if args.recipe else {})}},
                               f"{args.target} (--recipe/--set)").filters  # fmt: skip
        recorded = pool.stage_config("embed")
        embed = None
        if recorded is not None and "checkpoint" in recorded["config"]:  # the weights the pool was embedded
            used = recorded["config"]  # with: they embed the image targets (imported vectors have none)
            embed = EmbedConfig(model=used["model"], checkpoint=used["checkpoint"], precision=used["precision"])
        cfg = parse_config({"pool": str(pool.root), "download": {"input": "-"}})
    else:
        overrides = _overrides(args.set) | ({"filters.recipe": args.recipe} if args.recipe else {})
        cfg = load_config(args.target, overrides)
        filters, embed, pool = cfg.filters or FilterConfig(), cfg.embed, Pool(cfg.pool)
        if args.recipe and cfg.filters is None:
            filters = dataclasses.replace(filters, recipe=args.recipe)
    with _locked(args, pool):
        summary = run_filters(pool, filters, get_engine(cfg), embed_cfg=embed)
    print((pool.report_dir("decisions") / "funnel.md").read_text())
    print(f"kept {summary['kept']} of {summary['pool_size']}; per sample: tables/decisions/ "
          f"(`curate query {pool.root} \"select drop_reason, count(*) from samples group by 1\"`)")  # fmt: skip
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """``curate export POOL --where SQL --out DIR``."""
    from pipeline.config import ExportConfig, parse_config
    from pipeline.export import export

    pool = _existing_pool(args.pool)
    recipes = {}
    if args.config:
        cfg = load_config(args.config)
        recipes = dict(cfg.filters.recipes) if cfg.filters else {}
    settings = {"out": args.out, "where": _export_where(args, pool), "recipe": args.recipe, "recipes": recipes,
                "samples_per_shard": args.samples_per_shard, "max_shard_bytes": args.max_shard_bytes,
                "shuffle_seed": args.shuffle_seed, "embeddings": args.embeddings,
                "allow_incomplete": args.allow_incomplete, "overwrite": args.overwrite, "uids": args.uids,
                "versioned": args.versioned or args.keep_versions is not None,
                "keep_versions": args.keep_versions, "allow_empty": args.allow_empty,
                "format": args.format}  # fmt: skip
    parse_config({"pool": str(pool.root), "download": {"input": "-"}, "export": settings}, "curate export")
    import duckdb

    try:
        manifest = export(pool, ExportConfig(**settings), engine=_engine(args.config, pool, args.processes),
                          wait=args.wait)  # fmt: skip
    except duckdb.Error as exc:
        raise _pool_error(pool, exc, "curate export") from None
    counts = manifest["counts"]
    out = Path(args.out)
    if manifest.get("version"):
        state = "new version" if manifest.get("new_version") else "no new version: the selection equals the latest"
        out = out / manifest["version"]
        print(f"{out}: {state} ({Path(args.out) / 'latest'} -> {manifest['version']})")
        if manifest.get("new_version") and manifest.get("changes"):
            ch = manifest["changes"]
            print(f"changes from {ch['previous']}: +{sum(ch['added'].values())} -{sum(ch['removed'].values())} "
                  f"samples ({out / 'CHANGES.md'})")  # fmt: skip
    if manifest.get("incomplete_stages"):
        print(f"warning: exported with incomplete stages {sorted(manifest['incomplete_stages'])} (--allow-incomplete)",
              file=sys.stderr)  # fmt: skip
    if manifest.get("release_format") == "uids":
        why = "the pool was curated from its metadata alone" if manifest["metadata_only_pool"] else "--format uids"
        print(f"{out}: {counts['samples']} uids in {out / 'uids.npy'} (DataComp's sorted u8,u8), the Parquet "
              f"sidecars and the manifest; no tar ({why})")  # fmt: skip
        return 0
    print(f"{out}: {counts['samples']} samples in {counts['shards']} shards ({counts['bytes'] / 2**20:.1f} MiB)")
    if counts.get("uids_unmatched") is not None:
        print(f"{args.uids}: {counts['uids_unmatched']} of its uids are not in the release (not in the pool, "
              "not downloaded, not decodable, or not selected by --where/--recipe)")  # fmt: skip
    if manifest["train_data"]:
        print(f"train with: --train-data '{out / manifest['train_data']}' "
              f"--train-num-samples {counts['samples']} --dataset-type webdataset")  # fmt: skip
    return 0


# the keep column of each stage that decides, in the order a config's default `export.where` joins them
_POOL_KEEPS = (("metaclip", "metaclip_keep"), ("decisions", "keep"), ("rebalance", "rebalance_keep"))


def _export_where(args: argparse.Namespace, pool: Pool) -> str | None:
    """``--where``; ``--all``: every downloaded sample; neither (nor ``--recipe`` or ``--uids``): the
    pool's curation, the keep columns of the stages it has run, said in one line on stderr."""
    if args.all and (args.where or args.recipe or args.uids):
        raise ConfigError("curate export: --all exports every sample; give it without --where, --recipe or --uids")
    if args.where is not None or args.recipe or args.uids:
        return args.where
    if args.all:
        return "true"
    stages = set(pool.stages())
    where = " and ".join(col for stage, col in _POOL_KEEPS if stage in stages) or "true"
    print(f"curate export: selecting the pool's curation: --where \"{where}\" (--all: every downloaded sample)",
          file=sys.stderr)  # fmt: skip
    return where


def cmd_serve(args: argparse.Namespace) -> int:
    """``curate serve CONFIG --cron EXPR``: run the flow on a schedule (Prefect server needed)."""
    load_config(args.config)  # a bad config fails now, not at 3 a.m.
    from flows.curate import serve

    print(f"serving deployment {args.name!r}: curate {args.config} on cron {args.cron!r} (Ctrl-C stops)")
    serve(args.config, args.cron, args.name)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.report import write_report

    page = write_report(_existing_pool(args.pool), release=Path(args.release) if args.release else None,
                        out=Path(args.out) if args.out else None, overwrite=args.overwrite)  # fmt: skip
    print(f"report: {page}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.devserver import DemoImageServer, rewrite_url_list

    cfg = load_config(args.config)
    if cfg.demo is None:
        raise ConfigError(f"{args.config}: has no `demo` section; use `curate run` for real URL lists")
    if cfg.embed is not None and not Path(cfg.embed.checkpoint).exists():
        from pipeline.embed import save_random_checkpoint

        save_random_checkpoint(cfg.embed.model, cfg.embed.checkpoint, seed=0)
        print(f"demo: saved RANDOM weights of {cfg.embed.model} to {cfg.embed.checkpoint} (no CLIP weights here)")
    with DemoImageServer(port=cfg.demo.port, slow_seconds=cfg.demo.slow_seconds) as server:
        urls = Path(cfg.download.input)
        if not urls.exists():
            n = rewrite_url_list(Path(cfg.demo.source), urls, server.base_url, cfg.demo.url_col, cfg.demo.caption_col)
            print(f"demo: {n} URLs of {cfg.demo.source} now point at generated images on {server.base_url}")
        from flows.curate import run

        run(args.config)
    _print_stats(Pool(cfg.pool))
    print(f"\ndemo pool: {Path(cfg.pool).resolve()}")
    if cfg.report:
        print(f"report:    {(Path(cfg.pool) / 'report' / 'index.html').resolve()}")
    if cfg.export is not None:
        print(f"release:   {Path(cfg.export.out).resolve()} (`{cfg.export.where}`)")
    print(f'try: curate query {cfg.pool} "select drop_reason, count(*) from samples group by 1 order by 2 desc"')
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from pipeline.index import build_index

    pool = _existing_pool(args.pool)
    with _locked(args, pool):
        manifest = build_index(pool, _engine(args.config, pool, args.workers), args.space,
                               exact_below=args.exact_below, segment_rows=args.segment_rows)  # fmt: skip
    kind = manifest["factory"] or "exact (flat)"
    print(f"{args.space} index of {pool.root}: {manifest['rows']} vectors in {len(manifest['shards'])} shard(s), "
          f"{kind}; encoded {len(manifest['encoded'])} shard(s) this run")  # fmt: skip
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from pipeline.index.search import Searcher, query_vector, search

    pool = _existing_pool(args.pool)
    searcher = Searcher(pool, args.space, nprobe=args.nprobe)
    note = searcher.stale()
    if note:
        print(note, file=sys.stderr)
    vector = query_vector(pool, args.space, uid=args.uid, text=args.text, image=args.image)
    hits = search(pool, vector, k=args.k, where=args.where, space=args.space, searcher=searcher)
    if args.json:
        for row in hits.to_pylist():
            print(json.dumps(row))
        return 0
    for row in hits.to_pylist():
        caption = (row["caption"] or "").replace("\n", " ")
        print(f"{row['rank']:>3}  {row['score']:.4f}  {row['uid']}  {caption[:100]}")
    return 0


def cmd_browse(args: argparse.Namespace) -> int:
    from pipeline.browse import serve

    pool = _existing_pool(args.pool)
    serve(pool, host=args.host, port=args.port, token=args.token)
    return 0


def _print_stats(pool: Pool) -> int:
    from pipeline.query import format_stats, stats

    print(format_stats(stats(pool)))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """``curate verify POOL [--deep]``: exit 0 when intact, 1 with each damaged file printed."""
    from pipeline.verify import verify

    pool = _existing_pool(args.pool)
    damaged, checked = 0, 0
    for item in verify(pool, deep=args.deep):
        if isinstance(item, int):
            checked = item
        else:
            damaged += 1
            print(f"DAMAGED {item}")
    kind = "deep: every tar member and table row read" if args.deep else "sha256 and schema of each"
    if damaged:
        print(f"{damaged} damaged file(s) of {checked} checked ({kind}); the commands above redo their shards")
        return 1
    print(f"{pool.root}: intact, {checked} files checked ({kind})")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from pipeline.query import format_stats, stats

    report = stats(_existing_pool(args.pool))
    print(json.dumps(report, indent=2, default=str) if args.json else format_stats(report))
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from pipeline.query import connect

    sql = args.sql
    if args.name:
        if not args.config:
            raise UserError("curate query: --name needs --config CONFIG (where the saved queries live)")
        saved = load_config(args.config).queries
        if args.name not in saved:
            raise UserError(f"curate query: no saved query {args.name!r}; the config has {sorted(saved)}")
        sql = saved[args.name]
    if not sql:
        raise UserError("curate query: give SQL or --name NAME")
    import duckdb

    from pipeline.query import completeness, format_completeness
    from pipeline.sqlsafe import check_query

    check_query(sql, f"query {args.name!r}" if args.name else "curate query")
    pool = _existing_pool(args.pool)
    note = format_completeness(completeness(pool))
    if note:
        print(note, file=sys.stderr)
    pool.require_intact(pool.stages())  # a damaged file is named, never read as garbage
    con = connect(pool, confined=True)
    try:
        relation = con.sql(sql)
        table = relation.fetch_arrow_table() if relation is not None else None
    except duckdb.Error as exc:
        raise _pool_error(pool, exc, "curate query") from None
    if table is None:
        return 0
    if args.format == "table":
        con.from_arrow(table).show(max_rows=args.max_rows, max_width=200)
        return 0
    if args.format == "csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, sys.stdout.buffer)
    else:
        for row in table.to_pylist():
            print(json.dumps(row, default=str))
    return 0


def _add_index_commands(sub: Any) -> None:
    """``index`` and ``search``: nearest-neighbour search over the pool's embeddings."""
    p = sub.add_parser("index", help="build or update a faiss index of the pool's embeddings")
    p.add_argument("pool")
    p.add_argument("--space", default="image", choices=("image", "caption"))
    p.add_argument("--exact-below", type=int, default=50_000, help="an exact index up to this many vectors")
    p.add_argument("--segment-rows", type=int, default=1_000_000,
                   help="vectors per merged segment (a merge task's memory: about this many times dim bytes)")
    p.add_argument("--config", help="a config whose engine builds it (default: the local engine)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--wait", action="store_true", help="wait for another writer of the pool instead of refusing")
    p.set_defaults(fn=cmd_index)
    p = sub.add_parser("search", help="the samples nearest a sample, a text or an image (read-only)")
    p.add_argument("pool")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--uid")
    what.add_argument("--text")
    what.add_argument("--image")
    p.add_argument("-k", type=int, default=20)
    p.add_argument("--where", help="SQL over the samples view: only samples it selects")
    p.add_argument("--space", default="image", choices=("image", "caption"))
    p.add_argument("--nprobe", type=int, default=32, help="inverted lists visited (an IVF index)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_search)
    p = sub.add_parser("browse", help="a read-only web app over the pool: samples, drops, duplicates, clusters")
    p.add_argument("pool")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--host", default="127.0.0.1", help="another host than loopback requires a token")
    p.add_argument("--token", help="the token requests must carry (default on a non-loopback host: a new one)")
    p.set_defaults(fn=cmd_browse)


def _add_stage_commands(sub: Any) -> None:
    """The commands that run stages: the flow, and each stage alone."""
    for name, fn, text in (("run", cmd_run, "run the curate flow"),
                           ("prepare", cmd_prepare, "validate the URL list into the pool (before any download)"),
                           ("download", cmd_download, "run the download stage alone"),
                           ("metaclip", cmd_metaclip, "run MetaCLIP matching and balancing alone"),
                           ("mode", cmd_mode, "run MoDE clustering alone"),
                           ("rebalance", cmd_rebalance, "run long-tail rebalancing alone")):  # fmt: skip
        p = sub.add_parser(name, help=text)
        p.add_argument("config")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
        p.add_argument("--wait", action="store_true", help="wait for another writer of the pool instead of refusing")
        p.set_defaults(fn=fn)
        if name == "download":
            p.add_argument("--retry", metavar="CLASS[,CLASS...]",
                           help="fetch again only the rows of finished shards that failed with these error classes "
                                "(timeout,http_5xx,...); CONFIG may then be a pool directory")  # fmt: skip
    p = sub.add_parser("embed", help="run the embedding stage alone")
    p.add_argument("target", help="a config file, or a pool directory with --model/--checkpoint")
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--checkpoint")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--wait", action="store_true", help="wait for another writer of the pool instead of refusing")
    p.set_defaults(fn=cmd_embed)
    p = sub.add_parser("import-embeddings", help="write the embed tables from published vectors (DataComp, "
                                                 "clip-retrieval/LAION) instead of computing them")  # fmt: skip
    p.add_argument("pool")
    p.add_argument("path", help="a DataComp metadata folder, or a clip-retrieval folder (img_emb/, text_emb/, "
                                "metadata/)")  # fmt: skip
    p.add_argument("--format", required=True, choices=("datacomp", "clip-retrieval"))
    p.add_argument("--key", default="l14", choices=("l14", "b32"), help="DataComp's model (default l14)")
    p.add_argument("--model", default="ViT-B-32", help="clip-retrieval: the model that made the vectors (recorded)")
    p.add_argument("--no-captions", action="store_true", help="skip caption_embed (the text vectors)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--config", help="a config whose engine (local or spark) runs the import")
    p.add_argument("--wait", action="store_true", help="wait for another writer of the pool instead of refusing")
    p.set_defaults(fn=cmd_import_embeddings)
    p = sub.add_parser("filter", help="DataComp filters + dedup, then a recipe's keep/drop_reason")
    p.add_argument("target", help="a pool directory, or a config file (its `filters` section)")
    p.add_argument("--recipe", help="basic, clip_score, text_based, image_based, ... or one of the config's recipes")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--wait", action="store_true", help="wait for another writer of the pool instead of refusing")
    p.set_defaults(fn=cmd_filter)


def _add_export_command(sub: Any) -> None:
    p = sub.add_parser("export", help="write a training release (WebDataset + Parquet) of selected samples")
    p.add_argument("pool")
    p.add_argument("--out", required=True, help="release directory")
    p.add_argument("--where", help="SQL predicate over the `samples` view (default: the pool's curation, the keep "
                                   "columns of the stages it has run)")
    p.add_argument("--all", action="store_true", help="export every downloaded sample, whatever the curation")
    p.add_argument("--recipe", help="also apply a filter recipe's keep")
    p.add_argument("--config", help="config whose filters.recipes define --recipe and whose engine runs the export")
    p.add_argument("--samples-per-shard", type=int, default=10_000)
    p.add_argument("--max-shard-bytes", type=int)
    p.add_argument("--shuffle-seed", type=int)
    p.add_argument("--embeddings", action="store_true", help="also export CLIP embeddings as Parquet")
    p.add_argument("--uids", help="a DataComp uid file (.npy of sorted u8,u8 pairs): export exactly its samples")
    p.add_argument("--processes", type=int, default=2, help="output shards written at once")
    p.add_argument("--overwrite", action="store_true", help="replace a different release already in --out")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="export although a stage the selection reads is unfinished (recorded in the manifest)")
    p.add_argument("--format", choices=("webdataset", "uids"), default="webdataset",
                   help="uids: a DataComp filtering-track submission (uids.npy, sidecars, manifest; no tar)")
    p.add_argument("--allow-empty", action="store_true",
                   help="write a release although the selection holds no sample (refused otherwise, with the funnel)")
    p.add_argument("--wait", action="store_true", help="wait for another export into --out instead of refusing")
    p.add_argument("--versioned", action="store_true",
                   help="write --out/vNNNN (a new version when the selection changed), CHANGES.md, --out/latest")
    p.add_argument("--keep-versions", type=int, help="with --versioned: keep the newest N versions")
    p.set_defaults(fn=cmd_export)


def _add_other_commands(sub: Any) -> None:
    """The scheduler, the demo and the commands that only read a pool."""
    p = sub.add_parser("serve", help="run the curate flow on a cron schedule (needs a Prefect server)")
    p.add_argument("config")
    p.add_argument("--cron", required=True, help='e.g. "0 3 * * *" (every day at 03:00 UTC)')
    p.add_argument("--name", default="scheduled-curation")
    p.set_defaults(fn=cmd_serve)
    p = sub.add_parser("report", help="write <pool>/report/index.html")
    p.add_argument("pool")
    p.add_argument("--release", help="a release exported from this pool, for the funnel")
    p.add_argument("--out", help="write the report here instead of <pool>/report (a read-only pool)")
    p.add_argument("--overwrite", action="store_true", help="replace a report of ours already in --out")
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser("verify", help="check every completion marker against its files (sha256, schema)")
    p.add_argument("pool")
    p.add_argument("--deep", action="store_true", help="also read every tar member and every table row")
    p.set_defaults(fn=cmd_verify)
    p = sub.add_parser("route", help="MoDE routing weights over experts for a task's class names")
    p.add_argument("pool")
    p.add_argument("--classes", required=True, help="text file, one class name per line")
    p.set_defaults(fn=cmd_route)
    p = sub.add_parser("random-checkpoint", help="save a random-weight open_clip model (tests, demo)")
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_random_checkpoint)
    p = sub.add_parser("demo", help="the offline demo: generated images, the real stages")
    p.add_argument("config", nargs="?", default="configs/demo.yaml")
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("query", help="SQL over a pool's DuckDB views")
    p.add_argument("pool")
    p.add_argument("sql", nargs="?")
    p.add_argument("--name", help="a saved query of the config's `queries`")
    p.add_argument("--config", help="config holding saved queries")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--max-rows", type=int, default=100)
    p.set_defaults(fn=cmd_query)
    p = sub.add_parser("stats", help="counts per stage and status")
    p.add_argument("pool")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_stats)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="curate", description="Curate CLIP training sets.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_stage_commands(sub)
    _add_index_commands(sub)
    _add_export_command(sub)
    _add_other_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.engines.base import ShardFailures

    try:
        return args.fn(args)
    except (UserError, ShardFailures) as exc:  # anything else is a bug: its traceback stays
        print(f"curate: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
