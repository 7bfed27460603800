"""gunicorn.conf.py beyond its settings: the metrics folder.

The config file is run in this process (as gunicorn runs it in the master), with every
variable it sets put back afterwards. The real server is in test_metrics.py.
"""

from __future__ import annotations

import os
import runpy

import pytest

from brainmri.config import PROJECT_ROOT

# Everything gunicorn.conf.py writes into os.environ (it does so for the workers it forks).
WRITTEN = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "PROMETHEUS_MULTIPROC_DIR",
           "BRAINMRI_METRICS_DIR_CREATED")


@pytest.fixture
def load(monkeypatch):
    """Run gunicorn.conf.py with the given environment; os.environ is restored afterwards."""
    for name in WRITTEN:
        monkeypatch.setenv(name, "")  # remembered as it was, so the next line is undone too
        monkeypatch.delenv(name)

    def run(**env: str) -> dict:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        return runpy.run_path(str(PROJECT_ROOT / "gunicorn.conf.py"))

    return run


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
