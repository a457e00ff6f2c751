"""Long-tail rebalancing: group sizes as SQL (pool-wide), probabilities per group, draws per shard.
See :mod:`pipeline.rebalance.stage`."""

from pipeline.rebalance.stage import (
    STAGE,
    Draw,
    group_probabilities,
    rebalance,
    run_rebalance,
    solve_param,
)

__all__ = ["STAGE", "Draw", "group_probabilities", "rebalance", "run_rebalance", "solve_param"]
