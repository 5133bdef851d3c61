"""A tier's logging: level and format (plain text, or one JSON object per line for log collectors)."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Literal

LogFormat = Literal["text", "json"]


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (ISO 8601, UTC), level, tier, logger, message, exception."""

    def __init__(self, tier: str) -> None:
        super().__init__()
        self.tier = tier

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
                 "level": record.levelname, "tier": self.tier, "logger": record.name,
                 "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(tier: str, level: str = "INFO", log_format: LogFormat = "text") -> None:
    """The process's root logger, on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        formatter: logging.Formatter = JsonFormatter(tier)
        formatter.converter = time.gmtime
    else:
        formatter = logging.Formatter(f"%(asctime)s {tier} %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
