"""Fault drills against a real gunicorn with the shipped models (slow; each starts a server).

The long versions are documented commands (`uv run python benchmarks/load.py --drills`,
`--soak-seconds 600`); these are the short ones CI runs. Nothing here asserts on wall-clock
time except generous deadlines that only catch a hang.
"""

from __future__ import annotations

import pytest

from brainmri.config import PROJECT_ROOT

from conftest import require_real_data

pytestmark = [
    pytest.mark.slow,
    pytest.mark.realdata,  # the load is real MRI slices, which the OOD guard lets through
]


@pytest.fixture(scope="module")
def mri_jpeg() -> bytes:
    """A real MRI slice from the data set's Testing folder."""
    root = require_real_data()
    return sorted((root / "Testing").glob("*/*.jpg"))[0].read_bytes()


@pytest.mark.parametrize("kind", ["missing", "corrupt", "unloadable"])
def test_bad_model_stops_with_a_clear_error(kind, tmp_path):
    """No model, a truncated one, or one Keras cannot read: exit non-zero, never half-alive."""
    from benchmarks.drills import bad_model

    outcome = bad_model(kind, PROJECT_ROOT / "model", tmp_path)
    assert outcome["exit_code"] == 4, outcome  # gunicorn: "App failed to load"
    assert not outcome["listening_after"]
    # The master's pre-flight (gunicorn.conf.py on_starting) refuses before any worker forks.
    assert outcome["workers_booted"] == 0, outcome
    expected = {"missing": "No trained model", "corrupt": "does not match its metadata",
                "unloadable": "could not be loaded as a Keras model"}[kind]
    assert expected in outcome["message"], outcome


def test_kill_worker_under_load(mri_jpeg):
    """kill -9 a worker: only requests it had in flight fail; a new worker takes over."""
    from benchmarks.drills import kill_worker

    outcome = kill_worker(mri_jpeg, clients=4, after_respawn_s=3.0)
    assert outcome["respawn_s"] is not None, outcome
    assert outcome["failed_started_after_kill"] == 0, outcome
    assert outcome["failed_in_flight"] <= 4, outcome  # at most one per client
    assert outcome["ok_after_respawn"] > 0 and outcome["workers_after"] == 2, outcome


def test_sigterm_finishes_in_flight_requests(mri_jpeg):
    """SIGTERM the master mid-request: every request completes with 200, then exit 0."""
    from benchmarks.drills import sigterm_master

    outcome = sigterm_master(mri_jpeg, in_flight=4)
    assert outcome["completed_200"] == 4, outcome
    assert outcome["finished_after_sigterm"] == 4, outcome  # they really were in flight
    assert outcome["exit_code"] == 0, outcome
    assert not outcome["listening_after"]


def test_twenty_concurrent_20mb_uploads(mri_jpeg):
    """20 uploads of ~20 MB at once: no 5xx, no dropped connection, memory bounded."""
    from benchmarks.drills import big_uploads

    outcome = big_uploads(mri_jpeg, concurrent=20)
    assert outcome["uploads"] == 20 and outcome["upload_mb"] >= 18.5, outcome
    assert set(outcome["statuses"]) <= {"200", "422"}, outcome  # a result, or "not a brain MRI"
    assert outcome["server_alive"], outcome
    # Each worker holds the models (~0.6-1 GiB) plus a few decodes of a 20 MB JPEG at a time
    # (gthread: 2 threads); 20 uploads queued must not multiply that.
    assert max(outcome["rss_peak_mib"].values()) < 3072, outcome
