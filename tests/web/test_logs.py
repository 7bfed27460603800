"""Log lines (web/logformat.py): logfmt by default or JSON, one line each, nothing forged."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import pytest

from brainmri import create_app
from brainmri.config import PROJECT_ROOT
from brainmri.web.logformat import JsonFormatter
from brainmri.web.logformat import LogfmtFormatter
from brainmri.web.logformat import format_from_env
from brainmri.web.logformat import split_message

HEADER = r"ts=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z level=info logger=brainmri\.predict pid=\d+ "


def record(message: str, *args, name: str = "brainmri.predict", level: int = logging.INFO,
           exc_info=None) -> logging.LogRecord:
    """A log record as a logger would make it."""
    return logging.LogRecord(name, level, __file__, 1, message, args, exc_info)


def test_app_lines_stay_as_they_are_after_the_header():
    """`event key=value ...` messages are logfmt already: kept after ts, level, logger, pid."""
    line = LogfmtFormatter().format(record("prediction request_id=%s bytes=%d label=%s",
                                           "ab12", 6196, "glioma"))
    assert re.fullmatch(HEADER + "prediction request_id=ab12 bytes=6196 label=glioma", line)


@pytest.mark.parametrize("message", [
    "Booting worker with pid: 123",                      # gunicorn's free text
    'rejected request_id=x path=/a" level=error status=404',  # a path that forges a field
    "rejected request_id=x path=/a\nts=forged level=critical",  # a path that starts a line
    "worker ready pid=12 models=a default=a",             # a pair named like a header field
])
def test_anything_else_is_one_quoted_value(message):
    """Free text, quotes, newlines and header names go into msg="...", escaped, on one line."""
    line = LogfmtFormatter().format(record(message))
    assert "\n" not in line
    head, _, quoted = line.partition(" msg=")
    assert [field.partition("=")[0] for field in head.split(" ")] == ["ts", "level", "logger", "pid"]
    assert json.loads(quoted) == message  # one string, closed at the end of the line


def test_a_traceback_is_one_more_value():
    """exc="..." holds the traceback; still one line."""
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        exc_info = sys.exc_info()
    line = LogfmtFormatter().format(record("unhandled error request_id=%s", "r1",
                                           level=logging.ERROR, exc_info=exc_info))
    assert "\n" not in line and " level=error " in line
    assert "unhandled error request_id=r1 exc=" in line
    assert "RuntimeError: boom" in json.loads(line.partition(" exc=")[2])


def test_json_lines_carry_the_pairs_as_fields():
    """JSON: the header, msg = the event, every pair a field; free text is msg as it is."""
    fields = json.loads(JsonFormatter().format(record(
        "rejected request_id=%s path=%s status=%d code=%s", "r2", "/x", 404, "not_found")))
    assert fields.pop("ts").endswith("Z") and fields.pop("pid").isdigit()
    assert fields == {"level": "info", "logger": "brainmri.predict", "msg": "rejected",
                      "request_id": "r2", "path": "/x", "status": "404", "code": "not_found"}
    free = json.loads(JsonFormatter().format(record("Listening at: http://127.0.0.1:8000 (1)")))
    assert free["msg"] == "Listening at: http://127.0.0.1:8000 (1)"
    clash = json.loads(JsonFormatter().format(record("worker ready pid=12 models=a")))
    assert clash["msg"] == "worker ready" and clash["field_pid"] == "12"
    assert clash["pid"] == str(record("x").process)


def test_split_message():
    """Event words first, then only pairs; anything else is not a structured message."""
    assert split_message("batch request_id=a files=3 codes=-") == (
        "batch", [("request_id", "a"), ("files", "3"), ("codes", "-")])
    assert split_message("worker ready") == ("worker ready", [])
    for text in ("", "request_id=a", "model unavailable request_id=x: /srv/model.h5 missing",
                 "a  b=1", 'a b="c d"', "a b=1 trailing words"):
        assert split_message(text) is None, text


# Outside pytest nothing configures logging, so Flask attaches its stderr handler, as under
# `flask run` and gunicorn; the app's lines then come out in BRAINMRI_LOG_FORMAT.
_APP_LOGS = """
from brainmri import create_app
from brainmri.config import PROJECT_ROOT
app = create_app({"TESTING": True, "SECRET_KEY": "x", "BRAINMRI_SKIP_MODEL": True})
assert app.test_client().get("/missing").status_code == 404
"""


@pytest.mark.parametrize("setting", [None, "logfmt", "JSON"])
def test_the_app_writes_brainmri_log_format(setting):
    """The app's own lines on stderr, in the configured format (default logfmt)."""
    env = {key: value for key, value in os.environ.items() if key != "BRAINMRI_LOG_FORMAT"}
    if setting is not None:
        env["BRAINMRI_LOG_FORMAT"] = setting
    done = subprocess.run([sys.executable, "-c", _APP_LOGS], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "rejected" in line]
    assert len(lines) == 1, done.stderr
    if setting == "JSON":
        fields = json.loads(lines[0])
        assert (fields["logger"], fields["msg"], fields["status"]) == ("brainmri.errors",
                                                                      "rejected", "404")
    else:
        assert re.fullmatch(r"ts=\S+Z level=info logger=brainmri\.errors pid=\d+ rejected "
                            r"request_id=\w+ path=/missing status=404 code=not_found", lines[0])


def test_an_unknown_format_stops_the_app(monkeypatch):
    """A typo fails at start-up, naming the choices, instead of logging in some other shape."""
    monkeypatch.setenv("BRAINMRI_LOG_FORMAT", "xml")
    with pytest.raises(ValueError, match="BRAINMRI_LOG_FORMAT='xml': use one of logfmt, json"):
        create_app({"TESTING": True, "SECRET_KEY": "x", "BRAINMRI_SKIP_MODEL": True})
    monkeypatch.setenv("BRAINMRI_LOG_FORMAT", " Json ")
    assert format_from_env() == "json"
