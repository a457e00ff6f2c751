"""A pool and a release you can trust: each hostile case of the trust issue, reproduced on a copy of
a small pool, asserting what the user sees (exit code, a message naming the file or key) and that
nothing was lost (the pool's sha256 before and after, nothing written outside the pool or release).

The pool: the embedded, clustered 301-row test pool, MetaCLIP-balanced (t=3) and filtered with the
``basic`` recipe. Each test works on its own copy, from an empty working directory.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from pipeline.cli import main
from pipeline.config import FilterConfig, parse_config
from pipeline.engines.local import LocalEngine
from tests.conftest import REPO, STAGES_AFTER_MODE, copy_pool, embed_cfg, laion_rows, point_at


def _metaclip_cfg():
    settings = {"metadata": str(REPO / "metadata/entries.json"), "t": 3}
    return parse_config({"pool": "p", "download": {"input": "u"}, "metaclip": settings}).metaclip


@pytest.fixture(scope="module")
def base(clustered, tmp_path_factory):
    from pipeline.filters.stage import run_filters
    from pipeline.metaclip.stage import run_metaclip

    pool = copy_pool(clustered[0], tmp_path_factory.mktemp("trust") / "pool", STAGES_AFTER_MODE)
    run_metaclip(pool, _metaclip_cfg(), LocalEngine(2), progress=False)
    run_filters(pool, FilterConfig(recipe="basic"), LocalEngine(2), progress=False)
    return pool


@pytest.fixture
def pool(base, tmp_path, monkeypatch):
    """A copy of the base pool at ``tmp_path/pool``; the working directory is ``tmp_path/cwd``."""
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return copy_pool(base, tmp_path / "pool")


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("curate:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def count(pool, sql: str) -> int:
    from pipeline.query import query

    return query(pool, sql).column(0)[0].as_py()


def release_samples(out: Path) -> dict[tuple[int, str], dict]:
    """The release's samples (WebDataset's reader) by their pool (shard, key), from the sidecars."""
    sidecar = pq.read_table(sorted(out.glob("*.parquet")), columns=["key", "source_shard", "source_key"])
    source = {k: (s, sk) for k, s, sk in zip(*(sidecar[c].to_pylist() for c in sidecar.column_names), strict=True)}
    samples = wds.WebDataset(sorted(str(p) for p in out.glob("*.tar")), shardshuffle=False)
    return {source[s["__key__"]]: s for s in samples}


# 1. Data loss: export --out never removes what the tool did not make -------------------------------


def test_export_refuses_every_folder_it_did_not_make(pool, tmp_path, capsys):
    sibling = copy_pool(pool, tmp_path / "sibling")
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    before = {p: snapshot(p) for p in (pool.root, sibling.root, user)}
    cases = {
        user: "not empty and not a clipcurate release",
        pool.root: "inside its data",
        tmp_path: "contains the pool",  # the pool's parent, holding a sibling pool too
        pool.root / "tables": "inside its data",
        pool.root / "completions" / "new": "inside its data",
        pool.root / "manifest.json": "inside its data",
        pool.root / ".hidden": "inside its data",
    }
    for out, why in cases.items():
        code, _, err = cli(capsys, "export", pool.root, "--out", out, "--where", "keep")
        assert code == 2 and f"--out {out}: " in one_line(err) and why in err
    assert {p: snapshot(p) for p in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "pool", "sibling", "user"]
    assert not any((tmp_path / "cwd").iterdir())
    # a new folder directly in the pool (the demo's `<pool>/release`) is not the pool's data
    assert cli(capsys, "export", pool.root, "--out", pool.root / "release", "--where", "keep")[0] == 0
    after = snapshot(pool.root)
    assert {k: v for k, v in after.items() if not k.startswith(("release/", ".release."))} == before[pool.root]


def test_replacing_a_release_is_explicit_and_keeps_the_users_files(pool, tmp_path, capsys):
    out = tmp_path / "rel"
    assert cli(capsys, "export", pool.root, "--out", out, "--where", "keep", "--samples-per-shard", "50")[0] == 0
    first = snapshot(out)
    code, _, err = cli(capsys, "export", pool.root, "--out", out, "--where", "keep and metaclip_keep")
    assert code == 2 and "holds another release" in one_line(err) and "--overwrite" in err
    assert snapshot(out) == first  # refused: the release is untouched
    (out / "notes.txt").write_text("mine")
    code, _, err = cli(capsys, "export", pool.root, "--out", out, "--where", "keep", "--overwrite")
    assert code == 2 and "notes.txt" in one_line(err) and "not part of its release" in err
    assert {k: v for k, v in snapshot(out).items() if k != "notes.txt"} == first
    (out / "notes.txt").unlink()
    where = "keep and metaclip_keep"
    assert cli(capsys, "export", pool.root, "--out", out, "--where", where, "--overwrite")[0] == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["where"] == where and manifest["format"] == "clipcurate-release/1"
    selected = count(pool, f"select count(*) from samples where status = 'success' and {where}")
    assert manifest["counts"]["samples"] == selected
    # nothing beside the release but its (empty) lock file; nothing in the working directory
    assert sorted(p.name for p in tmp_path.iterdir()) == [".rel.lock", "cwd", "pool", "rel"]
    assert not any((tmp_path / "cwd").iterdir())


# 2. A table missing a column is named, never read as NULLs ----------------------------------------


def test_a_table_missing_a_column_is_named_and_redone(pool, tmp_path, capsys):
    from pipeline.metaclip.stage import run_metaclip

    kept = count(pool, "select count(*) from samples where metaclip_keep")
    path = pool.table_path("metaclip", 1)
    pq.write_table(pq.read_table(path).drop_columns(["metaclip_keep"]), path)
    before = snapshot(pool.root)
    code, _, err = cli(capsys, "query", pool.root, "select count(*) from samples where metaclip_keep")
    assert code == 2 and str(path) in one_line(err)
    code, _, err = cli(capsys, "export", pool.root, "--out", tmp_path / "rel", "--where", "metaclip_keep and keep")
    assert code == 2 and str(path) in one_line(err) and "metaclip" in err
    code, out, _ = cli(capsys, "verify", pool.root)
    assert code == 1 and f"DAMAGED {path}" in out and "curate metaclip" in out
    assert snapshot(pool.root) == before and not (tmp_path / "rel").exists()
    # also when its marker was rewritten to match (a buggy writer): the schema check still names it
    pool.mark_done("metaclip", 1, pool.marker("metaclip", 1)["config_hash"], pool.marker("metaclip", 1)["counts"])
    code, _, err = cli(capsys, "query", pool.root, "select count(*) from samples where metaclip_keep")
    assert code == 2 and str(path) in one_line(err) and "metaclip_keep" in err and "curate metaclip" in err
    # the same file modified after its marker: the next run of the stage redoes the shard
    pq.write_table(pq.read_table(path), path)
    path.write_bytes(path.read_bytes())  # new mtime; same bytes: still intact
    os.truncate(path, path.stat().st_size - 1)
    run_metaclip(pool, _metaclip_cfg(), LocalEngine(1), progress=False)
    assert count(pool, "select count(*) from samples where metaclip_keep") == kept


# 3. Incomplete stages are stated, and refused by a release that needs them -------------------------


def test_an_incomplete_stage_is_refused_unless_allowed_and_recorded(pool, tmp_path, capsys):
    pool.marker_path("embed", 2).unlink()  # what an interrupted embed run leaves
    before = snapshot(pool.root)
    code, _, err = cli(capsys, "export", pool.root, "--out", tmp_path / "rel", "--embeddings")
    assert code == 2 and "unfinished stage(s): embed" in one_line(err) and "missing 00002" in err
    assert "--allow-incomplete" in err
    assert not (tmp_path / "rel").exists()
    code, _, err = cli(capsys, "export", pool.root, "--out", tmp_path / "rel", "--embeddings", "--allow-incomplete")
    assert code == 0 and "incomplete stages ['embed']" in err
    manifest = json.loads((tmp_path / "rel" / "manifest.json").read_text())
    assert manifest["allow_incomplete"] is True and manifest["incomplete_stages"]["embed"]["missing"] == [2]
    embeddings = pq.read_table(tmp_path / "rel" / "embeddings").column("image_embedding")
    assert embeddings.null_count == 0 and len(embeddings) == manifest["counts"]["samples"]
    assert "incomplete" in (tmp_path / "rel" / "README.md").read_text()
    code, _, err = cli(capsys, "query", pool.root, "select count(*) from samples")
    assert code == 0 and "embed" in err and "incomplete" in err
    code, out, _ = cli(capsys, "stats", pool.root)
    assert code == 0 and "INCOMPLETE" in out
    code, _, _ = cli(capsys, "report", pool.root, "--out", tmp_path / "report")
    assert code == 0 and "incomplete" in (tmp_path / "report" / "index.html").read_text().lower()
    assert snapshot(pool.root) == before


# 4. Broken samples never reach a release ----------------------------------------------------------


def _png_bomb() -> bytes:
    """A real 1x1 PNG whose header claims 30000x30000 (CRC fixed): a decompression bomb."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = (30000).to_bytes(4, "big") * 2
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def plant_broken_samples(pool, shard: int, keys: list[str]) -> dict[str, str]:
    """Rewrite ``shard``'s tar: the first key's image becomes a PNG bomb, the second's a 0-byte jpg,
    the third's a symlink, the fourth's caption invalid UTF-8; the download marker is re-recorded
    (the state of a pool downloaded that way) and the shard's later stages forgotten."""
    kinds = dict(zip(keys, ("bomb", "empty", "symlink", "latin1"), strict=True))
    tar_path = pool.shard_tar(shard)
    members = []
    with tarfile.open(tar_path) as tar:
        for m in tar.getmembers():
            members.append((m, tar.extractfile(m).read()))
    with tarfile.open(tar_path, "w") as tar:
        for m, data in members:
            key, ext = m.name.rsplit(".", 1)
            kind = kinds.get(key)
            if kind == "bomb" and ext == "jpg":
                m, data = tarfile.TarInfo(f"{key}.png"), _png_bomb()
            elif kind == "empty" and ext == "jpg":
                data = b""
            elif kind == "symlink" and ext == "jpg":
                m, data = tarfile.TarInfo(f"{key}.jpg"), None
                m.type, m.linkname = tarfile.SYMTYPE, "/etc/passwd"
            elif kind == "latin1" and ext == "txt":
                data = "café au lait".encode("latin-1")
            if data is not None:
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data) if data is not None else None)
    marker = pool.marker("download", shard)
    files = [pool.root / rel for rel in marker["files"]]
    pool.mark_done("download", shard, marker["config_hash"], marker["counts"], files=files)
    pool.forget_shard(shard, keep=("download",))
    return kinds


def _four_keys(pool, where: str) -> list[str]:
    from pipeline.query import query

    sql = f"select key from samples where shard = 0 and status = 'success' and {where} order by key limit 4"
    keys = query(pool, sql)["key"].to_pylist()
    assert len(keys) == 4
    return keys


def test_undecodable_samples_get_decode_error_and_never_ship(pool, tmp_path, capsys, tiny_checkpoint):
    from pipeline.embed import run_embed
    from pipeline.filters.stage import run_filters
    from pipeline.query import query

    kinds = plant_broken_samples(pool, 0, _four_keys(pool, "keep"))  # each was kept, and would have shipped
    run_embed(pool, embed_cfg(tiny_checkpoint, workers=0), LocalEngine(1), progress=False)
    run_filters(pool, FilterConfig(recipe="basic"), LocalEngine(2), progress=False)
    keys = ", ".join(f"'{k}'" for k in kinds)
    rows = query(pool, f"select key, keep, drop_reason, decode_error from samples where shard = 0 and key in ({keys})")
    assert rows["keep"].to_pylist() == [False] * 4 and set(rows["drop_reason"].to_pylist()) == {"decode_error"}
    errors = dict(zip(rows["key"].to_pylist(), rows["decode_error"].to_pylist(), strict=True))
    assert all(e and not re.search(r"at 0x[0-9a-f]+", e) for e in errors.values()), errors  # no object address
    bomb = next(k for k, v in kinds.items() if v == "bomb")
    assert "pixels" in errors[bomb] or "bomb" in errors[bomb].lower()
    out = tmp_path / "rel"
    code, _, _ = cli(capsys, "export", pool.root, "--out", out, "--where", "true")
    assert code == 0
    samples = release_samples(out)
    assert not {(0, k) for k in kinds} & set(samples) and any(shard == 0 for shard, _ in samples)
    assert all(len(s.get("jpg", s.get("png", b""))) > 0 for s in samples.values())
    assert all(s["txt"].decode("utf-8") is not None for s in samples.values())
    expected = count(pool, "select count(*) from samples where status = 'success' and decode_error is null")
    assert len(samples) == expected


def test_a_never_embedded_pool_leaves_out_undecodable_images_and_repairs_captions(
        downloaded_pool, tmp_path, capsys, monkeypatch):  # fmt: skip
    from pipeline.query import query

    monkeypatch.chdir(tmp_path)
    pool = copy_pool(downloaded_pool[0], tmp_path / "pool", ("embed", "caption_embed", "mode", *STAGES_AFTER_MODE))
    kinds = plant_broken_samples(pool, 0, _four_keys(pool, "true"))
    out = tmp_path / "rel"
    code, _, _ = cli(capsys, "export", pool.root, "--out", out)
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["left_out_without_image"] == 3 and manifest["counts"]["captions_repaired"] == 1
    samples = release_samples(out)
    latin1 = next(k for k, v in kinds.items() if v == "latin1")
    assert samples[(0, latin1)]["txt"].decode("utf-8") == "caf\ufffd au lait"  # the documented repair
    assert not {(0, k) for k, v in kinds.items() if v != "latin1"} & set(samples)
    assert all(len(s.get("jpg", s.get("png", b""))) > 0 for s in samples.values())
    success = query(pool, "select count(*) as n from download where status = 'success'")["n"][0].as_py()
    assert len(samples) == success - 3


# 5. SQL beyond one expression is refused; user SQL reads only the pool ----------------------------


def test_sql_is_one_expression_or_one_select_confined_to_the_pool(pool, tmp_path, capsys):
    before = snapshot(pool.root)
    injection = "true) ; COPY (select 42) TO 'x.csv'; select 1 where (true"
    code, _, err = cli(capsys, "export", pool.root, "--out", tmp_path / "rel", "--where", injection)
    assert code == 2 and "where: must be one SQL expression" in one_line(err)
    for where in ("read_text('/etc/passwd') is not null", "uid in (select content from read_text('/etc/passwd'))"):
        code, _, err = cli(capsys, "export", pool.root, "--out", tmp_path / "rel", "--where", where)
        assert code == 2, err
        one_line(err)
    code, _, err = cli(capsys, "query", pool.root, "select content from read_text('/etc/passwd')")
    assert code == 2 and "/etc/passwd" in one_line(err)
    code, _, err = cli(capsys, "query", pool.root, f"COPY (select 42) TO '{tmp_path / 'x.csv'}'")
    assert code == 2 and "one SELECT" in one_line(err)
    code, _, err = cli(capsys, "query", pool.root, "select 1; select 2")
    assert code == 2 and "one SELECT" in one_line(err)
    code, _, err = cli(capsys, "query", pool.root, f"select * from read_parquet('{REPO / 'data/laion_10k.parquet'}')")
    assert code == 2 and "laion_10k.parquet" in one_line(err)
    # a config written by someone else: refused when it is loaded
    config = tmp_path / "cfg.yaml"
    export = f"export: {{out: {tmp_path / 'rel'}, where: \"{injection}\"}}"
    config.write_text(f"pool: {pool.root}\ndownload: {{input: u}}\n{export}\n")
    code, _, err = cli(capsys, "query", pool.root, "--name", "x", "--config", config)
    assert code == 2 and "export.where" in one_line(err)
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "cwd" / "x.csv").exists()
    assert not (tmp_path / "rel").exists() and snapshot(pool.root) == before
    # what is allowed: any one SELECT over the pool's views
    code, out, _ = cli(capsys, "query", pool.root, "select count(*) as n from samples where keep", "--format", "json")
    assert code == 0 and json.loads(out)["n"] > 0


# 6. A read-only pool is read without writing into it ----------------------------------------------


def _without_write_access(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run ``curate ARGS`` on a pool made read-only (``chmod -R a-w``); as root, without the
    capabilities that let root write anything (``setpriv`` empties the bounding set)."""
    cmd = [str(Path(sys.executable).parent / "curate"), *args]
    if os.geteuid() == 0:
        cmd = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", *cmd]
    scratch = cwd.parent / "tmpdir"  # the process's temp dir: a confined reader's spill folder goes here
    scratch.mkdir(exist_ok=True)
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TMPDIR": str(scratch)})  # fmt: skip


def test_a_read_only_pool_is_read_and_never_written(pool, tmp_path):
    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: no way to lose write access")
    cwd, outputs = tmp_path / "cwd", tmp_path / "outputs"
    outputs.mkdir()
    subprocess.run(["chmod", "-R", "a-w", str(pool.root)], check=True)
    try:
        probe = _without_write_access(["stats", str(pool.root)], cwd)
        before = snapshot(pool.root)
        for args in (["stats", pool.root], ["query", pool.root, "select count(*) from samples where keep"],
                     ["report", pool.root, "--out", outputs / "report"],
                     ["export", pool.root, "--out", outputs / "rel", "--where", "keep"],
                     ["verify", pool.root]):  # fmt: skip
            done = _without_write_access([str(a) for a in args], cwd)
            assert done.returncode == 0, (args, done.stderr)
        assert probe.returncode == 0
        assert (outputs / "report" / "index.html").exists() and (outputs / "rel" / "manifest.json").exists()
        done = _without_write_access(["filter", str(pool.root), "--recipe", "basic"], cwd)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert f"curate: {pool.root}: cannot be written" in done.stderr
        assert snapshot(pool.root) == before and not any(cwd.iterdir())
        assert not list((tmp_path / "tmpdir").glob("clipcurate-query-*"))  # each reader removed its spill folder
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(pool.root)], check=True)


# 7. Damage is named, found by verify, and repaired by re-running the stage -------------------------


def test_flipped_bytes_in_a_table_are_named(pool, tmp_path, capsys):
    path = pool.table_path("decisions", 1)  # where `keep` lives
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 64):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    before = snapshot(pool.root)
    code, _, err = cli(capsys, "query", pool.root, "select count(*) from samples where keep")
    assert code == 2 and str(path) in one_line(err) and "sha256" in err
    code, _, err = cli(capsys, "export", pool.root, "--out", tmp_path / "rel", "--where", "keep")
    assert code == 2 and str(path) in one_line(err)
    code, _, err = cli(capsys, "export", pool.root, "--out", tmp_path / "rel", "--where", "metaclip_keep")
    assert code == 2 and str(path) in one_line(err)  # the sidecars would carry the damaged `keep` column
    code, out, _ = cli(capsys, "stats", pool.root)
    assert code == 0 and f"DAMAGED {path}" in out
    code, out, _ = cli(capsys, "verify", pool.root)
    assert code == 1 and f"DAMAGED {path}" in out and "curate filter" in out
    assert snapshot(pool.root) == before and not (tmp_path / "rel").exists()
    code, _, _ = cli(capsys, "filter", pool.root, "--recipe", "basic")
    assert code == 0 and cli(capsys, "verify", pool.root)[0] == 0


def test_a_truncated_tar_is_named_and_redownloaded(pool, tmp_path, capsys, image_server):
    tar = pool.shard_tar(2)
    os.truncate(tar, tar.stat().st_size // 2)
    before = snapshot(pool.root)
    code, _, err = cli(capsys, "export", pool.root, "--out", tmp_path / "rel", "--where", "keep")
    assert code == 2 and str(tar) in one_line(err) and "truncated" in err
    code, out, _ = cli(capsys, "stats", pool.root)
    assert code == 0 and f"DAMAGED {tar}" in out
    code, out, _ = cli(capsys, "verify", pool.root)
    assert code == 1 and f"DAMAGED {tar}" in out and "curate download" in out
    assert snapshot(pool.root) == before and not (tmp_path / "rel").exists()
    # the download run redoes the shard, and the shard's later stages are redone after it
    from pipeline.download import run_download

    run_download(pool, _download_cfg(pool, image_server, tmp_path), LocalEngine(2), progress=False)
    assert tar.stat().st_size > 0 and pool.is_done("download", 2)
    assert not pool.marker_path("filters", 2).exists() and not pool.marker_path("embed", 2).exists()
    code, out, _ = cli(capsys, "verify", pool.root)
    assert code == 0, out


def _download_cfg(pool, server, tmp_path):
    rows = point_at(laion_rows(300), server)
    rows = pa.concat_tables([rows, pa.table({"url": ["ftp://example.com/a.jpg"], "caption": ["an ftp url"]})])
    url_list = tmp_path / "urls.parquet"
    pq.write_table(rows, url_list)
    from tests.conftest import make_config

    return make_config(pool.root, url_list).download


def test_a_deleted_table_is_named_and_restored_by_the_stage(pool, tmp_path, capsys):
    from pipeline.metaclip.stage import run_metaclip

    kept = count(pool, "select count(*) from samples where metaclip_keep")
    path = pool.table_path("metaclip", 3)
    path.unlink()
    before = snapshot(pool.root)
    code, out, _ = cli(capsys, "stats", pool.root)
    assert code == 0 and f"DAMAGED {path}" in out and "missing" in out
    code, _, err = cli(capsys, "query", pool.root, "select count(*) from samples")
    assert code == 2 and str(path) in one_line(err)
    code, _, err = cli(capsys, "export", pool.root, "--out", tmp_path / "rel", "--where", "metaclip_keep")
    assert code == 2 and str(path) in one_line(err)
    assert snapshot(pool.root) == before
    run_metaclip(pool, _metaclip_cfg(), LocalEngine(1), progress=False)
    assert path.exists() and count(pool, "select count(*) from samples where metaclip_keep") == kept


# 8. Smaller ones ----------------------------------------------------------------------------------


def test_a_non_string_url_column_is_refused_naming_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url_list = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": [1, 2, 3], "caption": ["a", "b", "c"]}), url_list)
    config = tmp_path / "c.yaml"
    config.write_text(f"pool: {tmp_path / 'pool'}\ndownload: {{input: {url_list}}}\n")
    code, _, err = cli(capsys, "download", config)
    assert code == 2 and str(url_list) in one_line(err) and "'url'" in err and "int64" in err
    assert not (tmp_path / "pool" / "tables").exists()


_HOLD = """
import sys, time
from pipeline.store.lock import writer_lock
with writer_lock(sys.argv[1], "held by a test", name=sys.argv[2]):
    print("locked", flush=True)
    time.sleep(float(sys.argv[3]))
"""


def _holder(folder: Path, name: str, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder), name, str(seconds)], stdout=subprocess.PIPE,
                            text=True, cwd=REPO)  # fmt: skip
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_two_exports_into_one_folder_lock_and_a_dead_holder_is_taken_over(pool, tmp_path, capsys):
    out = tmp_path / "rel"
    proc = _holder(tmp_path, ".rel.lock", 600)
    try:
        code, _, err = cli(capsys, "export", pool.root, "--out", out, "--where", "keep")
        assert code == 2 and f"pid {proc.pid}" in one_line(err) and "held by a test" in err and "--wait" in err
        assert not out.exists()
    finally:
        proc.kill()  # SIGKILL: the kernel drops its lock
        proc.wait()
    assert cli(capsys, "export", pool.root, "--out", out, "--where", "keep")[0] == 0
    first = snapshot(out)
    shutil.rmtree(out)
    proc = _holder(tmp_path, ".rel.lock", 2)
    started = time.monotonic()
    assert cli(capsys, "export", pool.root, "--out", out, "--where", "keep", "--wait")[0] == 0
    assert time.monotonic() - started > 0.5 and proc.wait() == 0
    assert {k: v for k, v in snapshot(out).items() if k != "manifest.json"} == {
        k: v for k, v in first.items() if k != "manifest.json"}  # the manifest differs by its created_at


def test_a_second_writer_of_a_pool_is_refused_naming_the_holder(pool, capsys):
    before = snapshot(pool.root)
    proc = _holder(pool.root, ".clipcurate.lock", 600)
    try:
        code, _, err = cli(capsys, "filter", pool.root, "--recipe", "basic")
        assert code == 2 and f"pid {proc.pid}" in one_line(err) and str(pool.root) in err
        code, _, _ = cli(capsys, "query", pool.root, "select count(*) from samples")  # readers are not locked out
        assert code == 0
    finally:
        proc.kill()
        proc.wait()
    assert {k: v for k, v in snapshot(pool.root).items() if not k.startswith(".clipcurate.lock")} == before
    assert cli(capsys, "filter", pool.root, "--recipe", "basic")[0] == 0


def test_a_bug_keeps_its_traceback(pool, monkeypatch):
    import pipeline.query

    def broken(*args, **kwargs):
        raise ValueError("a bug, not a user mistake")

    monkeypatch.setattr(pipeline.query, "stats", broken)
    with pytest.raises(ValueError, match="a bug"):
        main(["stats", str(pool.root)])


def test_temp_names_are_unique_per_thread(tmp_path):
    from pipeline.store.parquet import write_json_atomic

    target, errors = tmp_path / "manifest.json", []

    def write(i: int) -> None:
        try:
            for j in range(200):
                write_json_atomic(target, {"thread": i, "write": j})
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and json.loads(target.read_text())["write"] == 199
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_verify_finds_each_planted_fault_and_passes_an_intact_pool(pool, capsys):
    code, out, _ = cli(capsys, "verify", pool.root, "--deep")
    assert code == 0 and "intact" in out
    tar, flipped, missing, column = (pool.shard_tar(1), pool.table_path("embed", 2), pool.table_path("filters", 3),
                                     pool.table_path("metaclip", 0))  # fmt: skip
    os.truncate(tar, tar.stat().st_size - 700)
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    missing.unlink()
    pq.write_table(pq.read_table(column).drop_columns(["metaclip_keep"]), column)
    code, out, _ = cli(capsys, "verify", pool.root)
    assert code == 1
    for path in (tar, flipped, missing, column):
        assert f"DAMAGED {path}" in out, out
    assert "4 damaged file(s)" in out


# Trust, second pass (issue 21): nothing of a user's is ever deleted or overwritten. A release's
# manifest lists every file it wrote; replacing or pruning it removes exactly those, and anything
# else anywhere inside is refused by name before anything is touched. The report's folder follows
# the same rule; `latest` always ends at the newest version; a symlinked --out is resolved once.

KEEP = ("--where", "keep", "--samples-per-shard", "50")


def _export(capsys, pool, out, *extra) -> tuple[int, str, str]:
    return cli(capsys, "export", pool.root, "--out", out, *KEEP, "--embeddings", *extra)


def test_the_manifest_lists_every_file_of_the_release(pool, tmp_path, capsys):
    out = tmp_path / "rel"
    assert _export(capsys, pool, out)[0] == 0
    manifest = json.loads((out / "manifest.json").read_text())
    listed = {f["path"]: f for f in manifest["files"]}
    on_disk = {k for k in snapshot(out) if k != "manifest.json"}
    assert set(listed) == on_disk and any(k.startswith("embeddings/") for k in on_disk)
    for rel, sha in snapshot(out).items():
        if rel != "manifest.json":
            assert listed[rel]["sha256"] == sha and listed[rel]["size"] == (out / rel).stat().st_size


def test_a_users_file_deep_inside_a_release_is_never_deleted(pool, tmp_path, capsys):
    out = tmp_path / "rel"
    assert _export(capsys, pool, out)[0] == 0
    (out / "embeddings" / "my_notes.txt").write_text("mine")
    (out / "CHANGES.md").write_text("my changelog")  # this release never wrote one
    before = snapshot(out)
    code, _, err = _export(capsys, pool, out, "--overwrite", "--shuffle-seed", "1")
    line = one_line(err)
    assert code == 2 and "embeddings/my_notes.txt" in line and "CHANGES.md" in line
    assert snapshot(out) == before  # refused before anything was touched
    (out / "embeddings" / "my_notes.txt").unlink()
    (out / "CHANGES.md").unlink()
    assert _export(capsys, pool, out, "--overwrite", "--shuffle-seed", "1")[0] == 0
    assert json.loads((out / "manifest.json").read_text())["export_config"]["shuffle_seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".rel.lock", "cwd", "pool", "rel"]  # no .rel.old left


def test_pruning_a_version_with_a_users_file_in_it_is_refused(pool, tmp_path, capsys):
    out = tmp_path / "versions"
    assert _export(capsys, pool, out, "--versioned")[0] == 0
    (out / "v0001" / "embeddings" / "keep_me.txt").write_text("mine")
    code, _, err = _export(capsys, pool, out, "--versioned", "--keep-versions", "1", "--shuffle-seed", "2")
    assert code == 2 and "v0001" in one_line(err)
    assert (out / "v0001" / "embeddings" / "keep_me.txt").read_text() == "mine"
    (out / "v0001" / "embeddings" / "keep_me.txt").unlink()
    assert _export(capsys, pool, out, "--versioned", "--keep-versions", "1", "--shuffle-seed", "2")[0] == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["latest", "v0002"]


def test_latest_is_repaired_after_a_kill_between_placing_a_version_and_moving_the_link(pool, tmp_path, capsys):
    out = tmp_path / "versions"
    assert _export(capsys, pool, out, "--versioned")[0] == 0
    assert _export(capsys, pool, out, "--versioned", "--shuffle-seed", "5")[0] == 0
    os.replace(out / "latest", out / "latest.kept")  # the state a kill leaves: v0002 placed, the link
    (out / "latest").symlink_to("v0001")  # not moved yet
    (out / "latest.kept").unlink()
    code, printed, _ = _export(capsys, pool, out, "--versioned", "--shuffle-seed", "5")  # the re-run: a no-op
    assert code == 0 and "no new version" in printed
    assert (out / "latest").readlink().name == "v0002"
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["latest", "v0001", "v0002"]


def test_a_symlinked_out_is_resolved_once_and_the_link_is_kept(pool, tmp_path, capsys):
    target = tmp_path / "real"
    link = tmp_path / "link"
    link.symlink_to(target)
    assert _export(capsys, pool, link)[0] == 0
    assert _export(capsys, pool, link, "--overwrite", "--shuffle-seed", "3")[0] == 0
    assert link.is_symlink() and link.readlink() == target
    assert json.loads((target / "manifest.json").read_text())["export_config"]["shuffle_seed"] == 3
    assert not (tmp_path / ".link.old").exists() and not (tmp_path / ".link.partial").exists()


def test_out_naming_a_version_or_latest_is_refused(pool, tmp_path, capsys):
    out = tmp_path / "versions"
    assert _export(capsys, pool, out, "--versioned")[0] == 0
    before = snapshot(out)
    for target in (out / "latest", out / "v0001"):
        code, _, err = _export(capsys, pool, target, "--overwrite")
        assert code == 2 and "is a version of the versioned release" in one_line(err)
    assert snapshot(out) == before and (out / "latest").readlink().name == "v0001"


def test_report_out_never_overwrites_a_users_folder(pool, tmp_path, capsys):
    user = tmp_path / "site"
    user.mkdir()
    (user / "index.html").write_text("my homepage")
    code, _, err = cli(capsys, "report", pool.root, "--out", user)
    assert code == 2 and "not a clipcurate report" in one_line(err)
    assert (user / "index.html").read_text() == "my homepage" and len(list(user.iterdir())) == 1
    report = tmp_path / "report"
    assert cli(capsys, "report", pool.root, "--out", report)[0] == 0
    assert (report / "index.html").exists()
    code, _, err = cli(capsys, "report", pool.root, "--out", report)
    assert code == 2 and "--overwrite" in one_line(err)
    (report / "funnel.png").write_bytes(b"edited by hand")
    code, _, err = cli(capsys, "report", pool.root, "--out", report, "--overwrite")
    assert code == 2 and "funnel.png" in one_line(err)
    assert (report / "funnel.png").read_bytes() == b"edited by hand"
    (report / "funnel.png").unlink()
    assert cli(capsys, "report", pool.root, "--out", report, "--overwrite")[0] == 0


# Trust, second pass: a damaged completion marker is damage, never a traceback -----------------------


def test_a_damaged_marker_is_named_by_every_reader_and_redone_by_its_stage(pool, tmp_path, capsys):
    from pipeline.filters.stage import run_filters

    garbage, truncated = pool.marker_path("decisions", 1), pool.marker_path("filters", 2)
    garbage.write_bytes(os.urandom(200))
    truncated.write_text(truncated.read_text()[:40])
    code, out, _ = cli(capsys, "verify", pool.root)
    assert code == 1 and f"DAMAGED {garbage}" in out and f"DAMAGED {truncated}" in out
    before = snapshot(pool.root)
    for args in (["stats", pool.root], ["query", pool.root, "select count(*) from samples"],
                 ["export", pool.root, "--out", tmp_path / "rel", "--where", "keep"]):  # fmt: skip
        code, _, err = cli(capsys, *args)
        line = one_line(err)
        assert code == 2 and ("damaged completion marker" in line and (str(garbage) in line or str(truncated) in line))
    assert snapshot(pool.root) == before and not (tmp_path / "rel").exists()
    run_filters(pool, FilterConfig(recipe="basic"), LocalEngine(1), progress=False)  # the stages that own them
    assert cli(capsys, "verify", pool.root)[0] == 0
    assert json.loads(garbage.read_text())["shard"] == 1 and json.loads(truncated.read_text())["shard"] == 2


def test_the_query_connection_can_read_and_spill_only_inside_the_pool(pool, tmp_path, capsys):
    from pipeline.query import connect

    (tmp_path / "cwd" / ".tmp").mkdir()
    (tmp_path / "cwd" / ".tmp" / "secret.txt").write_text("outside the pool")
    con = connect(pool, confined=True)
    settings = dict(con.execute("select name, value from duckdb_settings() where name in "
                                "('temp_directory', 'allowed_directories', 'enable_external_access')").fetchall())
    spill = Path(settings["temp_directory"])
    assert spill.resolve().is_relative_to(pool.root.resolve()) and settings["enable_external_access"] == "false"
    allowed = [Path(p.strip(" '")) for p in settings["allowed_directories"].strip("[]").split(",")]
    assert sorted(allowed) == sorted([pool.root.resolve(), spill.resolve()])
    code, _, err = cli(capsys, "query", pool.root, "select content from read_text('.tmp/secret.txt')")
    assert code == 2 and "secret.txt" in one_line(err)


def test_stats_names_each_rules_drops_and_numbers_are_checked(pool, tmp_path, capsys):
    from pipeline.query import query

    code, out, _ = cli(capsys, "stats", pool.root)
    assert code == 0 and "dropped_by_rule_" not in out
    rules = json.loads((pool.aggregates_dir / "decisions.json").read_text())["rules"]
    english = query(pool, "select count(*) from samples where drop_reason = 'english'").column(0)[0].as_py()
    assert "english" in rules and english > 0 and f"dropped_by: english: {english}" in out
    out = tmp_path / "rel"
    code, _, err = cli(capsys, "export", pool.root, "--out", out, "--where", "keep", "--shuffle-seed", "-1")
    assert code == 2 and "shuffle_seed" in one_line(err) and not out.exists()


def test_export_defaults_to_the_pools_curation_and_a_versioned_release_keeps_to_its_pool(pool, tmp_path, capsys):
    from pipeline.query import query

    out = tmp_path / "rel"
    code, _, err = cli(capsys, "export", pool.root, "--out", out)
    assert code == 0 and 'selecting the pool\'s curation: --where "metaclip_keep and keep"' in err
    curated = query(pool, "select count(*) from samples where status = 'success' and metaclip_keep and keep")
    assert json.loads((out / "manifest.json").read_text())["counts"]["samples"] == curated.column(0)[0].as_py()
    code, _, _ = cli(capsys, "export", pool.root, "--out", tmp_path / "all", "--all")
    everything = query(pool, "select count(*) from samples where status = 'success'").column(0)[0].as_py()
    assert code == 0 and json.loads((tmp_path / "all" / "manifest.json").read_text())["counts"]["samples"] == everything
    versions = tmp_path / "versions"
    assert _export(capsys, pool, versions, "--versioned")[0] == 0
    other = copy_pool(pool, tmp_path / "other")
    before = snapshot(versions)
    code, _, err = _export(capsys, other, versions, "--versioned", "--shuffle-seed", "9")
    line = one_line(err)
    assert code == 2 and str(pool.root.resolve()) in line and str(other.root) in line
    assert snapshot(versions) == before


def test_a_shard_downloaded_again_without_its_embed_is_decode_checked_by_export(pool, tmp_path, capsys):
    """The state after a re-download: the pool is embedded, but this shard's embed marker is gone;
    with --allow-incomplete its samples are decoded by export itself, so no bomb or empty image ships."""
    kinds = plant_broken_samples(pool, 0, _four_keys(pool, "true"))
    assert pool.done_shards("embed") and not pool.marker_path("embed", 0).exists()
    out = tmp_path / "rel"
    code, _, err = cli(capsys, "export", pool.root, "--out", out, "--all", "--allow-incomplete")
    assert code == 0, err
    samples = release_samples(out)
    assert not {(0, k) for k, v in kinds.items() if v != "latin1"} & set(samples)
    assert (0, next(k for k, v in kinds.items() if v == "latin1")) in samples
    assert all(len(s.get("jpg", s.get("png", b""))) > 0 for s in samples.values())


def test_bit_rot_that_keeps_the_mtime_is_caught_on_the_path_to_a_release(pool, tmp_path, capsys):
    """A flipped byte in a decisions table and a flipped region inside a tar, with each file's mtime
    put back: export hashes every file against its marker and refuses, naming the file."""
    for path in (pool.table_path("decisions", 1), pool.shard_tar(2)):
        st = path.stat()
        data = bytearray(path.read_bytes())
        for i in range(len(data) // 2, len(data) // 2 + 16):
            data[i] ^= 0xFF
        path.write_bytes(bytes(data))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # the mtime it had: the quick check passes
        before = snapshot(pool.root)
        code, _, err = cli(capsys, "export", pool.root, "--out", tmp_path / "rel", "--where", "keep")
        assert code == 2 and str(path) in one_line(err) and "sha256" in err
        assert snapshot(pool.root) == before and not (tmp_path / "rel").exists()
        path.write_bytes(bytes(b ^ 0xFF if len(data) // 2 <= i < len(data) // 2 + 16 else b
                               for i, b in enumerate(data)))  # fmt: skip
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _repeat_first_sample(tar: Path) -> str:
    """Append copies of the first sample's members at the end of ``tar`` (a careless ``tar -r``)."""
    with tarfile.open(tar) as t:
        members = [(m, t.extractfile(m).read()) for m in t if m.isfile()]
    first = members[0][0].name.split(".")[0]
    with tarfile.open(tar, "a", format=tarfile.USTAR_FORMAT) as out:
        for member, data in members:
            if member.name.split(".")[0] == first:
                out.addfile(member, io.BytesIO(data))
    return first


def test_a_tar_that_repeats_a_sample_is_one_line_naming_it(pool, tmp_path, capsys, tiny_checkpoint, image_server):
    """Before: the repeated sample was embedded twice (two rows of one uid), exit 0. Now the shard is
    refused by the safe reader, from the loader's worker process, as one line naming tar and member."""
    import dataclasses

    from tests.conftest import write_config

    first = _repeat_first_sample(pool.shard_tar(1))
    for stage in ("embed", "caption_embed"):
        pool.marker_path(stage, 1).unlink(missing_ok=True)
    cfg = dataclasses.replace(make_config_for(pool, image_server, tmp_path),
                              embed=embed_cfg(tiny_checkpoint, workers=2))  # fmt: skip
    before = snapshot(pool.root)
    code, _, err = cli(capsys, "embed", write_config(tmp_path / "c.yaml", cfg))
    line = one_line(err)
    assert code == 2 and str(pool.shard_tar(1)) in line and f"repeats sample '{first}'" in line, err
    after = {k: v for k, v in snapshot(pool.root).items() if k != ".clipcurate.lock"}  # the writer's lock file
    assert after == before  # nothing of the shard was written


def make_config_for(pool, server, tmp_path):
    rows = point_at(laion_rows(300), server)
    url_list = tmp_path / "urls.parquet"
    pq.write_table(rows, url_list)
    from tests.conftest import make_config

    return make_config(pool.root, url_list)


def _fails(shard: int) -> int:
    from pipeline.errors import UserError

    if shard == 3:
        raise KeyError("a bug in a task")
    raise UserError(f"/data/list.parquet: row {1 + shard % 2}: the same mistake, once per shard")


def test_a_users_mistake_in_many_shard_tasks_is_one_line_per_cause_and_a_bug_keeps_its_traceback():
    from pipeline.core import runner
    from pipeline.engines.base import ShardFailures

    with pytest.raises(ShardFailures) as info:
        runner.collect(LocalEngine(1), _fails, [0, 1, 2, 3, 4, 5, 6], desc="stage", progress=False)
    lines = str(info.value).splitlines()
    assert lines[0].startswith("stage: 7 shard(s) failed")
    cause = "  /data/list.parquet: row {}: the same mistake, once per shard ({})"
    assert lines[1] == cause.format(1, "4 shards: 00000, 00002, 00004, 00006")
    assert lines[2] == cause.format(2, "2 shards: 00001, 00005")
    assert lines[3].startswith("  shard 00003: KeyError: 'a bug in a task'") and "Traceback" in str(info.value)
