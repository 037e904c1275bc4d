from __future__ import annotations

from pathlib import Path

import pytest

from llmquant.config import load_toml, resolve_config
from llmquant.errors import ConfigError
from llmquant.plugins import Plugins
from llmquant_plugins.rtn import RTNConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path: Path, pm: Plugins) -> None:
    settings = load_toml(path)
    entry = pm.algorithm(settings["algo"])
    fmt = pm.format_for(settings["format"], entry.cls.result_type, entry.name)  # the pair is storable
    config, algo = resolve_config(settings, entry.cls.config_type, where=path.name,
                                  format_options=getattr(fmt.cls, "options_type", None))
    assert config.algo == entry.name and config.format == fmt.name


def test_flat_keys_split_into_host_and_algorithm() -> None:
    config, algo = resolve_config({"algo": "rtn", "bits": 8, "group_size": None, "ignore": ["lm_head"]}, RTNConfig)
    assert algo == RTNConfig(bits=8, group_size=None)
    assert config.ignore == ("lm_head",) and config.params["bits"] == 8


def test_unknown_key_names_file_key_and_valid_keys() -> None:
    with pytest.raises(ConfigError, match=r"^w4\.toml: bitz: expected a known key; valid keys are .*bits.*group_size"):
        resolve_config({"bitz": 4}, RTNConfig, where="w4.toml")


@pytest.mark.parametrize("key,value,expected", [
    ("bits", "four", "expected int"),
    ("group_size", 1.5, "expected int"),
    ("symmetric", "yes", "expected bool"),
    ("ignore", "lm_head", "expected a list"),
    ("dtype", "float8", "expected one of auto"),
    ("max_shard_size", "huge", "expected a size"),
    ("bits", True, "expected int"),
], ids=["bits-str", "group-float", "sym-str", "ignore-str", "dtype", "shard", "bits-bool"])
def test_wrong_type_names_the_key_and_the_type(key: str, value: object, expected: str) -> None:
    with pytest.raises(ConfigError, match=rf"{key}: {expected}"):
        resolve_config({key: value}, RTNConfig, where="x.toml")


def test_override_fields_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"overrides\[0\]: bits: expected one of 2, 3, 4, 5, 6, 8, got 7"):
        resolve_config({"overrides": [{"pattern": "down", "bits": 7}]}, RTNConfig, where="x.toml")
    with pytest.raises(ConfigError, match=r"overrides\[0\]: damp: expected one of bits"):
        resolve_config({"overrides": [{"pattern": "down", "damp": 5}]}, RTNConfig, where="x.toml")


def test_bad_regex_is_refused() -> None:
    with pytest.raises(ConfigError, match="valid regular expression"):
        resolve_config({"ignore": ["("]}, RTNConfig)


def test_bad_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("bits = \n")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_toml(path)
