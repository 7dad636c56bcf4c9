"""`dspark serve`'s Ray start: the controller's loop period and the dashboard are chosen for a small machine,
and what the user set wins."""

from __future__ import annotations

import pytest

from deployments import launch
from dspark.cli import build_parser
from dspark.serving.config import ServeConfig


@pytest.fixture
def started(monkeypatch):
    """launch.start with Ray and Serve replaced by recorders."""
    calls: dict = {}
    monkeypatch.setattr(launch.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(launch.ray, "init", lambda **kwargs: calls.update(init=kwargs))
    monkeypatch.setattr(launch.serve, "start", lambda **kwargs: None)
    monkeypatch.setattr(launch.serve, "run", lambda *args, **kwargs: "handle")
    monkeypatch.setattr(launch, "build_app", lambda args: None)
    for name in (launch.CONTROL_LOOP_INTERVAL[0], launch.RAY_WORKER_NICENESS):
        monkeypatch.setenv(name, "")  # records the original value, restored after the test
        monkeypatch.delenv(name)
    return calls


def test_defaults_for_a_local_server(started, monkeypatch):
    launch.start(ServeConfig())
    assert started["init"]["include_dashboard"] is False
    assert launch.os.environ[launch.CONTROL_LOOP_INTERVAL[0]] == "0.5"
    assert launch.os.environ[launch.RAY_WORKER_NICENESS] == "0"


def test_user_settings_win(started, monkeypatch):
    monkeypatch.setenv(launch.CONTROL_LOOP_INTERVAL[0], "0.1")
    launch.start(ServeConfig(), dashboard=True)
    assert started["init"]["include_dashboard"] is True
    assert launch.os.environ[launch.CONTROL_LOOP_INTERVAL[0]] == "0.1"


def test_cli_flag():
    parser = build_parser()
    assert parser.parse_args(["serve"]).dashboard is False
    assert parser.parse_args(["serve", "--dashboard"]).dashboard is True
