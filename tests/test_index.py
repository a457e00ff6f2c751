"""``curate index`` and ``curate search`` on an embedded pool (tiny CLIP, random weights from a file).

The expected neighbours are an exhaustive numpy search over the embed tables as stored, read here
with pyarrow; the index under test is never asked for them.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.engines.local import LocalEngine
from pipeline.errors import UserError
from pipeline.index import build_index
from pipeline.index.search import Searcher, query_vector, search
from pipeline.store.parquet import Pool


@pytest.fixture()
def pool(clustered, tmp_path):
    return Pool(shutil.copytree(clustered[0].root, tmp_path / "pool"))


def _stored(pool: Pool) -> tuple[list[str], np.ndarray]:
    """Every stored image vector, L2-normalised, read straight from the files."""
    uids, rows = [], []
    for path in sorted((pool.root / "tables" / "embed").glob("*.parquet")):
        t = pq.read_table(path, columns=["uid", "image_embedding"])
        for uid, v in zip(t["uid"].to_pylist(), t["image_embedding"].to_pylist(), strict=True):
            if v is not None:
                uids.append(uid)
                rows.append(np.asarray(v, np.float32))
    x = np.stack(rows)
    return uids, x / np.linalg.norm(x, axis=1, keepdims=True)


def _exact(pool: Pool, uid: str, k: int) -> list[str]:
    uids, x = _stored(pool)
    scores = x @ x[uids.index(uid)]
    return [uids[i] for i in np.argsort(-scores, kind="stable")[:k]]


def test_an_exact_index_finds_what_an_exhaustive_search_finds(pool):
    manifest = build_index(pool, LocalEngine(2), progress=False)
    assert manifest["kind"] == "flat" and manifest["rows"] == len(_stored(pool)[0])
    uids, _ = _stored(pool)
    for uid in uids[:: max(1, len(uids) // 10)]:
        hits = search(pool, query_vector(pool, "image", uid=uid), k=10)
        assert hits["uid"].to_pylist()[0] == uid and abs(hits["score"][0].as_py() - 1) < 1e-4
        assert set(hits["uid"].to_pylist()[1:9]) <= set(_exact(pool, uid, 12))  # ties at the edge aside


def test_an_ivf_index_recalls_the_exact_neighbours_and_grows_with_the_pool(pool):
    embed_marker = pool.marker_path("embed", 3)
    held = embed_marker.read_bytes()
    embed_marker.unlink()  # shard 3 not embedded yet: the pool grows by it later
    first = build_index(pool, LocalEngine(2), exact_below=0, progress=False)
    assert first["kind"] == "ivf" and first["factory"].endswith(",SQ8") and first["encoded"] == [0, 1, 2]
    embed_marker.write_bytes(held)
    assert "1 new" in Searcher(pool).stale()
    grown = build_index(pool, LocalEngine(2), exact_below=0, progress=False)
    assert grown["encoded"] == [3] and grown["trained"] == first["trained"]  # the quantizer is kept
    folder = pool.root / "index" / "image"
    assert not any((folder / f).exists() for f in first["files"])  # the previous build's files are gone
    assert all((folder / f).exists() for f in grown["files"])
    again = build_index(pool, LocalEngine(2), exact_below=0, progress=False)
    assert again["encoded"] == [] and again["digest"] == grown["digest"]
    assert Searcher(pool).stale() is None
    uids, _ = _stored(pool)
    recall = []
    for uid in uids[::15]:
        hits = search(pool, query_vector(pool, "image", uid=uid), k=10)["uid"].to_pylist()
        recall.append(len(set(hits) & set(_exact(pool, uid, 10))) / 10)
    assert np.mean(recall) >= 0.9, recall  # every list visited (nprobe >= nlist): only SQ8's rounding


def test_a_text_query_uses_the_pools_checkpoint_and_where_narrows_the_hits(pool):
    build_index(pool, LocalEngine(2), progress=False)
    vector = query_vector(pool, "image", text="a photo of a dog")
    assert vector.shape == (1, 64) or vector.shape[0] == 1
    hits = search(pool, vector, k=8, where="original_width > 300")
    assert hits.num_rows == 8 and all(np.diff(hits["score"].to_numpy()) <= 1e-6)
    from pipeline.query import connect

    con = connect(pool)
    wide = {u for u, in con.execute("select uid from samples where original_width > 300").fetchall()}
    con.close()
    assert set(hits["uid"].to_pylist()) <= wide


@pytest.mark.parametrize("where", ["1=1; drop table download", "read_text('/etc/passwd') is not null",
                                   "uid in (select uid from read_parquet('/etc/*.parquet'))"])
def test_a_search_predicate_is_one_confined_expression(pool, where):
    build_index(pool, LocalEngine(2), progress=False)
    uid = _stored(pool)[0][0]
    with pytest.raises(UserError):
        search(pool, query_vector(pool, "image", uid=uid), k=5, where=where)


def test_a_pool_without_an_index_or_a_checkpoint_is_told_what_to_do(pool, tmp_path):
    with pytest.raises(UserError, match="curate index"):
        Searcher(pool)
    recorded = pool.root / "completions" / "embed" / "config.json"
    config = json.loads(recorded.read_text())
    config["config"]["checkpoint"] = str(tmp_path / "gone.safetensors")
    recorded.write_text(json.dumps(config))
    with pytest.raises(UserError, match="is not there"):
        query_vector(pool, "image", text="a dog")


def test_curate_index_and_search_from_the_command_line(pool, capsys):
    from pipeline.cli import main

    assert main(["index", str(pool.root)]) == 0
    assert "image index" in capsys.readouterr().out
    uid = _stored(pool)[0][0]
    assert main(["search", str(pool.root), "--uid", uid, "-k", "5", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 5 and rows[0]["uid"] == uid and [r["rank"] for r in rows] == [1, 2, 3, 4, 5]


def test_segments_search_as_one_index_and_only_a_changed_segment_is_merged_again(pool):
    whole = build_index(pool, LocalEngine(2), exact_below=0, progress=False)
    uids, _ = _stored(pool)
    queries = [query_vector(pool, "image", uid=u) for u in uids[::25]]
    one = [search(pool, q, k=10)["uid"].to_pylist() for q in queries]
    shutil.rmtree(pool.root / "index")
    cut = build_index(pool, LocalEngine(2), exact_below=0, segment_rows=100, progress=False)
    assert [s["shards"] for s in cut["segments"]] == [[0], [1], [2, 3]]  # shard 3: the ftp row, no vector
    assert cut["rows"] == whole["rows"]
    many = [search(pool, q, k=10)["uid"].to_pylist() for q in queries]
    assert many == one  # each segment's best, merged: what one index over every shard finds
    marker = pool.marker_path("embed", 2)  # shard 2 re-embedded under another digest
    record = json.loads(marker.read_text())
    record["config_hash"] = "another-model"
    marker.write_text(json.dumps(record))
    again = build_index(pool, LocalEngine(2), exact_below=0, segment_rows=100, progress=False)
    assert again["encoded"] == [2] and again["merged"] == [2]
