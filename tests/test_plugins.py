from __future__ import annotations

import json
import types
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest

from llmquant import hookimpl
from llmquant import plugins as plugins_module
from llmquant.algorithm import UniformQuantized
from llmquant.cli import main
from llmquant.errors import PluginError
from llmquant.plugins import Plugins, get_plugin_manager

BUILTIN_ALGORITHMS = {"gptq", "groupwise-int4", "nf4", "rtn"}


@dataclass(frozen=True, kw_only=True)
class _Config:
    bits: int = 4


def _algorithm_class(algo_name: str) -> type:
    class Fake:
        name: ClassVar[str] = algo_name
        description: ClassVar[str] = "a test algorithm"
        config_type: ClassVar[type] = _Config
        result_type: ClassVar[type] = UniformQuantized
        needs_calibration: ClassVar[bool] = False

        def quantize_weight(self, W: Any, config: Any, stats: Any) -> Any:
            raise NotImplementedError

    return Fake


def _plugin(*classes: type) -> types.SimpleNamespace:
    @hookimpl
    def llmquant_register_algorithms(register: Any) -> None:
        for cls in classes:
            register(cls)

    return types.SimpleNamespace(llmquant_register_algorithms=llmquant_register_algorithms)


def test_builtins_come_from_entry_points() -> None:
    plugins = get_plugin_manager()
    entry = plugins.algorithm("rtn")
    assert entry.plugin.distribution == "llmquant"
    assert entry.cls.__module__ == "llmquant_plugins.rtn"


def test_each_call_builds_a_new_manager() -> None:
    assert get_plugin_manager(entry_points=False).pm is not get_plugin_manager(entry_points=False).pm


def test_inline_plugin_registers(pm: Plugins) -> None:
    pm.register(_plugin(_algorithm_class("mine")), "mine-plugin", "mine-dist", "1.0")
    assert set(pm.algorithms()) == {*BUILTIN_ALGORITHMS, "mine"}
    assert pm.algorithm("mine").plugin.distribution == "mine-dist"


def test_duplicate_name_names_both_plugins(pm: Plugins) -> None:
    pm.register(_plugin(_algorithm_class("rtn")), "copycat", "copycat-dist")
    with pytest.raises(PluginError, match=r"'rtn' is registered twice: by plugin '(rtn|copycat)'.*and by plugin '(copycat|rtn)'"):
        pm.algorithms()


def test_unknown_algorithm_lists_valid_names(pm: Plugins) -> None:
    with pytest.raises(PluginError, match=r"unknown algorithm 'nope': installed algorithms are gptq, groupwise-int4, nf4, rtn"):
        pm.algorithm("nope")


def test_class_without_the_interface_is_named(pm: Plugins) -> None:
    pm.register(_plugin(type("Bare", (), {"name": "bare"})), "bare-plugin", "bare-dist")
    with pytest.raises(PluginError, match=r"plugin 'bare-plugin' \(bare-dist\).*lacks description"):
        pm.algorithms()


class _FakeDist:
    def __init__(self, name: str) -> None:
        self.name, self.version = name, "9.9"


class _FakeEntryPoint:
    def __init__(self, name: str, dist: str, load: Any) -> None:
        self.name, self.dist, self._load = name, _FakeDist(dist), load

    def load(self) -> Any:
        return self._load()


def _broken() -> Any:
    raise ImportError("No module named 'missing_dependency'")


@pytest.fixture
def third_party(monkeypatch: pytest.MonkeyPatch) -> None:
    real = plugins_module._entry_points
    fakes = [
        _FakeEntryPoint("good", "good-dist", lambda: _plugin(_algorithm_class("good-algo"))),
        _FakeEntryPoint("broken", "broken-dist", _broken),
    ]
    builtins = [ep for ep in real(group="llmquant") if ep.dist is not None and ep.dist.name == "llmquant"]
    monkeypatch.setattr(plugins_module, "_entry_points", lambda group: [*builtins, *fakes])


@pytest.mark.usefixtures("third_party")
def test_broken_plugin_is_marked_and_the_others_still_load(capsys: pytest.CaptureFixture[str]) -> None:
    plugins = get_plugin_manager()
    assert set(plugins.algorithms()) == {*BUILTIN_ALGORITHMS, "good-algo"}
    assert [(b.name, b.distribution) for b in plugins.broken] == [("broken", "broken-dist")]
    assert "missing_dependency" in (plugins.broken[0].error or "")
    with pytest.raises(PluginError, match="plugin 'broken' \\(broken-dist\\) failed to load"):
        plugins.algorithm("whatever")
    assert main(["algorithms", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows if r["status"] == "ok"} == {*BUILTIN_ALGORITHMS, "good-algo"}
    assert [r["distribution"] for r in rows if r["status"] == "broken"] == ["broken-dist"]


@pytest.mark.usefixtures("third_party")
@pytest.mark.parametrize("value,expected", [("none", BUILTIN_ALGORITHMS), ("good", {*BUILTIN_ALGORITHMS, "good-algo"}), ("all", {*BUILTIN_ALGORITHMS, "good-algo"})],
                         ids=["none", "allow-list", "all"])
def test_environment_variable_limits_third_party_plugins(monkeypatch: pytest.MonkeyPatch, value: str, expected: set[str]) -> None:
    monkeypatch.setenv("LLMQUANT_PLUGINS", value)
    plugins = get_plugin_manager()
    assert set(plugins.algorithms()) == expected
    assert bool(plugins.broken) == (value == "all")
