"""End to end with real TensorFlow: a tiny .h5 CNN served through the API (slow)."""

from __future__ import annotations

import io
import json
import math
import runpy

import pytest

from brainmri import create_app
from brainmri.config import PROJECT_ROOT
from brainmri.inference import CLASSES
from brainmri.inference import write_model_card
from brainmri.web import EXTENSION_KEY

from conftest import encode
from conftest import synthetic_slice

pytestmark = [
    pytest.mark.slow,
    # Keras 3 on NumPy 2 warns inside its own tensor conversion; not ours to fix.
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A (32, 32, 1) -> 4-class softmax CNN saved as .h5, with its metadata beside it."""
    keras = pytest.importorskip("keras")
    from keras import layers

    model = keras.Sequential(
        [
            keras.Input(shape=(32, 32, 1)),
            layers.Conv2D(4, 3, activation="relu"),
            layers.GlobalAveragePooling2D(),
            layers.Dense(len(CLASSES), activation="softmax"),
        ]
    )
    path = tmp_path_factory.mktemp("model") / "tiny.h5"
    model.save(path)
    write_model_card(
        path,
        {"name": "tiny-test-cnn", "version": "0.0.1", "classes": list(CLASSES),
         "input": {"size": 32, "channels": 1}},
    )
    return path


def test_api_with_real_model(tiny_model):
    """The real Predictor loads the .h5 and the API returns four probabilities summing to 1."""
    app = create_app({"TESTING": True, "SECRET_KEY": "x", "BRAINMRI_MODEL_PATH": str(tiny_model)})
    predictor = app.extensions[EXTENSION_KEY]
    client = app.test_client()
    assert client.get("/readyz").status_code == 503
    predictor.load()
    assert client.get("/readyz").status_code == 200

    response = client.post(
        "/api/v1/predict", data={"file": (io.BytesIO(encode(synthetic_slice())), "scan.png")},
        content_type="multipart/form-data",
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body["probabilities"]) == set(CLASSES)
    assert math.isclose(sum(body["probabilities"].values()), 1.0, abs_tol=1e-5)
    assert body["label"] in CLASSES
    assert body["confidence"] == max(body["probabilities"].values())
    assert body["model"]["name"] == "tiny-test-cnn"
    card = json.loads(tiny_model.with_suffix(".json").read_text())
    assert body["model"]["sha256"] == card["sha256"]


def test_result_page_with_real_model(tiny_model):
    """The page loads the model lazily on the first prediction (the `flask run` path)."""
    app = create_app({"TESTING": True, "SECRET_KEY": "x", "BRAINMRI_MODEL_PATH": str(tiny_model),
                      "BRAINMRI_CSRF_ENABLED": False})
    client = app.test_client()
    response = client.post(
        "/predict", data={"file": (io.BytesIO(encode(synthetic_slice())), "scan.png")},
        content_type="multipart/form-data",
    )
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    for name in CLASSES:
        assert f'data-class="{name}"' in html
    assert client.get("/readyz").status_code == 200


def test_wsgi_entry_loads_model(tiny_model, monkeypatch):
    """main.py builds the app from the environment and loads the model before serving."""
    monkeypatch.setenv("FLASK_SECRET_KEY", "x")
    monkeypatch.setenv("FLASK_BRAINMRI_MODEL_PATH", json.dumps(str(tiny_model)))
    namespace = runpy.run_path(str(PROJECT_ROOT / "main.py"))
    app = namespace["app"]
    assert app.extensions[EXTENSION_KEY].ready
    assert app.test_client().get("/readyz").status_code == 200
