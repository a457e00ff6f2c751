"""``curate browse``: a read-only web app over a pool. See :mod:`pipeline.browse.app`."""

from pipeline.browse.app import make_app, serve

__all__ = ["make_app", "serve"]
