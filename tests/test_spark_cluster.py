"""``engine: spark`` through the entry point users run (``curate run``: Prefect task threads), on
``local[2]`` and on a standalone cluster (a master and two workers started with pyspark's own
``spark-class``, separate processes with their own work dirs): the same tables and release as the
local engine's run of the same config."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import REPO

pytest.importorskip("pyspark")
pytestmark = [pytest.mark.spark, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spark_env() -> dict[str, str]:
    import pyspark

    return {**os.environ, "SPARK_HOME": str(Path(pyspark.__file__).parent), "SPARK_LOCAL_IP": "127.0.0.1",
            "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}  # fmt: skip


def _alive_workers(ui_port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{ui_port}/json/", timeout=5) as r:
            return sum(w["state"] == "ALIVE" for w in json.load(r)["workers"])
    except OSError:
        return 0


class Cluster:
    """A standalone master and ``n`` one-core workers on loopback; :meth:`stop` ends exactly the
    processes it started."""

    def __init__(self, root: Path, n: int = 2):
        env = _spark_env()
        launcher = str(Path(env["SPARK_HOME"]) / "bin" / "spark-class")
        self.port, self.ui = _free_port(), _free_port()
        self.url = f"spark://127.0.0.1:{self.port}"
        root.mkdir(parents=True, exist_ok=True)
        self.work_dirs = [root / f"work{i}" for i in range(n)]
        master = ["org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(self.port),
                  "--webui-port", str(self.ui)]  # fmt: skip
        self.master = self._start(root / "master.log", env, [launcher, *master])
        self.workers = []
        for i, work in enumerate(self.work_dirs):
            worker = ["org.apache.spark.deploy.worker.Worker", self.url, "--cores", "1", "--memory", "1g",
                      "--work-dir", str(work), "--webui-port", str(_free_port())]  # fmt: skip
            self.workers.append(self._start(root / f"worker{i}.log", env, [launcher, *worker]))
        deadline = time.monotonic() + 120
        while _alive_workers(self.ui) < n:
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the cluster did not start; see {root}/*.log")
            time.sleep(1)

    @staticmethod
    def _start(log: Path, env: dict[str, str], cmd: list[str]) -> subprocess.Popen:
        with log.open("wb") as out:
            return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        """SIGTERM to each process group this cluster started (a worker's executors are in its
        group), then SIGKILL to any still there: nothing else on the machine is touched."""
        import signal

        for proc in [*self.workers, self.master]:
            self._signal(proc, signal.SIGTERM)
        for proc in [*self.workers, self.master]:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._signal(proc, signal.SIGKILL)
                proc.wait()
            self._signal(proc, signal.SIGKILL)  # what the group's leader left behind

    @staticmethod
    def _signal(proc: subprocess.Popen, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    started = Cluster(tmp_path_factory.mktemp("spark-cluster"))
    yield started
    started.stop()


def _config(tmp_path: Path, server, checkpoint, name: str, engine: dict | None) -> Path:
    from tests.test_flow import _full_config

    path = _full_config(tmp_path, server, checkpoint, name)
    data = yaml.safe_load(path.read_text())
    data.pop("report", None)
    # one torch thread on every engine: a BLAS reduction over another thread count rounds a few
    # vectors' last float16 bit differently (a Spark executor of 1 core runs 1 thread, the local
    # engine every core); the release is the same bytes either way (README, "On a Spark cluster")
    data["embed"]["threads"] = 1
    if engine is not None:
        data.update(engine)
    path.write_text(yaml.safe_dump(data))
    return path


def _curate_run(config: Path, tmp_path: Path, extra_env: dict[str, str] | None = None) -> None:
    env = {**_spark_env(), "PREFECT_HOME": str(tmp_path / "prefect-home"), **(extra_env or {})}
    env.pop("PREFECT_API_URL", None)  # Prefect's ephemeral mode, as a user's first run
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(config)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = yaml.safe_load(config.read_text())["export"]["out"]
    assert f"release: {out}, " in proc.stdout and " samples in " in proc.stdout  # the release it made, named


def _tables(pool: Path) -> dict[str, str]:
    """Each stage table's rows, sorted by uid, as a digest (read with pyarrow, not the project's code)."""
    out = {}
    for folder in sorted((pool / "tables").iterdir()):
        table = pa.concat_tables(pq.read_table(f) for f in sorted(folder.glob("*.parquet")))
        table = table.sort_by("uid")
        out[folder.name] = hashlib.sha256(repr([table[c].to_pylist() for c in sorted(table.column_names)]).encode(
            )).hexdigest()  # fmt: skip
    return out


def _release(out: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(out.iterdir())
            if f.suffix in (".tar", ".npy")}  # fmt: skip


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, image_server, tiny_checkpoint):
    tmp = tmp_path_factory.mktemp("local-run")
    _curate_run(_config(tmp, image_server, tiny_checkpoint, "local", None), tmp)
    return tmp / "local"


def _same_as_local(local: Path, pool: Path) -> None:
    assert _tables(pool) == _tables(local)
    want = _release(local / "release")
    assert want and any(name.endswith(".tar") for name in want)
    assert _release(pool / "release") == want


# Installed in every Python process of the run by a ``sitecustomize`` on PYTHONPATH: inside a Spark
# task (a TaskContext exists) it logs each completion marker or marker folder the task touches, with
# the task's stage and partition, to the file CLIPCURATE_AUDIT_LOG names (forwarded to executors
# like every CLIPCURATE_ setting). The driver, which plans, has no TaskContext and logs nothing.
_AUDIT = r'''
import os, re, sys

_LOG = os.environ.get("CLIPCURATE_AUDIT_LOG")
_MARKER = re.compile(r"/completions/([a-z_]+)/(\d{5})\.json$")
_busy = []

def _hook(event, args):
    if _busy or not _LOG or event not in ("open", "os.listdir", "os.scandir", "glob.glob"):
        return
    path = os.fspath(args[0]) if args and isinstance(args[0], (str, bytes, os.PathLike)) else ""
    path = path.decode() if isinstance(path, bytes) else path
    if "/completions" not in path or "pyspark" not in sys.modules:
        return
    if event == "open":  # a marker being written (its temporary name) is not a read
        mode, flags = (args[1] or ""), (args[2] if len(args) > 2 and isinstance(args[2], int) else 0)
        if any(c in str(mode) for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR):
            return
    _busy.append(1)
    try:
        from pyspark import TaskContext
        task = TaskContext.get()
        if task is not None:
            m = _MARKER.search(path)
            kind = f"marker {m.group(1)} {int(m.group(2))}" if m and event == "open" else f"{event} {path}"
            with open(_LOG, "a") as out:
                out.write(f"{task.stageId()} {task.partitionId()} {kind}\n")
    finally:
        _busy.pop()

sys.addaudithook(_hook)
'''


def _audited_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    hooks = tmp_path / "audit-hook"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(_AUDIT)
    log = tmp_path / "marker-reads.log"
    path = os.pathsep.join([str(hooks), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {"PYTHONPATH": path, "CLIPCURATE_AUDIT_LOG": str(log)}, log


def _marker_reads_by_task(log: Path) -> dict[tuple[int, int], list[str]]:
    tasks: dict[tuple[int, int], list[str]] = {}
    for line in log.read_text().splitlines():
        stage, partition, what = line.split(" ", 2)
        tasks.setdefault((int(stage), int(partition)), []).append(what)
    return tasks


def test_curate_run_on_spark_local_mode_equals_the_local_engine(local_run, tmp_path, image_server, tiny_checkpoint):
    """The Prefect flow on ``local[2]``: the download no longer stops the engine's session. Every
    task's reads of completion markers are counted: a task reads only its own shard's markers (of
    the stages it reads), and none lists a marker folder; planning is the driver's, once."""
    engine = {"engine": "spark", "spark": {"master": "local[2]"}}
    config = _config(tmp_path, image_server, tiny_checkpoint, "spark", engine)
    env, log = _audited_env(tmp_path)
    _curate_run(config, tmp_path, env)
    _same_as_local(local_run, tmp_path / "spark")
    tasks = _marker_reads_by_task(log)
    marker_tasks = {key: reads for key, reads in tasks.items() if any(r.startswith("marker ") for r in reads)}
    assert len(marker_tasks) >= 15, tasks  # the shard tasks of the steps that read markers were seen (5 shards)
    for key, reads in tasks.items():
        assert all(r.startswith("marker ") for r in reads), (key, reads)  # no folder listed
        shards = {int(r.split()[2]) for r in reads}
        assert len(shards) == 1, (key, reads)  # one shard's markers only
        assert max(Counter(reads).values()) == 1, (key, reads)  # each marker read once
        assert len(reads) <= 4, (key, reads)  # a few stages' markers, not the pool's


def test_curate_run_on_a_standalone_cluster_equals_the_local_engine(local_run, cluster, tmp_path, image_server,
                                                                     tiny_checkpoint):  # fmt: skip
    """A master and two worker processes: tasks run in the workers' own processes and folders."""
    engine = {"engine": "spark", "spark": {"master": cluster.url}}
    config = _config(tmp_path, image_server, tiny_checkpoint, "cluster", engine)
    _curate_run(config, tmp_path)
    _same_as_local(local_run, tmp_path / "cluster")
    # every worker launched an executor for the application (its own process, in its own work dir)
    for work in cluster.work_dirs:
        assert list(work.glob("app-*/*/stderr")), work


def _count(folder: Path, pattern: str) -> int:
    return len(list(folder.glob(pattern))) if folder.is_dir() else 0


def test_a_worker_killed_in_embed_and_another_in_dedup_still_gives_the_same_release(
        local_run, tmp_path, image_server, tiny_checkpoint):  # fmt: skip
    """SIGKILL one worker (its process group: the worker JVM, its executor and Python workers) once
    some embed shards are done, and another once dedup has started; Spark re-runs the lost tasks on
    the worker left, and the release is the local engine's, byte for byte."""
    import signal

    cluster = Cluster(tmp_path / "cluster", n=3)
    try:
        engine = {"engine": "spark", "spark": {"master": cluster.url, "task_max_failures": 4}}
        config = _config(tmp_path, image_server, tiny_checkpoint, "killed", engine)
        pool = tmp_path / "killed"
        env = {**_spark_env(), "PREFECT_HOME": str(tmp_path / "prefect-home")}
        env.pop("PREFECT_API_URL", None)
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(config)], env=env, cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
        moments = [lambda: 0 < _count(pool / "completions" / "embed", "0*.json") < 5,
                   lambda: _count(pool / "aggregates" / "dedup" / "sample", "*.parquet") > 0
                   and _count(pool / "completions" / "dedup", "0*.json") < 5]  # fmt: skip
        killed = []
        deadline = time.monotonic() + 900
        while proc.poll() is None and time.monotonic() < deadline:
            if len(killed) < len(moments) and moments[len(killed)]():
                victim = cluster.workers[len(killed)]
                os.killpg(victim.pid, signal.SIGKILL)
                victim.wait()
                killed.append(time.monotonic())
            time.sleep(0.02)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-4000:]
        assert len(killed) == 2, "a stage finished before a worker could be killed in it"
        assert cluster.workers[2].poll() is None  # the one left did the rest
        _same_as_local(local_run, pool)
    finally:
        cluster.stop()
