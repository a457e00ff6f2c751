"""MoDE over a pool: fit the centres on a sample of caption embeddings, assign every shard, report,
select data-expert subsets, and route a task's class names to experts (see :mod:`pipeline.mode.clustering`).

Fitted centres live in ``aggregates/mode/`` (``fine_centers.npy``, ``coarse_centers.npy``,
``fine_to_expert.npy``, ``plain_fine_centers.npy``) with ``aggregates/mode.json`` (config, fit size,
caption encoder). Assignments go to ``tables/mode/{shard}``; the report to ``reports/mode/``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config import ModeConfig, config_hash
from pipeline.core import runner
from pipeline.core.step import Read, Step
from pipeline.errors import UserError
from pipeline.mode.clustering import fit_hierarchy, nearest, normalize, routing_weights, size_spread, top_terms
from pipeline.sampling import uid_to_uint64, uniform
from pipeline.store import schema as S
from pipeline.store.parquet import Pool, atomic_path, write_json_atomic

STAGE = "mode"
SOURCE = "caption_embed"
_FIT_KEY = 0x4D6F4445  # "MoDE": the hash key of the fit sample's draws
ARRAYS = ("fine_centers", "coarse_centers", "fine_to_expert", "plain_fine_centers", "plain_fine_to_expert")


def _vectors(table: pa.Table) -> np.ndarray:
    return S.vectors(table[S.CAPTION_EMBEDDING]).astype(np.float32)


def fit_hash(pool: Pool, cfg: ModeConfig) -> str:
    # the embed stage records the config of both its tables (caption model included)
    source = pool.stage_config("embed")["config_hash"]
    # ... and the pool it is fitted on: a grown pool (new input files) is fitted again, as a pool
    # curated from all its files at once would be (the sample is by uid hash, the same either way)
    plan = pool.read_plan() or {}
    size = "" if len(plan.get("ingests") or []) <= 1 else f"|{plan['num_rows']}"
    return hashlib.sha256(f"{config_hash(cfg)}|{source}{size}".encode()).hexdigest()[:16]


def sample_shard(pool_root: str, out_dir: str, share: float, seed: int, shard: int) -> int:
    """This shard's part of the fit sample: caption embeddings drawn at ``share`` by uid hash."""
    from pipeline.core.vectors import drawn, write_sample

    table = Pool(pool_root).read_shard(SOURCE, shard, columns=[S.UID, S.CAPTION_EMBEDDING])
    chosen = table.filter(pa.array(drawn(table[S.UID], _FIT_KEY, seed, share)))
    vectors = chosen[S.CAPTION_EMBEDDING].combine_chunks()
    return write_sample(Path(out_dir), shard, chosen[S.UID].combine_chunks(), vectors)


def _caption_model(pool: Pool, shards: list[int]) -> str | None:
    for shard in shards:
        models = pool.read_shard(SOURCE, shard, columns=[S.CAPTION_MODEL])[S.CAPTION_MODEL]
        if len(models):
            return models[0].as_py()
    return None


def fit_mode(pool: Pool, cfg: ModeConfig, engine: Any, progress: bool = True) -> dict[str, Any]:
    """Fit (or reuse) the centres on a uid-hash sample of the pool's caption embeddings, drawn per
    shard by the engine (:func:`pipeline.core.vectors.fit_sample`)."""
    from pipeline.core.vectors import fit_sample

    shards = pool.require_complete(SOURCE)
    digest = fit_hash(pool, cfg)
    summary_path = pool.aggregates_dir / "mode.json"
    if summary_path.exists() and json.loads(summary_path.read_text()).get("fit_hash") == digest:
        return json.loads(summary_path.read_text())
    total = sum(m["counts"]["samples"] for m in pool.completed(SOURCE).values())
    if total == 0:
        raise UserError(f"{pool.root}: no caption embeddings to cluster")
    share = min(1.0, max(cfg.fit_fraction, cfg.min_fit_samples / total), cfg.max_fit_samples / total)
    sample_dir = pool.aggregates_dir / "mode" / "sample"
    task = functools.partial(sample_shard, str(pool.root), str(sample_dir), share, cfg.seed)
    # in uid order across the whole sample: k-means depends on the order of its input, and neither
    # img2dataset's threads (a shard's order) nor the sharding (a pool grown file by file) may change it
    _, x = fit_sample(pool, engine, task, shards, sample_dir, desc="mode sample", by_uid=True, normalise=False,
                      progress=progress)  # fmt: skip
    hierarchy = fit_hierarchy(x, cfg)
    out = pool.aggregates_dir / "mode"
    arrays = (hierarchy.fine, hierarchy.coarse, hierarchy.fine_to_expert, hierarchy.plain_fine,
              hierarchy.plain_fine_to_expert)  # fmt: skip
    for name, array in zip(ARRAYS, arrays, strict=True):
        with atomic_path(out / f"{name}.npy") as tmp, tmp.open("wb") as f:
            np.save(f, array)
    embed = pool.stage_config("embed")["config"]
    summary = {"fit_hash": digest, "config": dataclasses.asdict(cfg), "fit_samples": len(x), "pool_samples": total,
               "n_fine": len(hierarchy.fine), "caption_model": _caption_model(pool, shards),
               "embed_model": embed.get("model"), "embed_checkpoint": embed.get("checkpoint")}  # fmt: skip
    write_json_atomic(summary_path, summary)
    return summary


@functools.lru_cache(maxsize=2)
def load_centers(root: str, digest: str) -> dict[str, np.ndarray]:
    from pipeline.loads import note_load

    note_load("mode-centres")
    return {name: np.load(Path(root) / "aggregates" / "mode" / f"{name}.npy") for name in ARRAYS}


class AssignExperts(Step):
    """``tables/mode``: each caption's nearest fine centre, its expert and distance, and its nearest
    plain k-means centre (the fitted centres of ``aggregates/mode/``, loaded once per worker)."""

    name = STAGE
    schema = S.MODE_SCHEMA

    def __init__(self, pool_root: str, cfg: ModeConfig, digest: str):
        super().__init__(reads=(Read(SOURCE, (S.UID, S.SHARD, S.CAPTION_EMBEDDING)),), digest=digest)
        self.pool_root, self.metric = pool_root, cfg.metric
        self.centers: dict[str, np.ndarray] = {}

    def setup(self) -> None:
        self.centers = load_centers(self.pool_root, self.digest)

    def __call__(self, inputs: dict[str, pa.Table]) -> pa.Table:
        table = inputs[SOURCE]
        x = _vectors(table)
        x = normalize(x) if self.metric == "cosine" else x
        if table.num_rows:
            fine, dist = nearest(x, self.centers["fine_centers"], self.metric)
            plain = nearest(x, self.centers["plain_fine_centers"], self.metric)[0]
        else:
            fine, dist, plain = np.zeros((0, 1), int), np.zeros((0, 1)), np.zeros((0, 1), int)
        return pa.table({S.UID: table[S.UID], S.FINE_ID: fine[:, 0].astype(np.int32),
                         S.EXPERT_ID: self.centers["fine_to_expert"][fine[:, 0]].astype(np.int32),
                         S.FINE_DISTANCE: dist[:, 0].astype(np.float32),
                         S.FINE_ID_PLAIN: plain[:, 0].astype(np.int32)})  # fmt: skip


def run_mode(pool: Pool, cfg: ModeConfig, engine: Any, progress: bool = True) -> dict[str, Any]:
    """Fit if needed, assign every shard not assigned with these centres, write the report."""
    summary = fit_mode(pool, cfg, engine, progress)
    digest = summary["fit_hash"]
    step = AssignExperts(str(pool.root), cfg, digest)
    runner.run_step(pool, engine, step, runner.plan(pool, step, pool.require_complete(SOURCE)), progress=progress)
    summary = {**summary, **write_report(pool, cfg, engine)}
    write_json_atomic(pool.aggregates_dir / "mode.json", summary)
    pool.update_manifest()
    return summary


def write_report(pool: Pool, cfg: ModeConfig, engine: Any) -> dict[str, Any]:
    """Cluster size spread (balanced vs plain k-means), from SQL counts, and each expert's top
    caption terms, from a uid-hash sample of ``report_samples`` captions."""
    from pipeline.sampling import uid_below

    n_fine = int(json.loads((pool.aggregates_dir / "mode.json").read_text())["n_fine"])
    mode = pool.table(STAGE, [S.UID, S.FINE_ID, S.FINE_ID_PLAIN, S.EXPERT_ID])
    sizes, plain_sizes, expert_sizes = (np.zeros(n, dtype=np.int64) for n in (n_fine, n_fine, cfg.n_experts))
    for column, out in ((S.FINE_ID, sizes), (S.FINE_ID_PLAIN, plain_sizes), (S.EXPERT_ID, expert_sizes)):
        rows = engine.query(f"select {column} as c, count(*) as n from mode group by 1", {"mode": mode})
        out[rows["c"].to_numpy()] = rows["n"].to_numpy()
    share = uid_below(cfg.report_samples / max(1, int(sizes.sum())))
    where = f"where m.{share} and d.{share}" if share else ""
    tables = {"mode": mode, "download": pool.table("download", [S.UID, S.CAPTION])}
    rows = engine.query(f"select m.expert_id, d.caption from mode m join download d on m.uid = d.uid {where} "
                        "order by m.uid", tables)  # fmt: skip
    terms = top_terms(rows["caption"].to_pylist(), rows["expert_id"].to_numpy(), cfg.n_experts)
    mapping = np.load(pool.aggregates_dir / "mode" / "plain_fine_to_expert.npy")
    plain_expert_sizes = np.bincount(mapping, weights=sizes, minlength=cfg.n_experts).astype(np.int64).tolist()
    fine_per_expert = np.bincount(np.load(pool.aggregates_dir / "mode" / "fine_to_expert.npy"),
                                  minlength=cfg.n_experts).tolist()  # fmt: skip
    expert_sizes = expert_sizes.tolist()
    report = {"fine_sizes": size_spread(sizes), "fine_sizes_plain_kmeans": size_spread(plain_sizes),
              "expert_sizes": expert_sizes, "expert_sizes_plain_coarse": plain_expert_sizes,
              "fine_clusters_per_expert": fine_per_expert,
              "expert_size_ratio": round(max(expert_sizes) / max(1, min(expert_sizes)), 3),
              "expert_size_ratio_plain_coarse": round(max(plain_expert_sizes) / max(1, min(plain_expert_sizes)), 3),
              "expert_top_terms": terms}  # fmt: skip
    out = pool.report_dir(STAGE)
    write_json_atomic(out / "clusters.json", report)
    plot_sizes(out / "cluster_sizes.png", {"balanced k-means" if cfg.balanced else "k-means": sizes,
                                           "plain k-means": plain_sizes}, "MoDE fine cluster sizes")  # fmt: skip
    lines = ["# MoDE clusters", "", "| | clusters | min | median | max | Gini |", "|---|---|---|---|---|---|"]
    for name, sp in (("fitted", report["fine_sizes"]), ("plain k-means", report["fine_sizes_plain_kmeans"])):
        lines.append(f"| {name} | {sp['clusters']} | {sp['min']} | {sp['median']} | {sp['max']} | {sp['gini']} |")
    lines += ["", "| expert | samples | fine clusters | samples, plain coarse k-means | top caption terms |",
              "|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {e} | {expert_sizes[e]} | {fine_per_expert[e]} | {plain_expert_sizes[e]} | {', '.join(terms[e])} |"
              for e in range(cfg.n_experts)]  # fmt: skip
    with atomic_path(out / "clusters.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return {"report": report}


def plot_sizes(path: Path, series: dict[str, np.ndarray], title: str) -> None:
    """Cluster sizes, largest first, one line per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for label, sizes in series.items():
        ax.plot(np.arange(1, len(sizes) + 1), np.sort(sizes)[::-1], label=label)
    ax.set_xlabel("clusters, largest first")
    ax.set_ylabel("samples")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def expert_uids(pool: Pool, expert: int, mix: float = 0.0, seed: int = 0) -> pa.Table:
    """A data expert's training subset: every sample of ``expert`` plus out-of-expert samples making
    up a ``mix`` share of the subset (MoDE's loader can mix in others), chosen by uid hash."""
    if not 0 <= mix < 1:
        raise UserError(f"mix must be in [0, 1), got {mix}")
    table = pool.read_table(STAGE, columns=[S.UID, S.EXPERT_ID])
    inside = table.filter(pa.compute.equal(table[S.EXPERT_ID], expert))
    outside = table.filter(pa.compute.not_equal(table[S.EXPERT_ID], expert))
    want = min(outside.num_rows, round(inside.num_rows * mix / (1 - mix)))
    order = np.argsort(uniform(uid_to_uint64(outside[S.UID]), np.uint64(expert), seed), kind="stable")[:want]
    chosen = pa.concat_tables([inside, outside.take(pa.array(order, pa.int64()))])
    flag = np.r_[np.ones(inside.num_rows, bool), np.zeros(want, bool)]
    return chosen.append_column("in_expert", pa.array(flag))


def route(pool: Pool, class_names: list[str]) -> np.ndarray:
    """MoDE's ensemble weights over experts for a task given by its class names."""
    summary = json.loads((pool.aggregates_dir / "mode.json").read_text())
    cfg = ModeConfig(**{**summary["config"], "smooth_weight": tuple(summary["config"]["smooth_weight"])})
    centers = load_centers(str(pool.root), summary["fit_hash"])
    vectors = encode_class_names(summary, class_names)
    if cfg.metric == "cosine":
        vectors = normalize(vectors)
    return routing_weights(vectors, centers["fine_centers"], centers["fine_to_expert"], cfg.n_experts,
                           cfg.smooth_weight, cfg.too_many_class)  # fmt: skip


def encode_class_names(summary: dict[str, Any], names: list[str]) -> np.ndarray:
    """Embed names with the caption encoder the clusters were built on."""
    from pipeline.embed import MINILM, CaptionEncoder, ClipEmbedder

    if summary["caption_model"] == MINILM:
        return CaptionEncoder("minilm").encode(names, np.zeros(0))
    from pipeline.config import EmbedConfig

    if not summary.get("embed_checkpoint"):
        from pipeline.errors import UserError

        raise UserError(f"the clusters were built on {summary['caption_model']} (imported vectors); there is no text "
                        "tower here to embed class names: re-cluster with embed.caption_model: minilm")  # fmt: skip
    embedder = ClipEmbedder(EmbedConfig(model=summary["embed_model"], checkpoint=summary["embed_checkpoint"])).setup()
    return embedder.encode_texts(names)
