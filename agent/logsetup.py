"""Logging: text or JSON lines on stderr."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from agent.config import LogConfig


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and exception type)."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and record.exc_info[0] is not None:
            doc["exception"] = record.exc_info[0].__name__
        return json.dumps(doc)


def setup_logging(cfg: LogConfig) -> None:
    """Configure the root logger from ``log:``; safe to call again on reload."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, "_secrets_agent", False)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler._secrets_agent = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    if cfg.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.setLevel(cfg.level.upper())
    # aiohttp's access log would repeat every request; our metrics and audit cover it.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("watchfiles").setLevel(logging.WARNING)
