"""A record of model loads, to check that each process loads a model once.

Stages cache their models per process (the Aho-Corasick automaton, faiss centres, WordNet, the
language model, open_clip). When ``CLIPCURATE_LOAD_LOG`` names a file, every load appends
``<what>\\t<pid>`` to it; the Spark tests read it to show loads happen once per executor process,
not once per task. Unset (the default), this does nothing.
"""

from __future__ import annotations

import os


def note_load(what: str) -> None:
    path = os.environ.get("CLIPCURATE_LOAD_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as f:  # noqa: PTH123 - one short append
            f.write(f"{what}\t{os.getpid()}\n")
