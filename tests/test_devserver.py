from __future__ import annotations

import io
import urllib.error
import urllib.request
from collections import Counter

import pytest
from PIL import Image

from pipeline.devserver import image_bytes, kind_of, token_for
from tests.conftest import laion_rows


def _fetch(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, b""


def test_images_are_deterministic_and_varied():
    assert image_bytes(12345) == image_bytes(12345)
    sizes = {Image.open(io.BytesIO(image_bytes(seed))).size for seed in range(1, 200)}
    assert len(sizes) > 150
    ratios = [max(w, h) / min(w, h) for w, h in sizes]
    assert max(ratios) > 3.0  # some fail DataComp's aspect rule
    assert min(min(s) for s in sizes) < 200  # and some its size rule


def test_every_failure_class_occurs_in_the_demo_urls():
    kinds = Counter(kind_of(token_for(u)) for u in laion_rows(10_000)["url"].to_pylist())
    assert set(kinds) == {"ok", "missing", "truncated", "not_image", "slow", "duplicate", "near_duplicate"}
    assert kinds["ok"] > 9000


@pytest.mark.parametrize("kind", ["ok", "missing", "truncated", "not_image", "duplicate", "near_duplicate"])
def test_server_answers_by_kind(image_server, kind):
    url = next(u for u in laion_rows(2000)["url"].to_pylist() if kind_of(token_for(u)) == kind)
    status, body = _fetch(image_server.url_for(url))
    if kind == "missing":
        assert status == 404
        return
    assert status == 200
    if kind == "not_image":
        assert body.startswith(b"<html>")
    elif kind == "truncated":
        with pytest.raises(OSError):
            Image.open(io.BytesIO(body)).load()
    else:
        Image.open(io.BytesIO(body)).load()
