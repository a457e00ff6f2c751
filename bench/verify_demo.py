"""`curate verify` on a copy of the demo pool: intact, then with four planted faults.

    python bench/verify_demo.py [--pool runs/demo]

Plants a truncated shard tar, flipped bytes in an embed table, a deleted filters table and a
metaclip table rewritten without ``metaclip_keep``, then runs ``curate verify`` (and ``--deep`` on the
intact copy) as a user would, printing each command's output, exit code, wall time and peak RSS
(``resource.getrusage`` of the children). Writes nothing into the demo pool.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq


def run(args: list[str]) -> int:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    done = subprocess.run([str(Path(sys.executable).parent / "curate"), *args], capture_output=True, text=True)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # RUSAGE_CHILDREN's maxrss is the largest of the finished children so far (verify is one process)
    rss = f"{peak / 1024:.0f} MiB" if peak > before else f"<= {before / 1024:.0f} MiB"
    print(f"$ curate {' '.join(args)}   # exit {done.returncode}, {wall:.1f} s, peak RSS {rss}")
    print(done.stdout + done.stderr)
    return done.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pool", default="runs/demo")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(shutil.copytree(args.pool, Path(tmp) / "demo"))
        intact = run(["verify", str(root)]), run(["verify", str(root), "--deep"])
        tar = root / "shards" / "00001.tar"
        with tar.open("r+b") as f:
            f.truncate(tar.stat().st_size - 700)
        flipped = root / "tables" / "embed" / "00002.parquet"
        data = bytearray(flipped.read_bytes())
        data[len(data) // 2] ^= 0xFF
        flipped.write_bytes(bytes(data))
        (root / "tables" / "filters" / "00003.parquet").unlink()
        column = root / "tables" / "metaclip" / "00000.parquet"
        pq.write_table(pq.read_table(column).drop_columns(["metaclip_keep"]), column)
        damaged = run(["verify", str(root)])
    ok = intact == (0, 0) and damaged == 1
    print("intact copy passes, each planted fault found" if ok else "UNEXPECTED exit codes")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
