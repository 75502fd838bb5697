"""Known values fed through every rendering path never show up in logs, status or metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from agent.config import RenderConfig, TemplateConfig
from agent.metrics import Metrics
from agent.render.renderer import Renderer
from tests.render.conftest import DictSource, make_secret

PASSWORD = "Leak-Me-Not-7f3a"
TOKEN = "tok-9c1e-Leak"


async def test_values_never_reach_logs_status_or_metrics(
    tmpfs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    db = json.dumps({"username": "app", "password": PASSWORD, "nested": {"k": PASSWORD}})
    source = DictSource(
        {
            "db": make_secret("db", db),
            "api": make_secret("api", TOKEN),
            "other": make_secret("other", "x"),
        }
    )
    ok_command = [sys.executable, "-c", "print('" + PASSWORD + "')"]  # its output is discarded
    templates: list[dict[str, Any]] = [
        {"destination": str(tmpfs / "raw"), "secret": "db", "key": "password"},
        {"destination": str(tmpfs / "env"), "secret": "db", "format": "dotenv"},
        {"destination": str(tmpfs / "d"), "secret": "db", "format": "files"},
        {"destination": str(tmpfs / "nokey"), "secret": "db", "key": "pasword"},
        {"destination": str(tmpfs / "flat"), "secret": "api", "format": "yaml"},
        {
            "destination": str(tmpfs / "t1"),
            "secrets": ["db", "api"],
            "format": "template",
            "template": "{{ secrets.db[secrets.db.password] }}{{ secrets.api.x }}",
        },
        {
            "destination": str(tmpfs / "t2"),
            "secrets": ["db", "api"],
            "format": "template",
            "template": "{{ secret('api') | b64decode }}{{ secrets[secret('api')] }}",
        },
        {
            "destination": str(tmpfs / "t3"),
            "secrets": ["db", "api"],
            "format": "template",
            "template": "{{ secret('db', secrets.db.password) }}",
        },
        {
            "destination": str(tmpfs / "cmd"),
            "secret": "other",
            "on_change": {"command": ok_command},
        },
    ]
    cfgs = [TemplateConfig.model_validate(t) for t in templates]
    metrics = Metrics()
    r = Renderer(cfgs, source, render_config=RenderConfig(), metrics=metrics)
    failures = await r.render_all()
    assert len(failures) == 5  # nokey, flat, t1, t2, t3
    task = asyncio.create_task(r.run())
    try:
        source.secrets["other"] = make_secret("other", "y", version="v2")
        r.on_secret_changed("other")
        for _ in range(500):
            if metrics.registry.get_sample_value(
                "secrets_agent_notifications_total", {"kind": "command", "outcome": "ok"}
            ):
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the command did not run")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    status = json.dumps(r.status())
    exported = generate_latest(metrics.registry).decode()
    for text in (*failures, status, exported, caplog.text):
        assert PASSWORD not in text
        assert TOKEN not in text
    assert (tmpfs / "raw").read_text() == PASSWORD  # it did go where it should
