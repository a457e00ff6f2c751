"""Why a download failed, in a few classes a user can act on: ``error_class`` of the ``download``
view, counted by ``curate stats`` and the report, and named by the run's early warning.

img2dataset records a failure as its exception's text (``str(err)`` of urllib's ``HTTPError``,
``URLError``, ``socket.timeout``, ...; its resizer's "image too small", "Image decoding error",
...). :data:`CLASSES` turns that text, with the row's status, into a class: the first rule whose
pattern matches, in order. The rules are one SQL ``CASE`` (:func:`error_class_sql`): the pool's
views compute the column with it, and :func:`class_counts` runs the same expression on a shard's
table, so there is one classifier. A pool downloaded before this module gets the column too: it
is derived from what every download table already holds.
"""

from __future__ import annotations

from typing import Any

from pipeline.sqlsafe import literal
from pipeline.store import schema as S

# (class, statuses it applies to, a regular expression over error_message (RE2, case-insensitive);
# None: every message), first match wins. HINTS: what to do about each, for the early warning.
CLASSES: tuple[tuple[str, tuple[str, ...], str | None], ...] = (
    ("invalid_url", (S.STATUS_INVALID_URL,), None),
    ("opted_out", (S.STATUS_FAILED_DOWNLOAD,), r"disallowed by x-robots-tag"),
    ("http_429", (S.STATUS_FAILED_DOWNLOAD,), r"^http error 429\b"),
    ("http_5xx", (S.STATUS_FAILED_DOWNLOAD,), r"^http error 5\d\d\b"),
    ("http_4xx", (S.STATUS_FAILED_DOWNLOAD,), r"^http error 4\d\d\b"),
    ("dns", (S.STATUS_FAILED_DOWNLOAD,), r"name or service not known|temporary failure in name resolution|"
                                     r"no address associated with hostname|nodename nor servname|getaddrinfo"),
    ("stalled", (S.STATUS_FAILED_DOWNLOAD,), r"^stalled\b"),
    ("timeout", (S.STATUS_FAILED_DOWNLOAD,), r"timed out|timeout"),
    ("ssl", (S.STATUS_FAILED_DOWNLOAD,), r"ssl|certificate"),
    ("connect", (S.STATUS_FAILED_DOWNLOAD,), r"connection refused|connection reset|connection aborted|"
                                         r"network is unreachable|no route to host|remote end closed|"
                                         r"remotedisconnected|connection"),
    ("too_small", (S.STATUS_FAILED_RESIZE,), r"too small"),
    ("too_large", (S.STATUS_FAILED_RESIZE,), r"too large"),
    ("decode", (S.STATUS_FAILED_RESIZE,), None),
    ("other", (S.STATUS_FAILED_DOWNLOAD,), None),
)
HINTS = {
    "dns": "the resolver fails under load: use a caching DNS resolver (img2dataset's README: bind9 or "
           "knot-resolver on the machine), or fewer threads",
    "timeout": "servers answer slowly: raise download.timeout, or lower download.threads",
    "stalled": "servers trickle bytes until the deadline: retry later",
    "connect": "connections are refused or reset: check the network and proxy; retry later",
    "http_429": "hosts rate-limit this crawler: lower download.threads or processes, retry later",
    "http_5xx": "servers fail: retry later",
    "http_4xx": "the URLs are gone or forbidden: expected on old lists, not retried",
    "ssl": "TLS handshakes fail: check the machine's CA certificates and clock",
    "opted_out": "sites opt out (X-Robots-Tag): expected, never retried",
    "decode": "fetched bytes are not images",
    "too_small": "images below download.min_image_size",
    "too_large": "images above download.max_image_area or max_aspect_ratio",
    "invalid_url": "the list has URLs that are not http(s)",
    "other": "see error_message in the download table",
}


def error_class_sql(status: str = S.STATUS, error: str = S.ERROR) -> str:
    """The ``CASE`` expression of a row's class (NULL for a success or a row not selected)."""
    whens = []
    for name, statuses, pattern in CLASSES:
        cond = f"{status} IN ({', '.join(literal(s) for s in statuses)})"
        if pattern is not None:
            cond += f" AND regexp_matches(lower(coalesce({error}, '')), {literal(pattern)})"
        whens.append(f"WHEN {cond} THEN {literal(name)}")
    return "CASE " + " ".join(whens) + " END"


def error_classes(table: Any) -> Any:
    """Each row's class (an Arrow string array, null for a success or a row not selected) of a
    download table (Arrow, with ``status`` and ``error_message``): :func:`error_class_sql` run by DuckDB."""
    import duckdb

    con = duckdb.connect()
    try:
        con.register("t", table.select([S.STATUS, S.ERROR]))
        return con.sql(f"SELECT {error_class_sql()} AS c FROM t").to_arrow_table()["c"]
    finally:
        con.close()


def class_counts(table: Any) -> dict[str, int]:
    """Failed rows of a download table (Arrow, with ``status`` and ``error_message``) by class."""
    import pyarrow.compute as pc

    counts = pc.value_counts(error_classes(table).drop_null())
    return {name: int(n) for name, n in zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(),
                                            strict=True)}  # fmt: skip


# never fetched again: the URL is not http(s), or the site said no
NOT_RETRIED = {"invalid_url": "its URLs are not http(s)", "opted_out": "the sites opted out (X-Robots-Tag)"}


def check_retry_classes(classes: Any, key: str = "download.retry") -> list[str]:
    """``classes`` (a list, or one comma-separated string) as the error classes a retry pass may
    refetch, in :data:`CLASSES` order.

    Raises:
        UserError: a name is not a class, or is one never retried; the message names it.
    """
    from pipeline.errors import UserError

    names = [c.strip() for c in (classes.split(",") if isinstance(classes, str) else classes) if c.strip()]
    known = [name for name, _, _ in CLASSES]
    for name in names:
        if name in NOT_RETRIED:
            raise UserError(f"{key}: {name!r} is never retried: {NOT_RETRIED[name]}")
        if name not in known:
            raise UserError(f"{key}: {name!r} is not an error class; the classes are {', '.join(known)}")
    return [name for name in known if name in names]


CLASS_PREFIX = "error:"  # a download marker's counts of failed rows by class: "error:dns", ...
_ATTEMPTED = (S.STATUS_SUCCESS, S.STATUS_FAILED_DOWNLOAD, S.STATUS_FAILED_RESIZE)


def health_warning(counts: dict[str, int], rate: float, min_samples: int) -> str | None:
    """One line when the fetched samples' success rate so far (``counts``: the download markers'
    counts summed) is below ``rate`` past ``min_samples`` attempts: the rate, the top error classes
    and a hint for each; None otherwise."""
    attempted = sum(counts.get(s, 0) for s in _ATTEMPTED)
    if rate <= 0 or attempted < min_samples or not attempted:  # a rate of 0 turns the warning off
        return None
    success = counts.get(S.STATUS_SUCCESS, 0) / attempted
    if success >= rate:
        return None
    top = sorted(((k.removeprefix(CLASS_PREFIX), v) for k, v in counts.items() if k.startswith(CLASS_PREFIX)),
                 key=lambda kv: -kv[1])[:3]  # fmt: skip
    causes = "; ".join(f"{name} {n:,} ({100 * n / attempted:.0f}%): {HINTS.get(name, '')}" for name, n in top)
    return (f"download: only {100 * success:.1f}% of {attempted:,} samples fetched so far succeeded (warning below "
            f"{100 * rate:.0f}%, download.warn_success_rate); top errors: {causes}")
