"""Report of MetaCLIP balancing: the entry distribution's head and tail before and after.

Like Fig. 2 of "Demystifying CLIP Data": entries sorted by count on log-log axes, before balancing
and after. "After" counts every kept sample that contains the entry, including samples kept through
another of their entries, so a head entry's curve sits above t by the samples it shares with tail
entries (which are always kept); the tail is untouched.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.store.parquet import atomic_path, write_json_atomic

HEAD = 20
TAIL_BINS = ((1, 1), (2, 9), (10, 99), (100, 999), (1000, 9999), (10000, None))


def distribution(entries: list[str], counts: np.ndarray, kept: np.ndarray, t: float) -> dict:
    """Head entries (by count) with their kept counts, and how many entries fall in each count bin."""
    order = np.argsort(-counts, kind="stable")[:HEAD]
    head = [{"entry": entries[i], "count": int(counts[i]), "kept": int(kept[i])} for i in order if counts[i] > 0]
    bins = []
    for lo, hi in TAIL_BINS:
        label = f"{lo}" if lo == hi else (f"{lo}-{hi}" if hi else f">={lo}")
        in_bin = (counts >= lo) & (counts <= (hi if hi is not None else np.inf))
        kept_in = (kept >= lo) & (kept <= (hi if hi is not None else np.inf))
        bins.append({"count": label, "entries_before": int(in_bin.sum()), "entries_after": int(kept_in.sum())})
    return {"t": t, "head": head, "bins": bins, "entries_matched_before": int((counts > 0).sum()),
            "entries_matched_after": int((kept > 0).sum())}  # fmt: skip


def plot(path: Path, counts: np.ndarray, kept: np.ndarray, t: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for values, label in ((counts, "before balancing"), (kept, "after balancing")):
        ranked = np.sort(values[values > 0])[::-1]
        if len(ranked):
            ax.loglog(np.arange(1, len(ranked) + 1), ranked, label=label)
    ax.axhline(t, color="grey", linestyle="--", linewidth=1, label=f"t = {t:g}")
    ax.set_xlabel("entries, ranked by count")
    ax.set_ylabel("matching samples")
    ax.set_title("MetaCLIP entry distribution (kept samples containing each entry)")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_report(out_dir: Path, entries: list[str], counts: np.ndarray, kept: np.ndarray, t: float) -> dict:
    """Write ``entry_distribution.png``, ``.json`` and ``.md`` into ``out_dir``."""
    data = distribution(entries, counts, kept, t)
    plot(out_dir / "entry_distribution.png", counts, kept, t)
    write_json_atomic(out_dir / "entry_distribution.json", data)
    lines = [f"# MetaCLIP entry distribution (t = {t:g})", "", "| entry | count | kept |", "|---|---|---|"]
    lines += [f"| {h['entry']} | {h['count']} | {h['kept']} |" for h in data["head"]]
    lines += ["", "| entries with count | before | after |", "|---|---|---|"]
    lines += [f"| {b['count']} | {b['entries_before']} | {b['entries_after']} |" for b in data["bins"]]
    with atomic_path(out_dir / "entry_distribution.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return data


def languages_markdown(worldwide: dict) -> list[str]:
    """The per-language table of a worldwide balancing (``metaclip.json``'s ``worldwide``)."""
    lines = [f"t_en = {worldwide['t_en']:g}; English's tail share p = {worldwide['tail_share_p']:.4f} "
             "(every other language's t keeps the same share of its matches in its tail)", "",
             "| language | entries | entries matched | counted samples | matches | t | tail share | kept |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    if worldwide.get("note"):
        lines[1:1] = ["", f"**{worldwide['note']}**"]
    for row in worldwide["languages"]:
        share = "" if row["tail_share"] is None else f"{row['tail_share']:.4f}"
        lines.append(f"| {row['lang']} | {row['entries']} | {row['entries_matched']} | {row['samples']} | "
                     f"{row['matches']} | {row['t']:g} | {share} | {row['kept']} |")  # fmt: skip
    return lines


def write_languages_report(out_dir: Path, worldwide: dict) -> None:
    """``languages.md`` and ``languages.json``: matches, t and kept samples per language."""
    write_json_atomic(out_dir / "languages.json", worldwide)
    with atomic_path(out_dir / "languages.md") as tmp:
        tmp.write_text("\n".join(["# MetaCLIP 2 worldwide balancing, per language", "", *languages_markdown(worldwide)])
                       + "\n")  # fmt: skip
