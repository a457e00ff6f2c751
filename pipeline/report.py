"""``curate report POOL``: one HTML page (with PNG plots) to open after a run.

``<pool>/report/index.html`` shows, for the stages the pool has:

- the funnel of samples through every stage (input, downloaded, embedded, MetaCLIP, filter recipe,
  rebalancing, release) and the drop reasons (download failures, each filter rule);
- the CLIP-score histogram (all embedded samples, and those the filter recipe keeps);
- MetaCLIP's entry distribution, head and tail, before and after balancing;
- MoDE's cluster sizes, before and after rebalancing;
- thumbnails with captions from the kept and the dropped samples (read through the safe shard
  reader, re-encoded small, so the page never shows a pool's original bytes).

"Kept" means every keep column present holds: ``metaclip_keep``, ``keep`` (the filter recipe) and
``rebalance_keep``. Every image on the page marks itself ``data-ok`` once loaded (a broken plot is
visible as such and tests check it in a headless browser).
"""

from __future__ import annotations

import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.store import schema as S
from pipeline.store.parquet import Pool, atomic_path, walk_files

KEEP_COLUMNS = (S.METACLIP_KEEP, S.KEEP, S.REBALANCE_KEEP)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> str:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    _plt().close(fig)
    return path.name


def funnel(pool: Pool, con: Any, columns: set[str]) -> list[tuple[str, int]]:
    """(step, samples left) through every stage present."""
    plan = pool.read_plan() or {}
    steps = [("input rows", int(plan.get("num_rows", 0)))]
    cond = "true"  # a pool curated before (or without) its download: the listed rows
    if S.STATUS in columns:
        cond = f"{S.STATUS} = 'success'"
        steps.append(("downloaded", con.execute(f"select count(*) from samples where {cond}").fetchone()[0]))
    if S.IMAGE_EMBEDDING in columns:
        cond += f" and {S.IMAGE_EMBEDDING} is not null"
        steps.append(("embedded", con.execute(f"select count(*) from samples where {cond}").fetchone()[0]))
    for column, label in ((S.METACLIP_KEEP, "MetaCLIP balanced"), (S.KEEP, "filter recipe"),
                          (S.REBALANCE_KEEP, "rebalanced")):  # fmt: skip
        if column in columns:
            cond += f" and coalesce({column}, false)"
            steps.append((label, con.execute(f"select count(*) from samples where {cond}").fetchone()[0]))
    return steps


def drop_reasons(con: Any, columns: set[str]) -> list[tuple[str, int]]:
    if S.STATUS not in columns:  # not downloaded: MetaCLIP's draws over the listed rows
        rows = []
        if S.METACLIP_KEEP in columns:
            n = con.execute(f"select count(*) from samples where {S.METACLIP_KEEP} = false").fetchall()[0][0]
            rows.append(("MetaCLIP: not drawn", n))
        return rows
    rows = con.execute(f"select 'download: ' || coalesce({S.ERROR_CLASS}, {S.STATUS}), count(*) from samples "
                       f"where {S.STATUS} <> 'success' group by 1").fetchall()  # fmt: skip
    if S.DROP_REASON in columns:
        rows += con.execute(f"select 'filter: ' || {S.DROP_REASON}, count(*) from samples where {S.DROP_REASON} "
                            "is not null and drop_reason <> 'downloaded' group by 1").fetchall()  # fmt: skip
    for column, label in ((S.METACLIP_KEEP, "MetaCLIP: not drawn"), (S.REBALANCE_KEEP, "rebalance: not drawn")):
        if column in columns:  # each stage on its own, over downloaded samples
            sql = f"select count(*) from samples where {S.STATUS} = 'success' and {column} = false"
            n = con.execute(sql).fetchall()[0][0]
            rows.append((label, n))
    return sorted(rows, key=lambda r: -r[1])


def _plot_funnel(steps: list[tuple[str, int]], reasons: list[tuple[str, int]], out: Path) -> str:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), gridspec_kw={"width_ratios": [1, 1.2]})
    names, values = zip(*steps, strict=True)
    axes[0].barh(range(len(values)), values, color="#4c72b0")
    axes[0].set_yticks(range(len(values)), names)
    axes[0].invert_yaxis()
    for i, v in enumerate(values):
        axes[0].text(v, i, f" {v:,}", va="center", fontsize=8)
    axes[0].set_xlim(0, max(values) * 1.25 or 1)
    axes[0].set_title("Samples left after each stage")
    if reasons:
        names, values = zip(*reasons[:15], strict=True)
        axes[1].barh(range(len(values)), values, color="#c44e52")
        axes[1].set_yticks(range(len(values)), names, fontsize=8)
        axes[1].invert_yaxis()
        axes[1].set_title("Drop reasons")
    else:
        axes[1].axis("off")
    fig.subplots_adjust(wspace=0.7)
    return _save(fig, out)


# The score histograms: (column, title, x label, what the grey bars count).
SCORES = ((S.CLIP_SCORE, "CLIP score", "clip_score (cosine of image and caption embeddings)", "embedded"),
          (S.AESTHETIC, "Aesthetic score", "aesthetic (LAION's aesthetic predictor)", "scored"),
          (S.NSFW, "NSFW probability", "nsfw (LAION's CLIP-based NSFW detector)", "scored"),
          (S.WATERMARK, "Watermark probability", "watermark (LAION-5B's watermark detector)", "scored"))  # fmt: skip


def _plot_score(con: Any, columns: set[str], score: tuple[str, str, str, str], out: Path,
                bins: int = 60) -> str | None:  # fmt: skip
    """A score's histogram, all and kept, counted in SQL (60 bins: a few rows, whatever the pool's size)."""
    column, title, label, counted = score
    if column not in columns:
        return None
    lo, hi, n = con.execute(f"select min({column}), max({column}), count({column}) from samples").fetchone()
    if not n:
        return None
    edges = np.linspace(float(lo), float(hi) + 1e-6, bins + 1)
    width = float((edges[-1] - edges[0]) / bins)
    kept = f"count(*) filter (where {S.KEEP})" if S.KEEP in columns else "0"
    rows = con.execute(f"select least(cast(floor(({column} - {float(lo)!r}) / {width!r}) as integer), "
                       f"{bins - 1}) as b, count(*), {kept} from samples where {column} is not null "
                       "group by 1").fetchall()  # fmt: skip
    counts, kept_counts = np.zeros(bins), np.zeros(bins)
    for b, c, k in rows:
        counts[b], kept_counts[b] = c, k
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.stairs(counts, edges, fill=True, color="#8c8c8c", label=f"{counted} ({n:,})")
    if S.KEEP in columns:
        ax.stairs(kept_counts, edges, fill=True, color="#55a868", alpha=0.8,
                  label=f"kept by the filter recipe ({int(kept_counts.sum()):,})")  # fmt: skip
    ax.set_xlabel(label)
    ax.set_ylabel("samples")
    ax.legend(fontsize=8)
    ax.set_title(title)
    return _save(fig, out)


def _plot_entries(pool: Pool, out: Path) -> str | None:
    """MetaCLIP's own entry-distribution plot (:func:`pipeline.metaclip.report.plot`)."""
    path, summary = pool.aggregates_dir / "metaclip_entry_counts.parquet", pool.aggregates_dir / "metaclip.json"
    if not (path.exists() and summary.exists()):
        return None
    import pyarrow.parquet as pq

    from pipeline.metaclip.report import plot

    table = pq.read_table(path, columns=["count", "kept"])
    plot(out, table["count"].to_numpy(), table["kept"].to_numpy(), json.loads(summary.read_text())["t"])
    return out.name


def _languages_html(pool: Pool) -> list[str]:
    """MetaCLIP 2's worldwide balancing per language: matches, t and kept samples (none otherwise)."""
    path = pool.aggregates_dir / "metaclip.json"
    worldwide = json.loads(path.read_text()).get("worldwide") if path.exists() else None
    if not worldwide:
        return []
    e = html.escape
    rows = [f"<h2>MetaCLIP 2 worldwide balancing, per language</h2><p>t_en = {worldwide['t_en']:g}; English's tail "
            f"share p = {worldwide['tail_share_p']:.4f}; every other language's t keeps that share of its matches "
            "in its tail.</p><table class='languages'><tr><th>language</th><th>entries</th><th>counted samples</th>"
            "<th>matches</th><th>t</th><th>tail share</th><th>kept</th></tr>"]  # fmt: skip
    for r in worldwide["languages"]:
        share = "" if r["tail_share"] is None else f"{r['tail_share']:.4f}"
        rows.append(f"<tr><td>{e(r['lang'])}</td><td>{r['entries']:,}</td><td>{r['samples']:,}</td>"
                    f"<td>{r['matches']:,}</td><td>{r['t']:g}</td><td>{share}</td><td>{r['kept']:,}</td></tr>")
    return [*rows, "</table>"]


def _plot_clusters(con: Any, columns: set[str], out: Path) -> str | None:
    """MoDE cluster sizes, and after rebalancing, with the plot MoDE's and rebalancing's reports use."""
    if S.FINE_ID not in columns:
        return None
    from pipeline.mode import plot_sizes

    keep = f"sum(coalesce({S.REBALANCE_KEEP}, false)::int)" if S.REBALANCE_KEEP in columns else "null"
    rows = con.execute(f"select count(*), {keep} from samples where {S.FINE_ID} is not null group by {S.FINE_ID}"
                       ).fetchall()  # fmt: skip
    series = {"cluster size": np.array([r[0] for r in rows])}
    if rows and rows[0][1] is not None:
        series["after rebalancing"] = np.array([r[1] for r in rows])
    plot_sizes(out, series, "MoDE fine cluster sizes")
    return out.name


def _thumbs(pool: Pool, con: Any, columns: set[str], out: Path, n: int) -> dict[str, list[dict[str, Any]]]:
    """A few kept and dropped downloaded samples, as small JPEGs with their captions."""
    from pipeline.store.webdataset import decode_image, image_of, iter_shard

    if S.STATUS not in columns:  # nothing downloaded: no image to show
        return {}
    present = [c for c in KEEP_COLUMNS if c in columns]
    kept_sql = " and ".join(f"coalesce({c}, false)" for c in present) or "true"
    reason = S.DROP_REASON if S.DROP_REASON in columns else "null"
    picks: dict[str, list[dict[str, Any]]] = {}
    for label, cond in (("kept", kept_sql), ("dropped", f"not ({kept_sql})")):
        picks[label] = con.sql(
            f"select {S.UID}, {S.SHARD}, {S.KEY}, {S.CAPTION}, {reason} as reason, "
            + ", ".join(present or ["null as none"])
            + f" from samples where {S.STATUS} = 'success' and ({cond}) order by md5({S.UID}) limit {n}"
        ).fetch_arrow_table().to_pylist()  # fmt: skip
    wanted = {(r[S.SHARD], r[S.KEY]): r for rows in picks.values() for r in rows}
    for shard in sorted({s for s, _ in wanted}):
        for sample in iter_shard(pool.shard_tar(shard)):
            row = wanted.get((shard, sample["__key__"]))
            found = image_of(sample) if row else None
            if not found:
                continue
            img, _ = decode_image(found[1])
            if img is None:
                continue
            img.thumbnail((160, 160))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=80)
            name = f"thumbs/{row[S.UID]}.jpg"
            with atomic_path(out / name) as tmp:
                tmp.write_bytes(buf.getvalue())
            row["thumb"] = name
    return {k: [r for r in v if "thumb" in r] for k, v in picks.items()}


def _why(row: dict[str, Any]) -> str:
    if row.get("reason"):
        return f"filter: {row['reason']}"
    for c in KEEP_COLUMNS:
        if c in row and not row[c]:
            return f"{c} = false"
    return ""


def write_report(pool: Pool, thumbnails: int = 12, release: Path | None = None, out: Path | None = None,
                 overwrite: bool = False) -> Path:  # fmt: skip
    """Write ``index.html`` and its PNGs into ``out`` (default ``<pool>/report``; another folder
    reports on a read-only pool: a new or empty one, or a report of ours with ``overwrite``:
    :func:`check_report_out`); returns the page's path. The page says which stages are incomplete."""
    from pipeline.query import completeness, connect

    own = out is None  # <pool>/report is the pool's own folder
    out = Path(out) if out is not None else pool.root / "report"
    if not own:
        check_report_out(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    page = _write_page(pool, connect(pool), completeness, out, release, thumbnails)
    if not own:
        mark_report(out)
    return page


def _write_page(pool: Pool, con: Any, completeness: Any, out: Path, release: Path | None, thumbnails: int) -> Path:
    """The page and its images into ``out``."""
    incomplete = {s: e for s, e in completeness(pool).items() if not e["complete"]}
    columns = {r[0] for r in con.execute("describe samples").fetchall()}
    steps = funnel(pool, con, columns)
    if release is not None and (release / "manifest.json").exists():
        steps.append(("release (export)", json.loads((release / "manifest.json").read_text())["counts"]["samples"]))
    reasons = drop_reasons(con, columns)
    plots = [("Funnel", _plot_funnel(steps, reasons, out / "funnel.png"))]
    scorers = [(c, f"CLIP score ({c.removeprefix(S.SCORER_PREFIX)})", f"{c} (embed.scorers)", "embedded")
               for c in sorted(columns) if c.startswith(S.SCORER_PREFIX)]  # fmt: skip
    plots += [(score[1], _plot_score(con, columns, score, out / f"{score[0]}.png")) for score in (*SCORES, *scorers)]
    plots.append(("MetaCLIP entries", _plot_entries(pool, out / "metaclip_entries.png")))
    plots.append(("Cluster sizes", _plot_clusters(con, columns, out / "cluster_sizes.png")))
    thumbs = _thumbs(pool, con, columns, out, thumbnails)
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>clipcurate report</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}td:first-child{text-align:left}"
        ".grid{display:flex;flex-wrap:wrap;gap:8px}.card{width:170px;font-size:11px}"
        ".card img{max-width:160px;max-height:160px;display:block}img[data-ok='0']{outline:3px solid red}</style>",
        "</head><body>",
        f"<h1>clipcurate report</h1><p>Pool <code>{e(str(pool.root.resolve()))}</code></p>",
    ]
    if incomplete:
        parts.append("<p class='incomplete'><b>Incomplete stages</b> (their columns are NULL for the missing shards): "
                     + ", ".join(f"{e(s)} {v['done']}/{v['planned']} shards" for s, v in incomplete.items()) + "</p>")
    else:
        parts.append("<p>Every stage is complete.</p>")
    parts.append("<h2>Funnel</h2><table><tr><th>stage</th><th>samples</th><th>share of input</th></tr>")
    total = steps[0][1] or 1
    parts += [f"<tr><td>{e(n)}</td><td>{v:,}</td><td>{100 * v / total:.1f}%</td></tr>" for n, v in steps]
    parts.append("</table><h2>Drop reasons</h2><table><tr><th>reason</th><th>samples</th></tr>")
    parts += [f"<tr><td>{e(n)}</td><td>{v:,}</td></tr>" for n, v in reasons]
    parts.append("</table>")
    parts += _languages_html(pool)
    for title, name in plots:
        if name:
            parts.append(f"<h2>{e(title)}</h2><img class='plot' src='{name}' alt='{e(title)}' data-ok='0' "
                         "onload=\"this.dataset.ok='1'\" onerror=\"this.dataset.ok='0'\">")  # fmt: skip
    for label, rows in thumbs.items():
        parts.append(f"<h2>Samples {label}</h2><div class='grid'>")
        for r in rows:
            note = "" if label == "kept" else f"<br><b>{e(_why(r))}</b>"
            caption = e((r[S.CAPTION] or "")[:120])
            parts.append(f"<div class='card'><img class='thumb' src='{r['thumb']}' data-ok='0' "
                         f"onload=\"this.dataset.ok='1'\"><span>{caption}</span>{note}</div>")  # fmt: skip
        parts.append("</div>")
    parts.append("</body></html>")
    page = out / "index.html"
    with atomic_path(page) as tmp:
        tmp.write_text("\n".join(parts), encoding="utf-8")
    return page


def mark_report(out: Path) -> None:
    """Record what a later ``--overwrite`` may replace: the report's files, as they are now."""
    from pipeline.store.parquet import file_sha256, write_json_atomic

    files = {rel: file_sha256(out / rel) for rel in walk_files(out) if rel != REPORT_MARK}
    write_json_atomic(out / REPORT_MARK, {"format": "clipcurate-report/1", "files": files})


REPORT_MARK = ".clipcurate-report.json"



def check_report_out(out: Path, overwrite: bool) -> None:
    """Refuse a report folder holding anything of the user's: it must be new or empty, or a report
    this tool wrote (its mark lists every file, unchanged since) and ``overwrite`` given.

    Raises:
        UserError: names the folder and the files at stake; nothing was written.
    """
    from pipeline.errors import UserError
    from pipeline.store.parquet import file_sha256

    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; give a folder (nothing was written)")
    if not out.is_dir() or not any(out.iterdir()):
        return
    try:
        mark = json.loads((out / REPORT_MARK).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"--out {out}: not empty and not a clipcurate report; give a new or empty folder "
                        "(nothing was written)") from None  # fmt: skip
    foreign = [rel for rel in walk_files(out) if rel != REPORT_MARK
               and ((out / rel).is_symlink() or mark.get(rel) != file_sha256(out / rel))]  # fmt: skip
    if foreign:
        raise UserError(f"--out {out}: holds files that are not this tool's report ({', '.join(foreign[:5])}); "
                        "move them away first (nothing was written)")  # fmt: skip
    if not overwrite:
        raise UserError(f"--out {out}: holds a clipcurate report; pass --overwrite to replace it (nothing was written)")
