"""gunicorn.conf.py beyond its settings: TF logs, log lines, the metrics folder, no Server header.

The config file is run in this process (as gunicorn runs it in the master), with every
variable it sets put back afterwards. The real server is in test_metrics_endpoint.py.
"""

from __future__ import annotations

import datetime
import json
import os
import runpy

import pytest
from gunicorn.config import Config

from brainmri.config import PROJECT_ROOT

# Everything gunicorn.conf.py writes into os.environ (it does so for the workers it forks).
WRITTEN = ("TF_CPP_MIN_LOG_LEVEL", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS",
           "PROMETHEUS_MULTIPROC_DIR", "BRAINMRI_METRICS_DIR_CREATED")


@pytest.fixture
def load(monkeypatch):
    """Run gunicorn.conf.py with the given environment; os.environ is restored afterwards."""
    for name in (*WRITTEN, "BRAINMRI_TF_LOGS", "BRAINMRI_LOG_FORMAT"):
        monkeypatch.setenv(name, "")  # remembered as it was, so the next line is undone too
        monkeypatch.delenv(name)

    def run(**env: str) -> dict:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        return runpy.run_path(str(PROJECT_ROOT / "gunicorn.conf.py"))

    return run


@pytest.mark.parametrize(("setting", "level"), [(None, "3"), ("0", "3"), ("1", "0")])
def test_tensorflow_logs_are_off_unless_asked_for(load, setting, level):
    """TF_CPP_MIN_LOG_LEVEL=3 for the workers, 0 (everything) with BRAINMRI_TF_LOGS=1."""
    load(**({} if setting is None else {"BRAINMRI_TF_LOGS": setting}))
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == level


@pytest.mark.parametrize("setting", [None, "1"])
def test_an_operators_tensorflow_log_level_is_kept(load, setting):
    """An operator's own TF_CPP_MIN_LOG_LEVEL reaches the workers, whatever BRAINMRI_TF_LOGS."""
    load(TF_CPP_MIN_LOG_LEVEL="1", **({} if setting is None else {"BRAINMRI_TF_LOGS": setting}))
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "1"


class FakeResponse:
    """What gunicorn's access logger reads from a response."""

    status = "200 OK"
    headers = [("Content-Type", "application/json"), ("X-Request-ID", "req-1")]
    sent = 519


class FakeRequest:
    """What gunicorn's access logger reads from a request."""

    headers = [("User-Agent", "Mozilla/5.0 (Doe's laptop)"), ("Referer", "https://x.example/")]


ENVIRON = {"REQUEST_METHOD": "POST", "RAW_URI": "/api/v1/predict?patient=Doe",
           "SERVER_PROTOCOL": "HTTP/1.1", "PATH_INFO": "/api/v1/predict",
           "QUERY_STRING": "patient=Doe", "REMOTE_ADDR": "203.0.113.9",
           "HTTP_USER_AGENT": "Mozilla/5.0 (Doe's laptop)", "HTTP_REFERER": "https://x.example/"}


@pytest.fixture
def make_logger(tmp_path):
    """gunicorn's logger as a config sets it up, writing both logs to files (closed after)."""
    made = []

    def make(conf: dict, **settings):
        cfg = Config()
        for name in ("access_log_format", "logger_class"):
            cfg.set(name, conf[name])
        for name, value in settings.items():
            cfg.set(name, value)
        cfg.set("accesslog", str(tmp_path / "access.log"))
        cfg.set("errorlog", str(tmp_path / "error.log"))
        made.append(cfg.logger_class(cfg))
        return made[-1]

    yield make
    for log in made:  # gunicorn's loggers are global: leave no file handler behind
        for named in (log.error_log, log.access_log):
            for handler in list(named.handlers):
                named.removeHandler(handler)
                handler.close()


def test_access_lines_are_logfmt_without_who_or_query(load, make_logger, tmp_path):
    """Method, path, status, size, time and request id; no address, agent, referrer or query."""
    log = make_logger(load())
    log.access(FakeResponse(), FakeRequest(), ENVIRON, datetime.timedelta(milliseconds=42))
    log.access(FakeResponse(), FakeRequest(), {**ENVIRON, "PATH_INFO": "/metrics",
                                               "RAW_URI": "/metrics"},
               datetime.timedelta(milliseconds=1))
    log.info("Booting worker with pid: %s", 4242)
    lines = (tmp_path / "access.log").read_text().splitlines()
    assert len(lines) == 1  # the scrape is not logged
    head, _, rest = lines[0].partition(" request ")
    assert head.startswith("ts=") and " logger=gunicorn.access pid=" in head
    assert rest == ("method=POST path=/api/v1/predict status=200 bytes=519 duration_ms=42 "
                    "request_id=req-1")
    for private in ("203.0.113.9", "Doe", "Mozilla", "x.example", "patient"):
        assert private not in lines[0]
    error = (tmp_path / "error.log").read_text().splitlines()
    assert error[-1].endswith('logger=gunicorn.error pid=%d msg="Booting worker with pid: 4242"'
                              % os.getpid())


def test_json_lines_for_gunicorn_too(load, make_logger, tmp_path):
    """BRAINMRI_LOG_FORMAT=json: the access line's pairs become fields."""
    log = make_logger(load(BRAINMRI_LOG_FORMAT="json"))
    log.access(FakeResponse(), FakeRequest(), ENVIRON, datetime.timedelta(milliseconds=7))
    fields = json.loads((tmp_path / "access.log").read_text())
    assert (fields["logger"], fields["msg"], fields["path"], fields["status"],
            fields["request_id"]) == ("gunicorn.access", "request", "/api/v1/predict", "200",
                                      "req-1")
    assert "REMOTE_ADDR" not in json.dumps(fields) and "203.0.113.9" not in json.dumps(fields)


def test_an_access_format_of_the_operators_own_is_written_as_it_is(load, make_logger, tmp_path):
    """--access-logformat: its line, unwrapped (tools parse it); the error log is still logfmt."""
    log = make_logger(load(), access_log_format="%(p)s %(m)s %(s)s")
    log.access(FakeResponse(), FakeRequest(), ENVIRON, datetime.timedelta(milliseconds=7))
    log.info("Listening at: %s", "http://127.0.0.1:8000")
    assert (tmp_path / "access.log").read_text() == f"<{os.getpid()}> POST 200\n"
    assert (tmp_path / "error.log").read_text().startswith("ts=")


def test_an_unknown_log_format_stops_gunicorn(load):
    """The config file itself refuses, so gunicorn exits before it binds."""
    with pytest.raises(ValueError, match="BRAINMRI_LOG_FORMAT"):
        load(BRAINMRI_LOG_FORMAT="yaml")


def test_the_master_makes_removes_and_remakes_its_metrics_folder(load):
    """A fresh folder per master (set for the workers), removed by that master only."""
    conf = load()
    conf["_prepare_metrics_dir"]()
    made = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    assert os.path.isdir(made) and os.environ["BRAINMRI_METRICS_DIR_CREATED"] == made
    conf["_remove_metrics_dir"](made, os.getpid() + 1)  # a worker running atexit
    assert os.path.isdir(made)
    # A master started by USR2 inherits the variables: it takes a folder of its own.
    conf["_prepare_metrics_dir"]()
    second = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    assert second != made
    for path in (made, second):
        conf["_remove_metrics_dir"](path, os.getpid())
        assert not os.path.exists(path)


def test_the_operators_metrics_folder_is_kept_but_emptied(load, tmp_path):
    """PROMETHEUS_MULTIPROC_DIR from the operator: used, its old *.db files dropped, kept."""
    (tmp_path / "counter_11.db").write_bytes(b"old run")
    (tmp_path / "notes.txt").write_text("not ours")
    conf = load(PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    conf["_prepare_metrics_dir"]()
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(tmp_path)
    assert "BRAINMRI_METRICS_DIR_CREATED" not in os.environ
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_child_exit_drops_a_dead_workers_live_gauges(load, tmp_path):
    """mark_process_dead: the worker's live gauge files go, its counters stay in the totals."""
    conf = load(PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    for name in ("gauge_livemax_321.db", "counter_321.db", "gauge_livemax_322.db"):
        (tmp_path / name).write_bytes(b"")

    class Worker:
        pid = 321

    conf["child_exit"](None, Worker())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counter_321.db",
                                                         "gauge_livemax_322.db"]


def test_no_server_header(load, monkeypatch):
    """gunicorn's Server line is filtered from the headers it adds, once however often applied."""
    from gunicorn.http import wsgi

    monkeypatch.setattr(wsgi.Response, "default_headers", wsgi.Response.default_headers)
    conf = load()
    conf["_drop_server_header"]()
    patched = wsgi.Response.default_headers
    conf["_drop_server_header"]()
    assert wsgi.Response.default_headers is patched

    class Request:
        version = (1, 1)
        method = "GET"

        def should_close(self):
            return False

    response = wsgi.Response(Request(), None, None)
    response.status, response.status_code, response.response_length = "200 OK", 200, 2
    headers = response.default_headers()
    assert headers[0] == "HTTP/1.1 200 OK\r\n"
    assert not [line for line in headers if line.lower().startswith("server:")]
    assert any(line.startswith("Date: ") for line in headers)
