"""MoDE: the clustering itself (:mod:`pipeline.mode.clustering`) and the stage over a pool
(:mod:`pipeline.mode.stage`: fit on a capped uid-hash sample, assign per shard, report from SQL
counts and a sample of captions, expert subsets, routing)."""

from pipeline.mode.clustering import (
    balanced_assign,
    fit_hierarchy,
    gini,
    nearest,
    normalize,
    routing_weights,
    size_spread,
    top_terms,
)
from pipeline.mode.stage import STAGE, AssignExperts, expert_uids, fit_mode, plot_sizes, route, run_mode

__all__ = ["STAGE", "AssignExperts", "balanced_assign", "expert_uids", "fit_hierarchy", "fit_mode", "gini", "nearest",
           "normalize", "plot_sizes", "route", "routing_weights", "run_mode", "size_spread", "top_terms"]  # fmt: skip
