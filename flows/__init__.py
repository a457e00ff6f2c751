"""Prefect flows. Each task is a thin wrapper over a ``pipeline`` function; nothing here computes."""
