from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, config_hash, load_config, parse_config
from tests.conftest import REPO


def _cfg(**download):
    return {"pool": "p", "download": {"input": "urls.parquet", **download}}


def test_demo_config_loads_with_frozen_sections():
    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert cfg.pool == "runs/demo"
    assert cfg.download.samples_per_shard == 1000
    assert cfg.demo is not None and cfg.demo.port == 18765
    with pytest.raises(AttributeError):
        cfg.download.timeout = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_cfg(timeoutt=3), "download.timeoutt: unknown key (did you mean 'timeout'?)"),
        ({"pool": "p", "downlaod": {}}, "downlaod: unknown key (did you mean 'download'?)"),
        (_cfg(timeout=0), "download.timeout: must be > 0"),
        (_cfg(resize_mode="stretch"), "download.resize_mode: Input should be"),
        (_cfg(threads="many"), "download.threads: Input should be a valid integer"),
        (_cfg(max_aspect_ratio=0.5), "download.max_aspect_ratio: must be >= 1.0"),
        ({"pool": "p"}, "download: required key is missing"),
        ({"pool": "p", "download": {"input": "u"}, "engine": "dask"}, "engine: Input should be 'local' or 'spark'"),
    ],
)
def test_bad_config_names_the_key(data, message):
    with pytest.raises(ConfigError) as err:
        parse_config(data, "my.yaml")
    assert str(err.value).startswith("my.yaml: ")
    assert message in str(err.value)


def test_yaml_file_errors_name_the_file(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("pool: p\ndownload:\n  input: u\n  proceses: 2\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: download\.proceses: unknown key \(did you mean 'processes'\?\)"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    path.write_text("")
    with pytest.raises(ConfigError, match="config file is empty"):
        load_config(path)


def test_overrides_use_dotted_keys(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("pool: p\ndownload:\n  input: u\n")
    cfg = load_config(path, {"download.processes": 4, "flow.task_retries": 0})
    assert cfg.download.processes == 4
    assert cfg.flow.task_retries == 0


def test_config_hash_ignores_excluded_fields_only():
    a = parse_config(_cfg(processes=1)).download
    b = parse_config(_cfg(processes=2)).download
    c = parse_config(_cfg(processes=1, image_size=256)).download
    assert config_hash(a) != config_hash(b)
    assert config_hash(a, exclude=("processes",)) == config_hash(b, exclude=("processes",))
    assert config_hash(a, exclude=("processes",)) != config_hash(c, exclude=("processes",))
