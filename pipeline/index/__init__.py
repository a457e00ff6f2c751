"""Nearest-neighbour search over a pool's embeddings: ``curate index`` and ``curate search``.
See :mod:`pipeline.index.build` and :mod:`pipeline.index.search`."""

from pipeline.index.build import SPACES, IndexUnavailable, build_index, index_dir
from pipeline.index.search import search

__all__ = ["SPACES", "IndexUnavailable", "build_index", "index_dir", "search"]
