"""The Prefect flow end to end on a small pool (Prefect's test harness: a temporary local server)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import ExportConfig, FilterConfig, MetaclipConfig, ModeConfig, RebalanceConfig
from pipeline.store.parquet import Pool
from tests.conftest import REPO, embed_cfg, laion_rows, make_config, point_at, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_curate_flow_runs_every_stage_in_shard_batches(tmp_path: Path, image_server, prefect_harness, tiny_checkpoint):
    from prefect.artifacts import Artifact

    from flows.curate import batches, run

    pq.write_table(point_at(laion_rows(250, offset=3000), image_server), tmp_path / "u.parquet")
    cfg = make_config(tmp_path / "pool", tmp_path / "u.parquet", samples_per_shard=50, shards_per_task=2)
    cfg = dataclasses.replace(
        cfg,
        embed=embed_cfg(tiny_checkpoint, workers=0),
        metaclip=MetaclipConfig(metadata=str(REPO / "metadata/entries.json"), t=3),
        mode=ModeConfig(n_fine=6, n_experts=2, fit_fraction=1.0),
        rebalance=RebalanceConfig(t=20),
        filters=FilterConfig(recipe="mine", recipes={"mine": ["english", "min_side(min=100)", "dedup"]}),
    )
    config = write_config(tmp_path / "c.yaml", cfg)

    manifest = run(str(config))
    assert manifest["stages"]["download"]["shards_done"] == [0, 1, 2, 3, 4]
    assert manifest["stages"]["download"]["counts"]["samples"] == 250
    assert Pool(cfg.pool).read_table("download").num_rows == 250
    assert manifest["stages"]["metaclip"]["shards_done"] == [0, 1, 2, 3, 4]
    assert manifest["stage_results"]["metaclip"]["t"] == 3
    rules = ["downloaded", "decoded", "english", "min_side(min=100)", "dedup"]
    assert manifest["stage_results"]["decisions"]["rules"] == rules
    assert manifest["stage_results"]["decisions"]["pool_size"] == 250
    for stage in ("embed", "caption_embed", "mode", "rebalance", "filters", "dedup", "decisions"):
        assert manifest["stages"][stage]["shards_done"] == [0, 1, 2, 3, 4], stage
    assert manifest["stage_results"]["rebalance"]["group_by"] == "fine_id"
    assert batches([0, 1, 2, 3, 4], 2) == [[0, 1], [2, 3], [4]]
    artifact = Artifact.get("curate-counts")
    assert artifact is not None and "| download | 5/5 |" in artifact.data and "| metaclip | 5/5 |" in artifact.data

    again = run(str(config))  # a re-run finds every shard done
    assert again["stages"]["download"]["shards_done"] == [0, 1, 2, 3, 4]


def test_scheduled_deployment_builds_with_its_cron_schedule():
    from flows.curate import deployment

    d = deployment(str(REPO / "configs" / "demo.yaml"), "0 3 * * *", name="nightly")
    assert d.name == "nightly" and d.flow_name == "curate"
    (schedule,) = d.schedules
    assert schedule.schedule.cron == "0 3 * * *" and schedule.schedule.timezone == "UTC"
    assert d.parameters == {"config_path": str(REPO / "configs" / "demo.yaml")}
    assert d.concurrency_limit == 1  # one run of the cycle at a time


def test_prefect_yaml_deploys_the_flow_on_a_schedule():
    import yaml

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (dep,) = spec["deployments"]
    module, _, name = dep["entrypoint"].partition(":")
    assert (REPO / module).exists() and name == "curate"
    assert dep["schedules"][0]["cron"] and dep["parameters"]["config_path"] and dep["concurrency_limit"] == 1


def _full_config(tmp_path: Path, server, checkpoint, name: str) -> Path:
    pq.write_table(point_at(laion_rows(200, offset=5000), server), tmp_path / "u.parquet")
    cfg = make_config(tmp_path / name, tmp_path / "u.parquet", samples_per_shard=40, shards_per_task=1)
    cfg = dataclasses.replace(
        cfg,
        embed=embed_cfg(checkpoint, workers=0),
        metaclip=MetaclipConfig(metadata=str(REPO / "metadata/entries.json"), t=3),
        filters=FilterConfig(
            recipe="mine", recipes={"mine": ["english", "min_side(min=100)", "dedup"]}, dedup_eps=0.0009
        ),
        mode=ModeConfig(n_fine=6, n_experts=2, fit_fraction=1.0),
        rebalance=RebalanceConfig(t=20),
        export=ExportConfig(
            out=str(tmp_path / name / "release"),
            where="metaclip_keep and keep and rebalance_keep",
            samples_per_shard=16,
            shuffle_seed=3,
        ),
        report=True,
    )
    return write_config(tmp_path / f"{name}.yaml", cfg)


def _curate(config: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(config)], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip


def test_killed_flow_resumes_to_the_same_release(tmp_path, paced_server, prefect_harness, tiny_checkpoint):
    """SIGKILL the whole flow (and its worker processes) inside each stage in turn; the re-runs end
    with a release byte-identical to an uninterrupted run's."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    reference = _full_config(tmp_path, paced_server, tiny_checkpoint, "reference")
    proc = _curate(reference, env)
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-3000:]
    want = json.loads((tmp_path / "reference" / "release" / "manifest.json").read_text())
    assert want["counts"]["samples"] > 0

    config = _full_config(tmp_path, paced_server, tiny_checkpoint, "killed")
    pool = Pool(tmp_path / "killed")
    killed_in = []
    for stage in ("download", "embed", "metaclip_match", "filters", "mode", "export"):
        proc = _curate(config, env)
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            done = (
                len(pool.completed(stage)) if stage != "export" else (tmp_path / "killed" / ".release.partial").exists()
            )
            if done and (stage == "export" or done < 5):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                killed_in.append(stage)
                break
            time.sleep(0.02)
        else:
            proc.wait()
    assert len(killed_in) >= 4, killed_in  # most stages were caught mid-way (fast ones may finish first)
    proc = _curate(config, env)
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-3000:]
    got = json.loads((tmp_path / "killed" / "release" / "manifest.json").read_text())
    assert [s["sha256"] for s in got["shards"]] == [s["sha256"] for s in want["shards"]]
    assert got["counts"] == {**want["counts"], "pool_samples": want["counts"]["pool_samples"]}
    assert (tmp_path / "killed" / "report" / "index.html").exists()


def test_flow_curates_before_downloading_when_download_where_is_set(tmp_path: Path, image_server, prefect_harness):
    """MetaCLIP and the caption scores run on the listed captions, then only the selected rows are
    fetched; the recipe then decides on the downloaded rows."""
    from flows.curate import run
    from pipeline.query import query

    where = "metaclip_keep and lang = 'en'"
    pq.write_table(point_at(laion_rows(200, offset=4000), image_server), tmp_path / "u.parquet")
    cfg = make_config(tmp_path / "pool", tmp_path / "u.parquet", samples_per_shard=50)
    cfg = dataclasses.replace(
        cfg,
        download=dataclasses.replace(cfg.download, where=where),
        metaclip=MetaclipConfig(metadata=str(REPO / "metadata/entries.json"), t=3, only_downloaded=False),
        filters=FilterConfig(recipe="mine", recipes={"mine": ["english", "caption_words"]}),
    )
    manifest = run(str(write_config(tmp_path / "c.yaml", cfg)))
    pool = Pool(cfg.pool)
    selected = query(pool, f"select count(*) as n from samples where {where}")["n"][0].as_py()
    rows = query(pool, "select status, count(*) as n from download group by 1")
    status = dict(zip(rows["status"].to_pylist(), rows["n"].to_pylist(), strict=True))
    assert status.pop("not_selected") == 200 - selected and 0 < selected < 200
    assert sum(status.values()) == selected
    assert manifest["stage_results"]["metaclip"]["pool_size"] == 200  # counted over the listed pool
    kept = query(pool, "select count(*) as n from samples where keep")["n"][0].as_py()
    assert 0 < kept <= status.get("success", 0)
    assert query(pool, "select count(*) as n from samples where keep and not metaclip_keep")["n"][0].as_py() == 0


def _growth_config(tmp_path: Path, server, checkpoint, name: str, source: Path) -> Path:
    cfg = make_config(tmp_path / name, source, samples_per_shard=500, shards_per_task=2, image_size=64)
    cfg = dataclasses.replace(
        cfg,
        embed=embed_cfg(checkpoint, workers=0, batch_size=128),
        metaclip=MetaclipConfig(metadata=str(REPO / "metadata/entries.json"), t=4),
        # the pool-wide filter steps too: a grown pool re-applies them to every shard (their digests
        # cover the pool they were computed over)
        filters=FilterConfig(recipe="mine", recipes={"mine": ["english", "caption_words", "min_side(min=32)",
                                                              "image_cluster", "dedup"]},
                             image_clusters=8, dedup_eps=0.0009),
        mode=ModeConfig(n_fine=6, n_experts=2, fit_fraction=1.0),
        rebalance=RebalanceConfig(t=150),
        export=ExportConfig(out=str(tmp_path / name / "release"), where="metaclip_keep and keep and rebalance_keep",
                            samples_per_shard=400, shuffle_seed=3, versioned=True),
    )
    return write_config(tmp_path / f"{name}.yaml", cfg)


def _visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))  # not the lock file


def _release_uids(folder: Path) -> list[str]:
    return sorted(pq.read_table(sorted(folder.glob("[0-9]*.parquet")), columns=["uid"])["uid"].to_pylist())


def _digests(folder: Path) -> dict[str, str]:
    from pipeline.store.parquet import file_sha256

    return {str(p.relative_to(folder)): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _finished(pool: Pool) -> dict[tuple[str, int], float]:
    return {(stage, shard): m["finished_at"] for stage in pool.stages() for shard, m in pool.completed(stage).items()}


def test_scheduled_cycle_grows_the_pool_and_versions_its_releases(tmp_path, image_server, prefect_harness,
                                                                  tiny_checkpoint):  # fmt: skip
    """Three scheduled runs over a folder input: v0001 from one file; a second file gives v0002,
    equal uid for uid to a one-shot curation of both files, with v0001 untouched; then nothing new."""
    from prefect.artifacts import Artifact

    from flows.curate import run

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    pq.write_table(point_at(laion_rows(2000, offset=0), image_server), inputs / "crawl-001.parquet")
    config = _growth_config(tmp_path, image_server, tiny_checkpoint, "grown", inputs)
    out = tmp_path / "grown" / "release"

    run(str(config))  # run 1
    pool = Pool(tmp_path / "grown")
    assert _visible(out) == ["latest", "v0001"] and (out / "latest").readlink().name == "v0001"
    v1 = _digests(out / "v0001")
    v1_uids = _release_uids(out / "v0001")
    assert 0 < len(v1_uids) < 2000 and "The first version" in (out / "v0001" / "CHANGES.md").read_text()
    shards_1 = pool.read_plan()["num_shards"]

    pq.write_table(point_at(laion_rows(2000, offset=2000), image_server), inputs / "crawl-002.parquet")
    run(str(config))  # run 2: the new file is ingested as new shards, the pool-wide steps are redone
    plan = pool.read_plan()
    assert [len(i["files"]) for i in plan["ingests"]] == [1, 1] and plan["ingests"][1]["first_shard"] == shards_1
    assert (out / "latest").readlink().name == "v0002" and _digests(out / "v0001") == v1  # v0001 byte for byte
    v2 = json.loads((out / "v0002" / "manifest.json").read_text())
    assert v2["previous_version"] == "v0001" and [f["rows"] for f in v2["pool_input"]["files"]] == [2000, 2000]
    changes = v2["changes"]
    assert changes["added"]["new input (files ingested since the previous version)"] > 0
    assert changes["samples_before"] + sum(changes["added"].values()) - sum(changes["removed"].values()) == (
        v2["counts"]["samples"])
    assert all(r.startswith(("rebalanced:", "filtered:")) for r in changes["removed"]), changes["removed"]
    assert "## Added, by reason" in (out / "v0002" / "CHANGES.md").read_text()
    flips = pool.build_manifest()["stages"]["metaclip"]["counts"]
    assert flips.get("flipped_p_unchanged", 0) == 0 and flips.get("p_changed", 0) > 0  # draws keyed by uid
    cycle = Artifact.get("curate-cycle")
    assert "crawl-002.parquet" in cycle.data and "v0002" in cycle.data

    # a one-shot curation of both files with the same config: the same samples, uid for uid
    fresh = _growth_config(tmp_path, image_server, tiny_checkpoint, "fresh", inputs)
    run(str(fresh))
    assert _release_uids(tmp_path / "fresh" / "release" / "v0001") == _release_uids(out / "v0002")
    from pipeline.query import query

    for root in (tmp_path / "grown", tmp_path / "fresh"):  # no exact duplicate is kept twice
        shared = query(Pool(root), "select sha256, count(*) as n from samples where keep and dedup_keep "
                                   "and sha256 is not null group by 1 having count(*) > 1")  # fmt: skip
        assert shared.num_rows == 0, root
    grown_keep = query(pool, "select uid, keep, dedup_keep, image_target from samples order by uid")
    assert grown_keep.equals(query(Pool(tmp_path / "fresh"), "select uid, keep, dedup_keep, image_target "
                                                            "from samples order by uid"))  # fmt: skip

    before = _finished(pool)
    run(str(config))  # run 3: nothing new
    assert _visible(out) == ["latest", "v0001", "v0002"]
    assert _finished(pool) == before  # no stage redid a shard
    assert "Nothing new" in Artifact.get("curate-cycle").data


def test_an_ingested_file_that_changed_is_named_and_nothing_changes(tmp_path, image_server):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    pq.write_table(point_at(laion_rows(300, offset=100), image_server), inputs / "a.parquet")
    cfg = make_config(tmp_path / "pool", inputs, samples_per_shard=100)
    config = write_config(tmp_path / "c.yaml", cfg)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cli = [sys.executable, "-m", "pipeline.cli", "prepare", str(config)]
    subprocess.run(cli, check=True, env=env, capture_output=True)
    pool = Pool(tmp_path / "pool")
    state = _digests(pool.root / "input")
    pq.write_table(point_at(laion_rows(300, offset=150), image_server), inputs / "a.parquet")  # rewritten
    pq.write_table(point_at(laion_rows(50, offset=900), image_server), inputs / "b.parquet")  # and a new file
    done = subprocess.run(cli, env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert str(inputs / "a.parquet") in line and "changed since the pool ingested" in line
    assert _digests(pool.root / "input") == state  # the new file was not taken in either


def test_a_quality_recipe_runs_through_the_flow_and_explains_every_drop(tmp_path, image_server, prefect_harness,
                                                                        tiny_checkpoint):  # fmt: skip
    """``curate run``'s flow with the quality signals: a further scorer and LAION's watermark detector
    in the embed pass, the aesthetic and NSFW heads, and a recipe over all four; a second run with
    other thresholds re-decides without re-scoring, and every drop is the first rule the sample fails."""
    import numpy as np

    from flows.curate import run
    from pipeline.config import HeadConfig, QualityConfig, ScorerConfig, WatermarkConfig
    from pipeline.embed import save_random_checkpoint
    from pipeline.query import query
    from tests.test_quality import published, save, save_watermark

    pq.write_table(point_at(laion_rows(200, offset=5000), image_server), tmp_path / "u.parquet")
    second = save_random_checkpoint("clipcurate-tiny", tmp_path / "dfn.safetensors", seed=1)
    marks, _ = save_watermark(tmp_path / "watermark_model_v1.pt")
    heads = save(published("aesthetic-mlp", 128), tmp_path / "a.pth"), save(published("nsfw-autokeras", 128, seed=3),
                                                                             tmp_path / "n.safetensors")  # fmt: skip
    quality = QualityConfig(aesthetic=HeadConfig(weights=str(heads[0])), nsfw=HeadConfig(weights=str(heads[1])))
    embed = dataclasses.replace(embed_cfg(tiny_checkpoint, workers=0),
                                scorers=(ScorerConfig(name="dfn", model="clipcurate-tiny", checkpoint=str(second)),),
                                watermark=WatermarkConfig(weights=str(marks), model="test_efficientnet"))  # fmt: skip

    def curate(rules: list[str]) -> dict:
        cfg = dataclasses.replace(make_config(tmp_path / "pool", tmp_path / "u.parquet", samples_per_shard=100),
                                  embed=embed, quality=quality,
                                  filters=FilterConfig(recipe="q", recipes={"q": rules}), report=True)  # fmt: skip
        return run(str(write_config(tmp_path / "c.yaml", cfg)))

    curate(["english", "aesthetic(min=-1000.0)", "nsfw(max=1.0)", "watermark(max=1.1)"])
    pool = Pool(str(tmp_path / "pool"))
    scored = {stage: {s: m["finished_at"] for s, m in pool.completed(stage).items()} for stage in ("embed", "quality")}
    scores = query(pool, "select aesthetic, nsfw, watermark, clip_score_dfn from samples where aesthetic is not null")
    a_min, n_max, w_max = (float(np.median(scores[c].to_numpy())) for c in ("aesthetic", "nsfw", "watermark"))
    rules = ["english", f"aesthetic(min={a_min!r})", f"nsfw(max={n_max!r})", "clip_score(score=dfn, fraction=0.8)",
             f"watermark(max={w_max!r})"]  # fmt: skip
    manifest = curate(rules)
    assert {stage: {s: m["finished_at"] for s, m in pool.completed(stage).items()}
            for stage in ("embed", "quality")} == scored  # re-decided, not re-scored  # fmt: skip
    dfn = scores["clip_score_dfn"].to_numpy()
    threshold = np.sort(dfn)[::-1][int(len(dfn) * 0.8)]  # DataComp's get_threshold over the embedded samples
    rows = query(pool, "select status, decode_error, lang, aesthetic, nsfw, clip_score_dfn, watermark, keep, "
                       "drop_reason from samples").to_pylist()  # fmt: skip
    tests = [("downloaded", lambda r: r["status"] == "success"),
             ("decode_error", lambda r: r["decode_error"] is None), ("english", lambda r: r["lang"] == "en"),
             ("aesthetic", lambda r: r["aesthetic"] > a_min), ("nsfw", lambda r: r["nsfw"] <= n_max),
             ("clip_score", lambda r: r["clip_score_dfn"] >= threshold),
             ("watermark", lambda r: r["watermark"] < w_max)]  # fmt: skip
    drops: dict[str, int] = {}
    for r in rows:
        first = next((name for name, ok in tests if not ok(r)), None)
        assert (r["drop_reason"], r["keep"]) == (first, first is None), r
        drops[first] = drops.get(first, 0) + 1
    assert all(drops.get(name, 0) > 0 for name in ("aesthetic", "nsfw", "clip_score", "watermark")), drops
    assert manifest["stage_results"]["decisions"]["drop_reasons"] == {k: v for k, v in drops.items() if k}
    page = (pool.root / "report" / "index.html").read_text()
    for name in ("aesthetic", "nsfw", "watermark", "clip_score_dfn"):
        assert f"src='{name}.png'" in page, name


def test_worldwide_metaclip_runs_through_the_flow_with_each_captions_language(tmp_path, image_server, prefect_harness):
    """``curate run`` with ``metaclip.worldwide``: the caption scores run first (the language comes
    from them), each downloaded caption is matched against its language's list, and the release's
    card shows the per-language table."""
    from wordfreq import top_n_list

    from flows.curate import run
    from pipeline.query import query

    lists = tmp_path / "metadata"
    lists.mkdir()
    (lists / "en.json").write_text((REPO / "metadata/entries.json").read_text())
    for lang in ("fr", "de", "es"):
        (lists / f"{lang}.json").write_text(json.dumps([str(i) for i in range(100)] + top_n_list(lang, 5000)))
    pq.write_table(point_at(laion_rows(400, offset=6000), image_server), tmp_path / "u.parquet")
    cfg = make_config(tmp_path / "pool", tmp_path / "u.parquet", samples_per_shard=100, shards_per_task=2)
    cfg = dataclasses.replace(
        cfg,
        metaclip=MetaclipConfig(metadata=str(REPO / "metadata/entries.json"), t=3, worldwide=True,
                                metadata_dir=str(lists)),
        filters=FilterConfig(recipe="mine", recipes={"mine": ["caption_words"]}),
        export=ExportConfig(out=str(tmp_path / "release"), where="metaclip_keep and keep", samples_per_shard=100),
    )
    manifest = run(str(write_config(tmp_path / "c.yaml", cfg)))
    pool = Pool(cfg.pool)
    languages = {r["lang"]: r for r in manifest["stage_results"]["metaclip"]["worldwide"]["languages"]}
    downloaded = query(pool, "select count(*) as n from samples where status = 'success'")["n"][0].as_py()
    assert sum(r["samples"] for r in languages.values()) == downloaded  # only downloaded samples count
    by_lang = query(pool, "select lang, count(*) as n, count(*) filter (where len(matched_entry_ids) > 0) as m "
                          "from samples where status = 'success' group by 1")  # fmt: skip
    seen = {r["lang"]: r for r in by_lang.to_pylist()}
    for lang in ("fr", "de", "es"):
        assert languages[lang]["samples"] == seen.get(lang, {}).get("n", 0), lang
    assert all(seen[lang]["n"] > 3 and seen[lang]["m"] > 0 for lang in ("fr", "de"))
    assert languages["other"]["kept"] == 0 and languages["en"]["kept"] > 0
    kept = query(pool, "select count(*) as n from samples where metaclip_keep and keep")["n"][0].as_py()
    assert manifest["release"]["counts"]["samples"] == kept > 0
    card = (tmp_path / "release" / "README.md").read_text()
    assert "MetaCLIP 2 worldwide balancing, per language" in card and "| fr |" in card


def test_a_scheduled_cycle_retries_the_transient_failures_of_earlier_runs(tmp_path, prefect_harness):
    """``download.retry`` in the config: the first run downloads from a failing server; when it
    recovers, the next run (nothing else new) retries the ``http_5xx`` rows once, recovers them and
    redoes MetaCLIP only on the shards it rewrote; a third run finds nothing due and is skipped."""
    from flows.curate import run
    from pipeline.devserver import DemoImageServer, fails, kind_of, token_for

    rows = laion_rows(90, offset=5200)
    with DemoImageServer(fail_share=0.2) as server:
        good = ("ok", "duplicate", "near_duplicate")  # kind_of: what the server answers with an image
        failing = [i for i, u in enumerate(rows["url"].to_pylist()) if fails(token_for(u), 0.2)
                   and kind_of(token_for(u)) in good]  # fmt: skip
        pq.write_table(point_at(rows, server), tmp_path / "u.parquet")
        cfg = make_config(tmp_path / "pool", tmp_path / "u.parquet", samples_per_shard=30, retry=("http_5xx",))
        cfg = dataclasses.replace(cfg, metaclip=MetaclipConfig(metadata=str(REPO / "metadata/entries.json"), t=3))
        config = write_config(tmp_path / "c.yaml", cfg)
        run(str(config))
        pool = Pool(cfg.pool)
        status = dict(zip(*(pool.read_table("download")[c].to_pylist() for c in ("row", "status")), strict=True))
        assert failing and all(status[i] == "failed_to_download" for i in failing)
        match_before = {s: pool.marker_path("metaclip_match", s).stat().st_mtime_ns for s in range(3)}

        server.flaky()  # the web recovers
        run(str(config))
        table = pool.read_table("download")
        status = dict(zip(table["row"].to_pylist(), table["status"].to_pylist(), strict=True))
        attempts = dict(zip(table["row"].to_pylist(), table["attempts"].to_pylist(), strict=True))
        assert all(status[i] == "success" and attempts[i] == 2 for i in failing)
        match_after = {s: pool.marker_path("metaclip_match", s).stat().st_mtime_ns for s in range(3)}
        retried = {i // 30 for i in failing}
        assert {s for s in range(3) if match_after[s] != match_before[s]} == retried

        run(str(config))  # nothing left to retry (every http_5xx row recovered): the cycle is skipped
        from prefect.artifacts import Artifact

        assert "Nothing new" in Artifact.get("curate-cycle").data
