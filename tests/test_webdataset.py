from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from pipeline.store.webdataset import UnsafeShardError, decode_image, image_of, iter_shard


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _jpeg(size=(32, 24)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, "blue").save(out, format="JPEG")
    return out.getvalue()


class Boom:
    def __reduce__(self):
        return (exec, ("raise SystemExit('unpickled!')",))


def test_groups_members_into_samples_and_never_unpickles(tmp_path: Path):
    path = _tar(tmp_path / "s.tar", {
        "a/001.jpg": _jpeg(), "a/001.txt": b"a cat", "a/001.json": b'{"uid": "x"}',
        "a/001.pyd": pickle.dumps(Boom()), "002.jpg": _jpeg((10, 10)), "002.txt": "caf\u00e9".encode(),
    })  # fmt: skip
    samples = list(iter_shard(path))
    assert [s["__key__"] for s in samples] == ["a/001", "002"]
    first = samples[0]
    assert first["txt"] == "a cat" and first["json"] == {"uid": "x"}
    assert "pyd" not in first and first["__skipped__"] == ["a/001.pyd"]
    assert image_of(first)[0] == "jpg"
    assert samples[1]["txt"] == "café"


@pytest.mark.parametrize("name", ["../escape.txt", "/etc/passwd.txt", "a/../../b.txt", "C:/x.txt"])
def test_unsafe_member_names_are_refused(tmp_path: Path, name: str):
    path = _tar(tmp_path / "evil.tar", {"ok.txt": b"fine", name: b"bad"})
    with pytest.raises(UnsafeShardError, match=r"evil\.tar: member .* absolute or parent-relative"):
        list(iter_shard(path))


def test_bad_text_is_a_sample_error_not_a_crash(tmp_path: Path):
    path = _tar(tmp_path / "s.tar", {"1.txt": b"\xff\xfe", "1.json": b"{not json", "2.txt": b"ok"})
    samples = list(iter_shard(path))
    assert "cannot decode" in samples[0]["__error__"]
    assert samples[1]["__error__"] is None


def test_decompression_bomb_is_refused_from_the_header():
    out = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(out, format="PNG")  # 144 Mpx, a few KB on disk
    image, error = decode_image(out.getvalue())
    assert image is None and "exceeds the limit of 89478485 pixels" in error
    image, error = decode_image(_jpeg((40, 30)))
    assert error is None and image.size == (40, 30) and image.mode == "RGB"
    assert decode_image(_jpeg()[:50])[1].startswith("cannot decode image")
