"""Logging setup: one logger per module under a fixed vocabulary
(`filter.journal`, `proxy.stream`, ...), text or JSON lines on stderr.

A text line is one record: control characters in the message and in the
fields (a node id or policy name a peer chose, say) are escaped as ``\\xNN``,
so a forged name cannot end a line and forge the next one. JSON lines are
safe by construction (json.dumps escapes them); a traceback keeps its lines.
"""

from __future__ import annotations

import json
import logging
import re
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


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_control(text: str) -> str:
    """`text` with every control character (newline, CR, ESC, ...) as \\xNN."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        safe = logging.makeLogRecord(record.__dict__)
        safe.msg, safe.args = escape_control(record.getMessage()), None
        text = super().format(safe)
        extra = " ".join(f"{n}={escape_control(str(getattr(record, n)))}"
                         for n in _FIELDS if hasattr(record, n))
        if not extra:
            return text
        head, sep, rest = text.partition("\n")  # a traceback follows the first line
        return f"{head} [{extra}]{sep}{rest}"


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
