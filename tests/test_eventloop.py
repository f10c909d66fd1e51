"""EVENT_LOOP: uvloop where it is installed, asyncio's own loop otherwise or when asked."""

from __future__ import annotations

import asyncio
import sys

import pytest

from buffer_service import cli, eventloop
from buffer_service.config import ConfigError


def _loop_module() -> str:
    async def which() -> str:
        return type(asyncio.get_running_loop()).__module__.split(".")[0]

    return eventloop.run(which(), eventloop.factory("auto"))


def test_auto_runs_on_uvloop_where_it_is_installed():
    pytest.importorskip("uvloop")
    assert _loop_module() == "uvloop"


def test_asyncio_is_asked_for_or_taken_where_uvloop_is_missing(monkeypatch):
    assert eventloop.factory("asyncio") is None
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if it were not installed
    assert eventloop.factory("auto") is None
    assert _loop_module() == "asyncio"
    with pytest.raises(ConfigError, match="uvloop is not installed"):
        eventloop.factory("uvloop")


def test_serve_with_event_loop_uvloop_missing_is_a_configuration_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvloop", None)
    monkeypatch.setenv("EVENT_LOOP", "uvloop")
    assert cli.main(["serve", "--no-worker"]) == 2
    assert "EVENT_LOOP=uvloop but uvloop is not installed" in capsys.readouterr().err
