"""Logging setup: one logger per module under a fixed vocabulary
(`filter.journal`, `proxy.stream`, ...), text or JSON lines on stderr."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import MutableMapping
from typing import Any

_FIELDS = ("policy", "disk", "seq", "peer", "epoch", "node")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in _FIELDS:
            if hasattr(record, name):
                out[name] = getattr(record, name)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extra = " ".join(f"{n}={getattr(record, n)}" for n in _FIELDS if hasattr(record, n))
        return f"{text} [{extra}]" if extra else text


def setup(fmt: str = "text", level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("grpc").setLevel(logging.WARNING)


def set_level(level: str) -> None:
    """Change the lowest level logged, e.g. on SIGHUP."""
    logging.getLogger().setLevel(level.upper())


def get(name: str) -> logging.Logger:
    return logging.getLogger(name)


class Bound(logging.LoggerAdapter[logging.Logger]):
    """A logger for one object: its fields (policy=..., node=...) on every line;
    `extra=` on a call adds more (and wins on a clash)."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any,
                                                                          MutableMapping[str, Any]]:
        kwargs["extra"] = {**(self.extra or {}), **kwargs.get("extra", {})}
        return msg, kwargs


def bound(logger: logging.Logger, **fields: object) -> Bound:
    """`log = bound(logging.getLogger("filter.shipper"), policy=name)`; then `log.info(...)`."""
    return Bound(logger, fields)
