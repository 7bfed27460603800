"""The factory: configuration sources, the secret key, and refusing to start without a model."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest
from flask import Flask

from brainmri import create_app
from brainmri.config import DEFAULTS
from brainmri.config import PROJECT_ROOT
from brainmri.config import read_or_create_key
from brainmri.imaging import DEFAULT_MAX_PIXELS
from brainmri.inference import CLASSES
from brainmri.inference import TRAIN_HINT
from brainmri.inference import ModelError
from brainmri.inference import write_model_card
from brainmri.web import EXTENSION_KEY
from brainmri.inference import Predictor

SKIP = {"BRAINMRI_SKIP_MODEL": True}


@pytest.fixture
def instance_dir(tmp_path, monkeypatch) -> Path:
    """Point Flask's instance folder at a temporary directory."""
    path = tmp_path / "instance"
    monkeypatch.setattr(Flask, "auto_find_instance_path", lambda self: str(path))
    return path


@pytest.fixture
def clean_env(monkeypatch):
    """No FLASK_* variables leak in from the developer's shell."""
    for key in list(os.environ):
        if key.startswith("FLASK_"):
            monkeypatch.delenv(key)


def fake_model(directory: Path, **overrides) -> Path:
    """A stand-in .h5 file (never loaded) with valid metadata beside it."""
    model = directory / "fake.h5"
    model.write_bytes(b"not really hdf5")
    write_model_card(
        model,
        {"name": "fake", "version": "1", "classes": list(CLASSES),
         "input": {"size": 32, "channels": 1}, **overrides},
    )
    return model


def test_config(instance_dir):
    """TESTING comes only from test_config."""
    assert not create_app({**SKIP, "SECRET_KEY": "x"}).testing
    assert create_app({**SKIP, "SECRET_KEY": "x", "TESTING": True}).testing


def test_defaults(instance_dir):
    """Documented defaults are in place."""
    app = create_app({**SKIP, "SECRET_KEY": "x"})
    assert app.config["MAX_CONTENT_LENGTH"] == 20 * 1024 * 1024
    assert app.config["BRAINMRI_MAX_PIXELS"] == DEFAULT_MAX_PIXELS
    assert app.config["BRAINMRI_MODEL_DIR"] == str(PROJECT_ROOT / "model")
    assert app.config["BRAINMRI_MODEL_PATH"] is None  # serve every model in the folder
    assert app.config["BRAINMRI_DEFAULT_MODEL"] is None  # best leakage-free test figures
    assert app.config["MAX_FORM_PARTS"] <= 10
    assert 64 * 1024 < app.config["MAX_FORM_MEMORY_SIZE"] <= 1024 * 1024
    assert DEFAULTS["SECRET_KEY"] is None
    assert Path(app.template_folder) == PROJECT_ROOT / "templates"
    assert Path(app.static_folder) == PROJECT_ROOT / "static"


def test_from_prefixed_env(instance_dir, clean_env, monkeypatch):
    """Without test_config, FLASK_* variables override the defaults (JSON-parsed)."""
    monkeypatch.setenv("FLASK_SECRET_KEY", "from-env")
    monkeypatch.setenv("FLASK_MAX_CONTENT_LENGTH", "1234")
    monkeypatch.setenv("FLASK_BRAINMRI_SKIP_MODEL", "true")
    monkeypatch.setenv("FLASK_BRAINMRI_MAX_PIXELS", "4096")
    app = create_app()
    assert app.config["SECRET_KEY"] == "from-env"
    assert app.config["MAX_CONTENT_LENGTH"] == 1234
    assert app.config["BRAINMRI_MAX_PIXELS"] == 4096
    assert app.config["BRAINMRI_SKIP_MODEL"] is True
    assert not instance_dir.joinpath("secret_key").exists()


def test_test_config_ignores_env(instance_dir, monkeypatch):
    """test_config replaces the environment, as in flaskr."""
    monkeypatch.setenv("FLASK_MAX_CONTENT_LENGTH", "1234")
    app = create_app({**SKIP, "SECRET_KEY": "x"})
    assert app.config["MAX_CONTENT_LENGTH"] == 20 * 1024 * 1024


def test_secret_key_generated_once(instance_dir):
    """Without a configured key, one is written to instance/secret_key (0600) and reused."""
    first = create_app(SKIP)
    key_file = instance_dir / "secret_key"
    assert key_file.is_file()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(first.config["SECRET_KEY"]) >= 32
    second = create_app(SKIP)
    assert second.config["SECRET_KEY"] == first.config["SECRET_KEY"]
    assert [p.name for p in instance_dir.iterdir()] == ["secret_key"]  # no temp files left


def test_secret_key_concurrent_workers_agree(tmp_path):
    """Workers starting at the same moment all read the same key."""
    path = tmp_path / "instance" / "secret_key"
    barrier = threading.Barrier(8)
    keys = []

    def worker():
        barrier.wait()
        keys.append(read_or_create_key(path))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(keys) == 8 and len(set(keys)) == 1
    assert path.read_text() == keys[0]


def test_empty_secret_key_file_is_refused(instance_dir):
    """A truncated key file is an error, never an empty key."""
    instance_dir.mkdir()
    (instance_dir / "secret_key").write_text("")
    with pytest.raises(RuntimeError, match="delete it"):
        create_app(SKIP)


def test_missing_model_names_train_command(instance_dir, tmp_path):
    """Until a model is trained, the app refuses to start and says how to train one."""
    with pytest.raises(ModelError) as info:
        create_app({"SECRET_KEY": "x", "BRAINMRI_MODEL_PATH": str(tmp_path / "missing.h5")})
    assert TRAIN_HINT in str(info.value)
    assert "brainmri train" in str(info.value)


def test_missing_model_from_env(instance_dir, clean_env, tmp_path, monkeypatch):
    """The same through the environment (how `flask run` and gunicorn start)."""
    monkeypatch.setenv("FLASK_SECRET_KEY", "x")
    monkeypatch.setenv("FLASK_BRAINMRI_MODEL_PATH", json.dumps(str(tmp_path / "none.h5")))
    with pytest.raises(ModelError, match="brainmri train"):
        create_app()


def test_wrong_sha256_is_refused(instance_dir, tmp_path):
    """A model that does not match the sha256 in its metadata never serves."""
    model = fake_model(tmp_path)
    meta = model.with_suffix(".json")
    card = json.loads(meta.read_text())
    card["sha256"] = "f" * 64
    meta.write_text(json.dumps(card))
    with pytest.raises(ModelError, match="does not match"):
        create_app({"SECRET_KEY": "x", "BRAINMRI_MODEL_PATH": str(model)})


def test_valid_metadata_gives_unloaded_predictor(instance_dir, tmp_path):
    """With valid metadata the factory attaches a predictor but does not load TensorFlow."""
    model = fake_model(tmp_path)
    app = create_app({"SECRET_KEY": "x", "BRAINMRI_MODEL_PATH": str(model)})
    predictor = app.extensions[EXTENSION_KEY]
    assert isinstance(predictor, Predictor)
    assert not predictor.ready
    response = app.test_client().get("/readyz")
    assert response.status_code == 503


def test_gunicorn_config(monkeypatch):
    """gunicorn.conf.py keeps preload off and splits the cores between workers' TF threads."""
    import runpy

    monkeypatch.setenv("WEB_CONCURRENCY", "2")
    monkeypatch.delenv("TF_NUM_INTRAOP_THREADS", raising=False)
    monkeypatch.delenv("TF_NUM_INTEROP_THREADS", raising=False)
    monkeypatch.delenv("GUNICORN_BIND", raising=False)
    conf = runpy.run_path(str(PROJECT_ROOT / "gunicorn.conf.py"))
    assert conf["wsgi_app"] == "main:app"
    assert conf["preload_app"] is False
    assert conf["worker_class"] == "gthread"
    assert conf["workers"] == 2 and conf["threads"] == 2
    assert conf["bind"] == "127.0.0.1:8000"
    assert (conf["timeout"], conf["graceful_timeout"]) == (120, 30)
    assert (conf["max_requests"], conf["max_requests_jitter"]) == (5000, 2500)
    # Workers take ~20 s to boot; a wide jitter keeps them from recycling together.
    assert conf["max_requests_jitter"] >= conf["max_requests"] // 5
    assert os.environ["TF_NUM_INTRAOP_THREADS"] == str(max(1, conf["cores"] // 2))
    assert os.environ["TF_NUM_INTEROP_THREADS"] == "1"


def test_app_does_not_import_tensorflow():
    """Building the app and serving a page never imports TensorFlow (keeps the master light)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from brainmri import create_app\n"
        "app = create_app({'SECRET_KEY': 'x', 'BRAINMRI_SKIP_MODEL': True})\n"
        "assert app.test_client().get('/').status_code == 200\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'TF imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PROJECT_ROOT)
