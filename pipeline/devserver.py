"""A loopback HTTP server that serves a deterministic generated image for every demo URL.

The web is unreachable where the demo and the tests run, so the demo rewrites each real URL of the
bundled LAION sample to ``http://127.0.0.1:PORT/img/<token>.jpg`` (``token`` = the first 16 hex
digits of ``md5(url)``) and runs the real download stage against this server. Everything a URL gets
follows from its token, so two runs serve identical bytes:

- most URLs get a JPEG of varied size (long side 64-800 px) and aspect ratio (about 1:4 to 4:1);
- about 2% share one of 50 images with other URLs (exact duplicates, for deduplication), and 1% get
  one of those 50 images resized and re-encoded (near duplicates, for semantic deduplication);
- about 1.5% answer 404, 1% a truncated JPEG, 1% an HTML page, 0.5% only after ``slow_seconds``
  (longer than the demo's timeout);
- with ``fail_share``, that share of all URLs answers 503 instead (a run going badly), and with
  ``slow_share`` another share answers only after ``slow_seconds`` (both can be changed while the
  server runs: a flaky web that recovers); with ``transient_share``, that share of requests fails
  once, whatever the URL (half 503, half an answer after ``slow_seconds``): the n-th request for a
  token fails when ``md5(token:n)`` says so (:func:`transient`), so a later request may succeed;
- ``/trickle/<token>.jpg`` sends its image 64 bytes every 0.1 s (a stalled server);
- ``/busy/<seconds>/<token>.jpg`` answers its first request with 429 and ``Retry-After: <seconds>``,
  later ones with the image (a rate-limiting host);
- it records, per ``Host`` header, the most requests it served at once (``max_in_flight``), and
  when each request for a token arrived (``arrivals``).

This module is independent of the rest of ``pipeline`` (stdlib and Pillow only).
"""

from __future__ import annotations

import hashlib
import io
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# Failure classes by token bucket (per mille), in order.
KINDS = (("missing", 15), ("truncated", 10), ("not_image", 10), ("slow", 5), ("duplicate", 20), ("near_duplicate", 10))
SHARED_IMAGES = 50  # duplicates and near duplicates share these images


def token_for(url: str) -> str:
    return hashlib.md5(url.encode("utf-8"), usedforsecurity=False).hexdigest()[:16]


def kind_of(token: str) -> str:
    """What the server does for ``token``: ``ok`` or one of the failure/duplicate classes."""
    bucket = int(token, 16) % 1000
    edge = 0
    for kind, share in KINDS:
        edge += share
        if bucket < edge:
            return kind
    return "ok"


def fails(token: str, fail_share: float) -> bool:
    """Whether a server with ``fail_share`` answers ``token`` with 503."""
    return bool(fail_share) and int(token[-4:], 16) % 1000 < 1000 * fail_share


def slows(token: str, slow_share: float) -> bool:
    """Whether a server with ``slow_share`` answers ``token`` only after ``slow_seconds`` (tokens
    other than :func:`fails`' share: the digits before its last four)."""
    return bool(slow_share) and int(token[-8:-4], 16) % 1000 < 1000 * slow_share


def transient(token: str, n: int, share: float) -> str | None:
    """What a server with ``transient_share`` does with the ``n``-th request (1-based) for ``token``:
    ``"503"``, ``"slow"`` or None (answer as usual)."""
    if not share:
        return None
    bucket = int(hashlib.md5(f"{token}:{n}".encode(), usedforsecurity=False).hexdigest()[:6], 16) % 100_000
    if bucket >= 100_000 * share:
        return None
    return "503" if bucket % 2 else "slow"


def image_bytes(seed: int) -> bytes:
    """A JPEG drawn from ``seed``: size, aspect ratio, colours and shapes all follow from it."""
    from PIL import Image, ImageDraw

    rng = _Rng(seed)
    long_side = 64 + rng.next() % 737
    ratio = math.exp((rng.next() % 2801 - 1400) / 1000)  # about 1:4 .. 4:1
    width = max(8, round(long_side if ratio >= 1 else long_side * ratio))
    height = max(8, round(long_side / ratio if ratio >= 1 else long_side))
    bg = tuple(rng.next() % 256 for _ in range(3))
    img = Image.new("RGB", (width, height), bg)
    draw = ImageDraw.Draw(img)
    for _ in range(1 + rng.next() % 5):
        x0, y0 = rng.next() % width, rng.next() % height
        x1, y1 = x0 + 1 + rng.next() % width, y0 + 1 + rng.next() % height
        fill = tuple(rng.next() % 256 for _ in range(3))
        (draw.ellipse if rng.next() % 2 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=85)
    return out.getvalue()


def shared_seed(token: str) -> int:
    """Which of the shared images a duplicate or near duplicate serves."""
    return int(token, 16) // 1000 % SHARED_IMAGES


def near_duplicate_bytes(token: str) -> bytes:
    """The shared image of ``token`` resized to 60-90% and re-encoded at JPEG quality 60-80."""
    from PIL import Image

    img = Image.open(io.BytesIO(image_bytes(shared_seed(token))))
    rng = _Rng(int(token, 16))
    scale = 0.6 + (rng.next() % 31) / 100
    img = img.resize((max(8, round(img.width * scale)), max(8, round(img.height * scale))), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=60 + rng.next() % 21)
    return out.getvalue()


def served_image(token: str) -> bytes | None:
    """The image bytes the server answers ``token`` with, or None when it answers no image."""
    kind = kind_of(token)
    if kind in ("ok", "slow"):
        return image_bytes(int(token, 16))
    if kind in ("duplicate", "truncated"):
        body = image_bytes(shared_seed(token) if kind == "duplicate" else int(token, 16))
        return body if kind == "duplicate" else body[: len(body) // 3]
    if kind == "near_duplicate":
        return near_duplicate_bytes(token)
    return None


class _Rng:
    """xorshift64: tiny, deterministic across Python versions (``random`` seeding is not promised)."""

    def __init__(self, seed: int):
        self.state = (seed & 0xFFFFFFFFFFFFFFFF) or 0x9E3779B97F4A7C15

    def next(self) -> int:
        x = self.state
        x ^= (x << 13) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 7
        x ^= (x << 17) & 0xFFFFFFFFFFFFFFFF
        self.state = x
        return x


class _Handler(BaseHTTPRequestHandler):
    server: DemoImageServer._HTTPServer  # type: ignore[name-defined]

    def do_GET(self) -> None:
        self._host = (self.headers.get("Host") or "").rsplit(":", 1)[0]
        self.server.entered(self._host)
        try:
            self._get()
        finally:
            self._done()

    def _done(self) -> None:
        """The request stops counting as in flight: before its body is written (a client that read
        it all may send its next request before this thread runs again), or when it ends."""
        if getattr(self, "_host", None) is not None:
            self.server.left(self._host)
            self._host = None

    def _get(self) -> None:
        parts = self.path.strip("/").split("/")
        token = parts[-1].removesuffix(".jpg") if parts[-1].endswith(".jpg") else ""
        if len(token) != 16 or token.strip("0123456789abcdef"):
            return self._send(404, b"not found", "text/plain")
        self.server.arrived(token)
        if len(parts) == 2 and parts[0] == "trickle":
            return self._trickle(image_bytes(int(token, 16)))
        if len(parts) == 3 and parts[0] == "busy" and parts[1].isdigit():
            if len(self.server.arrivals[token]) == 1:
                return self._send(429, b"slow down", "text/plain", {"Retry-After": parts[1]})
            return self._send(200, image_bytes(int(token, 16)), "image/jpeg")
        if len(parts) != 2 or parts[0] != "img":
            return self._send(404, b"not found", "text/plain")
        kind = kind_of(token)
        glitch = transient(token, len(self.server.arrivals[token]), self.server.transient_share)
        if glitch == "503":
            return self._send(503, b"unavailable", "text/plain")
        if glitch == "slow":
            time.sleep(self.server.slow_seconds)
        if fails(token, self.server.fail_share):
            return self._send(503, b"unavailable", "text/plain")  # a failing run (fail_share)
        if kind == "missing":
            return self._send(404, b"not found", "text/plain")
        if kind == "not_image":
            return self._send(200, b"<html><body>This is not an image</body></html>", "text/html")
        body = served_image(token) or b""
        if kind == "slow" or slows(token, self.server.slow_share):
            time.sleep(self.server.slow_seconds)
        elif self.server.latency_seconds:
            time.sleep(self.server.latency_seconds)
        return self._send(200, body, "image/jpeg")

    def _trickle(self, body: bytes) -> None:
        """``/trickle/<token>.jpg``: the image, 64 bytes every 0.1 s (a stalled server: each read
        gets data in time, the whole response takes minutes)."""
        try:
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            for i in range(0, len(body), 64):
                self.wfile.write(body[i : i + 64])
                self.wfile.flush()
                time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up
            pass

    def _send(self, code: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(code)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self._done()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
            pass

    def log_message(self, format: str, *args: object) -> None:
        return


class DemoImageServer:
    """Serve generated images on loopback in a background thread; use as a context manager."""

    class _HTTPServer(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 256  # many downloader threads connect at once
        slow_seconds = 3.0
        latency_seconds = 0.0
        fail_share = 0.0
        slow_share = 0.0
        transient_share = 0.0

        def server_activate(self) -> None:
            super().server_activate()
            self.lock = threading.Lock()
            self.in_flight: dict[str, int] = {}
            self.max_in_flight: dict[str, int] = {}
            self.arrivals: dict[str, list[float]] = {}

        def entered(self, host: str) -> None:
            with self.lock:
                self.in_flight[host] = self.in_flight.get(host, 0) + 1
                self.max_in_flight[host] = max(self.max_in_flight.get(host, 0), self.in_flight[host])

        def left(self, host: str) -> None:
            with self.lock:
                self.in_flight[host] -= 1

        def arrived(self, token: str) -> None:
            with self.lock:
                self.arrivals.setdefault(token, []).append(time.time())

    def __init__(self, port: int = 0, slow_seconds: float = 3.0, host: str = "127.0.0.1", latency_seconds: float = 0.0,
                 fail_share: float = 0.0, slow_share: float = 0.0, transient_share: float = 0.0):  # fmt: skip
        """Args:
        port: TCP port on loopback; 0 picks a free one.
        slow_seconds: Delay of the deliberately slow answers.
        host: Address to bind (keep it on loopback).
        latency_seconds: Delay added to every other image answer, to pace a test run.
        fail_share: Share of URLs (by the last 4 hex digits of their token) answered 503, a run
            going badly (:func:`fails`).
        slow_share: Another share of URLs answered after ``slow_seconds`` (:func:`slows`).
        transient_share: Share of requests that fail once (:func:`transient`).
        """
        try:
            self._server = self._HTTPServer((host, port), _Handler)
        except OSError as exc:
            raise OSError(f"demo image server: cannot listen on {host}:{port}: {exc}") from exc
        self._server.slow_seconds = slow_seconds
        self._server.latency_seconds = latency_seconds
        self.flaky(fail_share, slow_share)
        self._server.transient_share = transient_share
        self._thread = threading.Thread(target=self._server.serve_forever, name="demo-images", daemon=True)

    def flaky(self, fail_share: float = 0.0, slow_share: float = 0.0) -> None:
        """Set (or, with no arguments, clear) the shares of 503 and slow answers, also while serving."""
        self._server.fail_share, self._server.slow_share = fail_share, slow_share

    @property
    def max_in_flight(self) -> dict[str, int]:
        """Per ``Host`` header (without the port): the most requests served at once so far."""
        with self._server.lock:
            return dict(self._server.max_in_flight)

    @property
    def arrivals(self) -> dict[str, list[float]]:
        """Per token: when each of its requests arrived (``time.time()``)."""
        with self._server.lock:
            return {k: list(v) for k, v in self._server.arrivals.items()}

    def url_on(self, host: str, path: str) -> str:
        """``http://<host>:<port>/<path>``: this server under another host name (``localhost``)."""
        return f"http://{host}:{self._server.server_address[1]}/{path}"

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def url_for(self, url: str) -> str:
        return f"{self.base_url}/img/{token_for(url)}.jpg"

    def __enter__(self) -> DemoImageServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def rewrite_url_list(src: Path, dst: Path, base_url: str, url_col: str = "URL", caption_col: str = "TEXT") -> int:
    """Write ``dst`` (Parquet: url, caption, source_url) pointing every row of ``src`` at the server.

    Rows whose URL is not http(s) keep it, so the download stage's refusal of other schemes shows.
    Returns the number of rows written.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(src, columns=[url_col, caption_col])
    urls = table[url_col].to_pylist()
    rewritten = [
        f"{base_url}/img/{token_for(u)}.jpg" if u and u.lower().startswith(("http://", "https://")) else u for u in urls
    ]
    out = pa.table({"url": rewritten, "caption": table[caption_col], "source_url": urls})
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    pq.write_table(out, tmp)
    tmp.replace(dst)
    return out.num_rows
