"""``curate browse POOL``: a read-only web app over a pool (FastAPI, served by uvicorn).

Pages: the report (``/report/``), a grid of samples filtered by a SQL predicate, a drop reason, a
stage that dropped them, a MetaCLIP entry, a MoDE expert or fine cluster (``/grid``, 100 a page),
a sample (``/sample/{uid}``: its image, caption, every column of every stage, why it was dropped,
its duplicate group, its nearest neighbours when the pool has an index), a cluster
(``/cluster/{id}``) and an entry (``/entry/{id}``). Every filtered view shows the ``curate export``
command that would release that selection; nothing writes.

Safety: the app binds 127.0.0.1 unless told otherwise, and then every request must carry the
token (``?token=`` once, then a cookie; or ``Authorization: Bearer``). Images are found by uid
through the pool's tables (:mod:`pipeline.browse.images`), never by a path from the request; a
report file is served only if its name is in the report folder's listing. Every predicate, the
user's and the one the filters build, is one SQL expression checked by :mod:`pipeline.sqlsafe` and
run on the confined connection (it reads the pool and nothing else).
"""


import hmac
import html
import shlex
import threading
from collections import OrderedDict
from typing import Any
from urllib.parse import urlencode

from pipeline.browse.images import UID_PATTERN, Images, media_type
from pipeline.errors import UserError
from pipeline.sqlsafe import check_expression, literal
from pipeline.store.parquet import Pool

PAGE = 100
COOKIE = "clipcurate_token"
VECTORS = ("image_embedding", "text_embedding", "caption_embedding")
# a stage's own drop: the samples it dropped, by the columns it writes
DROPPED_BY = {"download": "status <> 'success'", "metaclip": "not metaclip_keep", "filters": "not keep",
              "dedup": "not dedup_keep", "rebalance": "not rebalance_keep"}  # fmt: skip
_STYLE = ("body{font-family:sans-serif;margin:1em}a{color:#246}nav a{margin-right:1em}.grid{display:flex;"
          "flex-wrap:wrap;gap:8px}.cell{width:200px;font-size:12px}.cell img{max-width:192px;max-height:192px}"
          "td{padding:2px 8px;border-bottom:1px solid #ddd;font-size:13px}code{background:#eee;padding:4px}")


class Browser:
    """What the routes need: the pool, a confined connection (one query at a time), the images,
    and the index's searcher if the pool has an index."""

    def __init__(self, pool: Pool):
        from pipeline.query import connect

        self.pool, self.lock = pool, threading.Lock()
        self.con = connect(pool, confined=True)
        self.columns = {r[0] for r in self.con.execute("describe samples").fetchall()}
        self.images = Images(pool, self.locate)
        self.located: OrderedDict[str, tuple[int, str]] = OrderedDict()
        self.searcher = None
        if (pool.root / "index" / "image" / "index.json").exists():
            from pipeline.index.search import Searcher

            self.searcher = Searcher(pool)

    def sql(self, query: str, params: list[Any] | None = None) -> list[tuple]:
        import duckdb

        with self.lock:
            try:
                return self.con.execute(query, params or []).fetchall()
            except duckdb.Error as exc:
                raise UserError(str(exc).splitlines()[0]) from None

    def locate(self, uid: str) -> tuple[int, str] | None:
        """A fetched sample's shard and key: remembered from the page that showed it, else looked up."""
        with self.lock:
            if uid in self.located:
                return self.located[uid]
        rows = self.sql("select shard, key from download where uid = ? and status = 'success'", [uid])
        return (int(rows[0][0]), rows[0][1]) if rows else None

    def shown(self, rows: list[tuple]) -> None:
        """Remember the ``(uid, shard, key)`` of the samples a page shows: their thumbnails come next."""
        with self.lock:
            for uid, shard, key in rows:
                self.located[uid] = (int(shard), key)
                self.located.move_to_end(uid)
            while len(self.located) > 4 * PAGE:
                self.located.popitem(last=False)

    def predicate(self, q: dict[str, str]) -> str | None:
        """The filters of a grid request as one SQL expression over ``samples`` (None: every sample)."""
        parts = []
        if q.get("where"):
            parts.append(f"({check_expression(q['where'], 'where')})")
        if q.get("reason"):
            parts.append(f"drop_reason = {literal(q['reason'])}")
        if q.get("stage"):
            if q["stage"] not in DROPPED_BY:
                raise UserError(f"stage: one of {', '.join(DROPPED_BY)}")
            parts.append(DROPPED_BY[q["stage"]])
        for name, template in (("entry", "list_contains(matched_entry_ids, {})"), ("expert", "expert_id = {}"),
                               ("cluster", "fine_id = {}")):  # fmt: skip
            if q.get(name):
                if not q[name].isdigit():
                    raise UserError(f"{name}: a whole number")
                parts.append(template.format(int(q[name])))
        if q.get("kept") in ("yes", "no"):
            parts.append("keep" if q["kept"] == "yes" else "not keep")
        return " and ".join(parts) or None


def _page(title: str, body: str, token: str | None = None) -> str:
    nav = "".join(f"<a href='{href}'>{name}</a>" for name, href in
                  (("Report", "/report/"), ("All samples", "/grid"), ("Kept", "/grid?kept=yes"),
                   ("Dropped", "/grid?kept=no")))  # fmt: skip
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><nav>{nav}</nav><h1>{html.escape(title)}</h1>{body}</body></html>")


def _thumb(uid: str, caption: str | None, note: str = "") -> str:
    return (f"<div class='cell'><a href='/sample/{uid}'><img class='thumb' loading='eager' src='/thumb/{uid}' "
            f"alt=''></a><br>{html.escape((caption or '')[:80])}<br><i>{html.escape(note)}</i></div>")


def _shell_word(text: str) -> str:
    """``text`` as one shell word: in double quotes when nothing in it is special there (SQL's single
    quotes stay readable), else POSIX single-quoting."""
    return f'"{text}"' if not set(text) & set('"$`\\!') else shlex.quote(text)


def _export_command(pool: Pool, where: str | None) -> str:
    command = f"curate export {shlex.quote(str(pool.root))} --out RELEASE_DIR"
    if where:
        command += f" --where {_shell_word(where)}"
    return f"<p>Release this selection: <code class='export'>{html.escape(command)}</code></p>"


def grid_page(b: Browser, q: dict[str, str]) -> str:
    where = b.predicate(q)
    page = int(q.get("page", "0")) if q.get("page", "0").isdigit() else 0
    cond = f"status = 'success' and ({where})" if where else "status = 'success'"
    total = b.sql(f"select count(*) from samples where {cond}")[0][0]
    note = "drop_reason" if "drop_reason" in b.columns else "status"
    rows = b.sql(f"select uid, caption, {note}, shard, key from samples where {cond} order by uid limit {PAGE} "
                 f"offset {page * PAGE}")  # fmt: skip
    b.shown([(uid, shard, key) for uid, _, _, shard, key in rows])
    reasons = [r[0] for r in b.sql("select distinct drop_reason from samples where drop_reason is not null "
                                   "order by 1")] if "drop_reason" in b.columns else []  # fmt: skip
    form = _filter_form(q, reasons)
    cells = "".join(_thumb(uid, cap, n or "") for uid, cap, n, _, _ in rows)
    pager = ""
    if (page + 1) * PAGE < total:
        pager = f"<p><a class='next' href='/grid?{urlencode({**q, 'page': page + 1})}'>next {PAGE}</a></p>"
    body = (f"{form}<p><b class='total'>{total}</b> samples (page {page + 1}): <code>{html.escape(where or 'all')}"
            f"</code></p>{_export_command(b.pool, where)}<div class='grid'>{cells}</div>{pager}")  # fmt: skip
    return _page("Samples", body)


def _filter_form(q: dict[str, str], reasons: list[str]) -> str:
    options = "".join(f"<option{' selected' if r == q.get('reason') else ''}>{html.escape(r)}</option>"
                      for r in ["", *reasons])  # fmt: skip
    stages = "".join(f"<option{' selected' if s == q.get('stage') else ''}>{s}</option>" for s in ["", *DROPPED_BY])
    fields = "".join(f" {name} <input name='{name}' size='6' value='{html.escape(q.get(name, ''))}'>"
                     for name in ("entry", "expert", "cluster"))  # fmt: skip
    return (f"<form action='/grid'>SQL <input name='where' size='50' value='{html.escape(q.get('where', ''))}'> "
            f"reason <select name='reason'>{options}</select> dropped by <select name='stage'>{stages}</select>"
            f"{fields} <button>show</button></form>")


def sample_page(b: Browser, uid: str) -> str:
    if not UID_PATTERN.match(uid):
        raise UserError("a uid is 32 hex digits")
    shown = [c for c in sorted(b.columns) if c not in VECTORS]
    rows = b.sql(f"select {', '.join(shown)} from samples where uid = ?", [uid])
    if not rows:
        raise UserError(f"no sample {uid}")
    record = dict(zip(shown, rows[0], strict=True))
    table = "".join(f"<tr><td>{html.escape(c)}</td><td class='v' data-col='{html.escape(c)}'>"
                    f"{html.escape(str(v))}</td></tr>" for c, v in record.items())  # fmt: skip
    body = (f"<img class='full' src='/image/{uid}' alt=''><p class='caption'>{html.escape(record.get('caption') or '')}"
            f"</p><p>Dropped because: <b class='reason'>{html.escape(str(record.get('drop_reason') or 'kept'))}</b>"
            f"</p>{_links(record)}<h2>Duplicate group</h2>{_duplicates(b, record)}<h2>Nearest neighbours</h2>"
            f"{_neighbours(b, uid)}<h2>Every column</h2><table>{table}</table>")  # fmt: skip
    return _page(f"Sample {uid}", body)


def _links(record: dict[str, Any]) -> str:
    out = []
    if record.get("fine_id") is not None:
        out.append(f"<a class='cluster' href='/cluster/{int(record['fine_id'])}'>cluster {record['fine_id']}</a>")
    if record.get("expert_id") is not None:
        out.append(f"<a href='/grid?expert={int(record['expert_id'])}'>expert {record['expert_id']}</a>")
    for entry in (record.get("matched_entry_ids") or [])[:20]:
        out.append(f"<a class='entry' href='/entry/{int(entry)}'>entry {entry}</a>")
    return f"<p>{' '.join(out)}</p>"


def _duplicates(b: Browser, record: dict[str, Any]) -> str:
    if "dup_group" not in b.columns:
        return "<p>No deduplication in this pool.</p>"
    group = record.get("dup_group")
    lead = group or record["uid"]
    # the group's lead first: a large group must still show the sample it kept
    rows = b.sql("select uid, caption, dup_kind, count(*) over () from samples where (dup_group = ? or uid = ?) "
                 "and uid <> ? and status = 'success' order by uid = ? desc, uid limit 50",
                 [lead, lead, record["uid"], lead])  # fmt: skip
    if not rows:
        return "<p>None: no other sample shares its image.</p>"
    cells = "".join(_thumb(u, c, k or "kept (the group's first)") for u, c, k, _ in rows)
    more = f"<p>{rows[0][3] - len(rows)} more not shown.</p>" if rows[0][3] > len(rows) else ""
    return f"<div class='grid dups'>{cells}</div>{more}"


def _neighbours(b: Browser, uid: str) -> str:
    if b.searcher is None:
        return f"<p>No index: run <code>curate index {html.escape(str(b.pool.root))}</code>.</p>"
    from pipeline.index.search import query_vector, search

    with b.lock:  # the uid's shard found on the browser's own connection: a sample page opens none
        try:
            vector = query_vector(b.pool, "image", uid=uid, con=b.con)
        except UserError as exc:
            return f"<p>{html.escape(str(exc))}</p>"
        hits = search(b.pool, vector, k=9, searcher=b.searcher, con=b.con)
    cells = "".join(_thumb(u, c, f"{s:.3f}") for u, s, c in zip(hits["uid"].to_pylist(), hits["score"].to_pylist(),
                                                                  hits["caption"].to_pylist(), strict=True) if u != uid)
    return f"<div class='grid neighbours'>{cells}</div>"


def cluster_page(b: Browser, cluster: int) -> str:
    if "fine_id" not in b.columns:
        raise UserError("no MoDE clusters in this pool")
    size, kept = b.sql("select count(*), count(*) filter (rebalance_keep) from samples where fine_id = ?"
                       if "rebalance_keep" in b.columns else
                       "select count(*), null from samples where fine_id = ?", [cluster])[0]  # fmt: skip
    terms = b.sql("select w, count(*) from (select unnest(string_split(lower(caption), ' ')) as w from samples "
                  "where fine_id = ?) where length(w) > 3 group by 1 order by 2 desc, 1 limit 12",
                  [cluster])  # fmt: skip
    top = ", ".join(f"{html.escape(w)} ({n})" for w, n in terms)
    rows = b.sql("select uid, caption from samples where fine_id = ? and status = 'success' order by uid limit 30",
                 [cluster])  # fmt: skip
    where = f"fine_id = {cluster}"
    body = (f"<p>Samples: <b class='size'>{size}</b>; kept by rebalancing: <b class='kept'>{kept}</b></p>"
            f"<p>Top terms: {top}</p>{_export_command(b.pool, where)}<p><a href='/grid?cluster={cluster}'>all of "
            f"them</a></p><div class='grid'>{''.join(_thumb(u, c) for u, c in rows)}</div>")  # fmt: skip
    return _page(f"Cluster {cluster}", body)


def entry_page(b: Browser, entry: int) -> str:
    import pyarrow.parquet as pq

    path = b.pool.aggregates_dir / "metaclip_entry_counts.parquet"
    if not path.exists():
        raise UserError("no MetaCLIP balancing in this pool")
    found = pq.read_table(path, filters=[("entry_id", "=", entry)]).to_pylist()
    if not found:
        raise UserError(f"no entry {entry}")
    e = found[0]
    where = f"metaclip_keep and list_contains(matched_entry_ids, {entry})"
    rows = b.sql(f"select uid, caption from samples where {where} and status = 'success' order by uid limit 30")
    body = (f"<p>Entry <b class='entry-text'>{html.escape(e['entry'])}</b>: matched by <b class='count'>"
            f"{e['count']}</b> samples, probability <b class='p'>{e['p']}</b>, kept <b>{e['kept']}</b></p>"
            f"{_export_command(b.pool, where)}<div class='grid'>{''.join(_thumb(u, c) for u, c in rows)}</div>")
    return _page(f"MetaCLIP entry {entry}", body)


def report_file(b: Browser, name: str) -> tuple[bytes, str] | None:
    """A file of ``<pool>/report/`` whose name is in that folder's listing (never a path joined from
    the request), with its media type."""
    folder = b.pool.root / "report"
    listing = {p.name: p for p in folder.iterdir() if p.is_file()} if folder.is_dir() else {}
    path = listing.get(name or "index.html")
    if path is None:
        return None
    kinds = {".html": "text/html; charset=utf-8", ".png": "image/png", ".jpg": "image/jpeg", ".css": "text/css"}
    return path.read_bytes(), kinds.get(path.suffix, "application/octet-stream")


def _guard(token: str) -> Any:
    """The middleware that refuses a request without ``token`` (a cookie once it was given)."""
    from fastapi import Request
    from fastapi.responses import Response

    async def guard(request: Request, call_next: Any) -> Any:
        given = (request.query_params.get("token") or request.cookies.get(COOKIE)
                 or request.headers.get("authorization", "").removeprefix("Bearer "))  # fmt: skip
        if not given or not hmac.compare_digest(given, token):
            return Response("a token is required (printed when the browser started)", status_code=401)
        response = await call_next(request)
        if request.query_params.get("token"):
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return response

    return guard


def make_app(pool: Pool, token: str | None = None) -> Any:
    """The FastAPI app over ``pool``; with ``token``, every request must carry it."""
    import contextlib

    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, RedirectResponse, Response

    b = Browser(pool)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        yield
        b.con.close()

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    if token is not None:  # on loopback without a token, no per-request cost
        app.middleware("http")(_guard(token))

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError) -> Any:
        return HTMLResponse(_page("Refused", f"<p class='error'>{html.escape(str(exc))}</p>"), status_code=400)

    @app.get("/")
    def home() -> Any:
        return RedirectResponse("/report/" if report_file(b, "") else "/grid")

    @app.get("/report/{name:path}")
    def report(name: str) -> Any:
        found = report_file(b, name)
        return Response(found[0], media_type=found[1]) if found else Response("no such report file", status_code=404)

    @app.get("/grid", response_class=HTMLResponse)
    def grid(request: Request) -> Any:
        return grid_page(b, {k: v for k, v in request.query_params.items() if k != "token"})

    @app.get("/sample/{uid}", response_class=HTMLResponse)
    def sample(uid: str) -> Any:
        return sample_page(b, uid)

    @app.get("/cluster/{cluster}", response_class=HTMLResponse)
    def cluster(cluster: int) -> Any:
        return cluster_page(b, cluster)

    @app.get("/entry/{entry}", response_class=HTMLResponse)
    def entry(entry: int) -> Any:
        return entry_page(b, entry)

    @app.get("/image/{uid}")
    def image(uid: str) -> Any:
        found = b.images.original(uid)
        return Response(found[1], media_type=media_type(found[0])) if found else Response(status_code=404)

    @app.get("/thumb/{uid}")
    def thumb(uid: str) -> Any:
        data = b.images.thumbnail(uid)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"}) if data else (
            Response(status_code=404))  # fmt: skip

    return app


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def app_for(pool: Pool, host: str, token: str | None = None) -> tuple[Any, str | None]:
    """The app and its token: a host other than loopback always gets one (the one given, or a new
    one); loopback gets the one given, if any."""
    import secrets

    if host not in LOOPBACK and not token:
        token = secrets.token_urlsafe(18)
    return make_app(pool, token), token


def serve(pool: Pool, host: str = "127.0.0.1", port: int = 8765, token: str | None = None) -> None:
    """Serve the app (blocking); the address, with the token when there is one, is printed once."""
    import uvicorn

    app, token = app_for(pool, host, token)
    print(f"browsing {pool.root} at http://{host}:{port}/" + (f"?token={token}" if token else ""), flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
