"""One line per log record, as logfmt (``key=value``, the default) or JSON: BRAINMRI_LOG_FORMAT.

Standard library only, and no imports from the package: gunicorn.conf.py loads this file by
path for gunicorn's own error and access logs, because importing ``brainmri.web`` in the master
would import Flask and prometheus_client there before PROMETHEUS_MULTIPROC_DIR is set (and the
master must not import the app's libraries before forking). web/logs.py uses it for the app's
loggers, so every line a server writes has the same shape.

Every line starts with ``ts`` (UTC, ISO 8601, milliseconds), ``level``, ``logger`` and ``pid``.
The app's messages are already ``event key=value ...`` ("prediction request_id=... bytes=...");
such a message is kept as it is (in JSON: ``msg`` is the event, each pair a field). Any other
message, and a traceback, is one quoted, escaped value, so no message can start a new line or
forge a field.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time

__all__ = ["FORMATS", "FORMAT_ENV", "JsonFormatter", "LogfmtFormatter", "format_from_env",
           "formatter", "split_message"]

FORMAT_ENV = "BRAINMRI_LOG_FORMAT"
FORMATS = ("logfmt", "json")

_WORD = re.compile(r"[A-Za-z_][\w.-]*")
_PAIR = re.compile(r"([A-Za-z_][\w.-]*)=([^\s\"=\\]*)")
_RESERVED = ("ts", "level", "logger", "pid", "msg", "exc")


def format_from_env() -> str:
    """The configured format: BRAINMRI_LOG_FORMAT, default logfmt.

    Raises:
        ValueError: the variable names no known format.
    """
    name = os.environ.get(FORMAT_ENV, "").strip().lower() or FORMATS[0]
    if name not in FORMATS:
        raise ValueError(f"{FORMAT_ENV}={name!r}: use one of {', '.join(FORMATS)}.")
    return name


def split_message(message: str) -> tuple[str, list[tuple[str, str]]] | None:
    """("event words", [(key, value), ...]) for an ``event key=value ...`` message, else None."""
    words: list[str] = []
    pairs: list[tuple[str, str]] = []
    for token in message.split(" "):
        pair = _PAIR.fullmatch(token)
        if pair is not None:
            pairs.append((pair.group(1), pair.group(2)))
        elif not pairs and _WORD.fullmatch(token):
            words.append(token)
        else:  # free text after the pairs, punctuation, quotes, empty tokens (double spaces)
            return None
    if not words:
        return None
    return " ".join(words), pairs


def _quote(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # escapes quotes, backslashes and newlines


def _timestamp(record: logging.LogRecord) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


class _LineFormatter(logging.Formatter):
    """The fields every line has, and the traceback as one value."""

    def header(self, record: logging.LogRecord) -> dict[str, str]:
        """ts, level, logger and pid of a record."""
        return {"ts": _timestamp(record), "level": record.levelname.lower(),
                "logger": record.name, "pid": str(record.process)}

    def traceback(self, record: logging.LogRecord) -> str | None:
        """The exception and stack text of a record, if it has any."""
        parts = []
        if record.exc_info:
            record.exc_text = record.exc_text or self.formatException(record.exc_info)
        if record.exc_text:
            parts.append(record.exc_text)
        if record.stack_info:
            parts.append(self.formatStack(record.stack_info))
        return "\n".join(parts) or None


class LogfmtFormatter(_LineFormatter):
    """``ts=... level=... logger=... pid=...`` then the message (kept, or quoted as msg=)."""

    def format(self, record: logging.LogRecord) -> str:
        """One logfmt line."""
        message = record.getMessage()
        fields = [f"{key}={value}" for key, value in self.header(record).items()]
        parsed = split_message(message)
        if parsed is not None and not any(key in _RESERVED for key, _ in parsed[1]):
            fields.append(message)
        else:
            fields.append(f"msg={_quote(message)}")
        exc = self.traceback(record)
        if exc is not None:
            fields.append(f"exc={_quote(exc)}")
        return " ".join(fields)


class JsonFormatter(_LineFormatter):
    """One JSON object: the header fields, ``msg`` and the message's pairs as fields."""

    def format(self, record: logging.LogRecord) -> str:
        """One JSON line."""
        message = record.getMessage()
        fields: dict[str, str] = self.header(record)
        parsed = split_message(message)
        if parsed is None:
            fields["msg"] = message
        else:
            fields["msg"] = parsed[0]
            for key, value in parsed[1]:
                # A pair may not overwrite the header (a later one with the same key wins).
                fields[f"field_{key}" if key in _RESERVED else key] = value
        exc = self.traceback(record)
        if exc is not None:
            fields["exc"] = exc
        return json.dumps(fields, ensure_ascii=False)


def formatter(name: str) -> logging.Formatter:
    """The formatter for a format name ("logfmt" or "json")."""
    return JsonFormatter() if name == "json" else LogfmtFormatter()
