"""Several models served side by side: discovery, the default, `model=` and the page's selector."""

from __future__ import annotations

import io

import pytest

from brainmri import create_app
from brainmri.inference import CLASSES
from brainmri.inference import ModelError
from brainmri.inference import write_model_card
from brainmri.web import EXTENSION_KEY
from brainmri.web import REGISTRY_KEY
from brainmri.inference import ModelRegistry
from brainmri.inference import default_model_path
from brainmri.inference import discover_models

from conftest import FakePredictor
from conftest import PageActions

GLIOMA = {"glioma": 0.7, "meningioma": 0.1, "no_tumor": 0.1, "pituitary": 0.1}
PITUITARY = {"glioma": 0.1, "meningioma": 0.1, "no_tumor": 0.1, "pituitary": 0.7}
MENINGIOMA = {"glioma": 0.1, "meningioma": 0.7, "no_tumor": 0.1, "pituitary": 0.1}


def write_model(folder, name: str, accuracy: float | None, macro_f1: float = 0.5, arch="cnn"):
    """A stand-in .h5 (any bytes: discovery checks sha256, not Keras) with valid metadata."""
    path = folder / f"{name}.h5"
    path.write_bytes(name.encode() * 10)
    evaluation = {} if accuracy is None else {"test": {"accuracy": accuracy, "macro_f1": macro_f1}}
    write_model_card(path, {"name": name, "version": "1", "arch": arch, "classes": list(CLASSES),
                            "input": {"size": 32, "channels": 1}, "evaluation": evaluation})
    return path


def test_discovery_skips_checkpoints_and_sorts(tmp_path):
    """Every <name>.h5 is a model; Keras' *.weights.h5 training checkpoints are not."""
    write_model(tmp_path, "b_model", 0.9)
    write_model(tmp_path, "a_model", 0.8)
    (tmp_path / "b_model.best.weights.h5").write_bytes(b"checkpoint")
    assert [p.name for p in discover_models(tmp_path)] == ["a_model.h5", "b_model.h5"]
    assert discover_models(tmp_path / "missing") == []


def test_default_is_best_leakage_free_accuracy(tmp_path):
    """Highest test accuracy wins, macro-F1 breaks a tie, unevaluated models come last."""
    write_model(tmp_path, "unevaluated", None)
    write_model(tmp_path, "good", 0.93, macro_f1=0.90)
    write_model(tmp_path, "tied_better_f1", 0.93, macro_f1=0.92)
    write_model(tmp_path, "worse", 0.80)
    assert default_model_path(tmp_path).stem == "tied_better_f1"
    assert default_model_path(tmp_path, preferred="worse").stem == "worse"


def test_default_errors_name_the_problem(tmp_path):
    """No model says how to train one; an unknown preferred name lists what there is."""
    with pytest.raises(ModelError, match="brainmri train"):
        default_model_path(tmp_path)
    write_model(tmp_path, "only", 0.9)
    with pytest.raises(ModelError, match="only"):
        default_model_path(tmp_path, preferred="nope")


def test_app_serves_every_model_in_the_folder(tmp_path):
    """create_app builds the registry (no TensorFlow) with the best model as the default."""
    write_model(tmp_path, "brainmri_cnn", 0.94)
    write_model(tmp_path, "brainmri_mobilenetv2", 0.88, arch="mobilenetv2")
    write_model(tmp_path, "brainmri_efficientnet_lite0", 0.96, arch="efficientnet_lite0")
    app = create_app({"SECRET_KEY": "x", "BRAINMRI_MODEL_DIR": str(tmp_path)})
    registry = app.extensions[REGISTRY_KEY]
    assert registry.names == ["brainmri_efficientnet_lite0", "brainmri_cnn", "brainmri_mobilenetv2"]
    assert app.extensions[EXTENSION_KEY] is registry.get()
    assert not registry.ready  # nothing loaded: the gunicorn master never imports TensorFlow
    pinned = create_app({"SECRET_KEY": "x", "BRAINMRI_MODEL_DIR": str(tmp_path),
                         "BRAINMRI_DEFAULT_MODEL": "brainmri_cnn"})
    assert pinned.extensions[REGISTRY_KEY].default == "brainmri_cnn"


def test_one_bad_model_fails_the_whole_app(tmp_path):
    """A corrupt model anywhere in the folder stops start-up: no half-working model list."""
    write_model(tmp_path, "good", 0.9)
    bad = write_model(tmp_path, "damaged", 0.5)
    bad.write_bytes(b"changed after training")
    with pytest.raises(ModelError, match="damaged.h5 does not match its metadata"):
        create_app({"SECRET_KEY": "x", "BRAINMRI_MODEL_DIR": str(tmp_path)})


def test_model_path_serves_only_that_model(tmp_path):
    """BRAINMRI_MODEL_PATH (single-model deployments) ignores the rest of the folder."""
    write_model(tmp_path, "one", 0.7)
    two = write_model(tmp_path, "two", 0.9)
    app = create_app({"SECRET_KEY": "x", "BRAINMRI_MODEL_PATH": str(two)})
    assert app.extensions[REGISTRY_KEY].names == ["two"]


@pytest.fixture
def multi_app(app):
    """The test app serving three fake models with different answers; `best` is the default."""
    raw = {name: {"name": name, "arch": arch, "evaluation": {"test": {"accuracy": acc}}}
           for name, arch, acc in (("best", "efficientnet_lite0", 0.96), ("cnn", "cnn", 0.94),
                                   ("mobile", "mobilenetv2", 0.90))}
    predictors = {
        "cnn": FakePredictor(GLIOMA, name="cnn", raw=raw["cnn"]),
        "best": FakePredictor(PITUITARY, name="best", raw=raw["best"]),
        "mobile": FakePredictor(MENINGIOMA, name="mobile", raw=raw["mobile"]),
    }
    registry = ModelRegistry(predictors, "best")
    app.extensions[REGISTRY_KEY] = registry
    app.extensions[EXTENSION_KEY] = registry.get()
    return app


@pytest.mark.parametrize(("model", "label"),
                         [(None, "pituitary"), ("cnn", "glioma"), ("mobile", "meningioma")])
def test_api_model_parameter_routes(multi_app, png_bytes, model, label):
    """`model=` (query or form) picks the predictor; the response names the model that answered."""
    client = multi_app.test_client()
    query = f"?model={model}" if model else ""
    response = client.post(f"/api/v1/predict{query}", data={"file": (io.BytesIO(png_bytes), "a.png")})
    assert response.status_code == 200
    assert response.json["label"] == label
    assert response.json["model"]["name"] == (model or "best")
    if model:  # the same through the form field
        form = client.post("/api/v1/predict", data={"file": (io.BytesIO(png_bytes), "a.png"), "model": model})
        assert form.json["model"]["name"] == model


def test_api_unknown_model_is_400(multi_app, png_bytes):
    """A name no model has is refused with the list of valid names, and nothing is classified."""
    response = multi_app.test_client().post(
        "/api/v1/predict?model=resnet", data={"file": (io.BytesIO(png_bytes), "a.png")})
    assert response.status_code == 400
    assert response.json["error"]["code"] == "unknown_model"
    assert "best, cnn, mobile" in response.json["error"]["message"]
    assert all(p.calls == 0 for p in map(multi_app.extensions[REGISTRY_KEY].get, ["best", "cnn"]))


def test_batch_model_parameter_applies_to_every_file(multi_app, png_bytes):
    """The batch endpoint routes all files to the named model."""
    response = multi_app.test_client().post(
        "/api/v1/predict/batch?model=cnn",
        data={"files": [(io.BytesIO(png_bytes), "a.png"), (io.BytesIO(png_bytes), "b.png")]})
    assert response.status_code == 200
    assert [r["label"] for r in response.json["results"]] == ["glioma", "glioma"]
    assert response.json["model"]["name"] == "cnn"


def test_models_endpoint_lists_default_first(multi_app):
    """GET /api/v1/models: the default first, with its recorded figures."""
    body = multi_app.test_client().get("/api/v1/models").json
    assert body["default"] == "best"
    assert [m["name"] for m in body["models"]] == ["best", "cnn", "mobile"]
    assert body["models"][0]["leakage_free_test"] == {"accuracy": 0.96}
    assert body["models"][2]["arch"] == "mobilenetv2"


def test_readyz_waits_for_every_model(multi_app):
    """Ready only when all served models are loaded."""
    client = multi_app.test_client()
    registry = multi_app.extensions[REGISTRY_KEY]
    registry.get("best").load()
    assert client.get("/readyz").status_code == 503
    registry.load()
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json["models"] == ["best", "cnn", "mobile"]


def test_page_selector_and_result_name_the_model(multi_app, png_bytes):
    """The upload page offers every model (default selected); the result says which answered."""
    page = multi_app.test_client().get("/").get_data(as_text=True)
    assert page.index('value="best" selected') < page.index('value="cnn"') < page.index('value="mobile"')
    assert "96.0% on the leakage-free test split, default" in page
    response = PageActions(multi_app.test_client()).upload(png_bytes, model="mobile")
    html = response.get_data(as_text=True)
    assert response.status_code == 200
    assert "Model mobile" in html
    assert "Meningioma" in html


def test_page_without_choice_has_no_selector(client):
    """With one model there is nothing to choose, so no selector is shown."""
    assert "model-select" not in client.get("/").get_data(as_text=True)



def test_preflight_refuses_files_keras_cannot_read(tmp_path):
    """The master's pre-flight opens each .h5 with h5py: garbage or a config-less file is refused."""
    h5py = pytest.importorskip("h5py")
    from brainmri.preflight import check_keras_h5

    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 8)
    with pytest.raises(ModelError, match="garbage.h5 could not be loaded as a Keras model"):
        check_keras_h5(garbage)
    empty = tmp_path / "empty.h5"
    with h5py.File(empty, "w") as h5:
        h5.create_group("model_weights")
    with pytest.raises(ModelError, match="empty.h5 could not be loaded as a Keras model"):
        check_keras_h5(empty)


def test_preflight_reports_what_a_worker_would(tmp_path, monkeypatch):
    """`python -m brainmri.preflight` checks the configured folder: exit 4 and the reason, or 0."""
    from brainmri import preflight

    monkeypatch.setenv("FLASK_BRAINMRI_MODEL_DIR", str(tmp_path))
    assert "No trained model" in preflight.check_models()
    assert preflight.main() == preflight.APP_LOAD_ERROR


def test_a_model_of_another_preprocessing_version_is_refused(tmp_path):
    """A network trained on version-1 inputs is not served version-2 inputs without a word."""
    from brainmri.imaging import PREPROCESSING_VERSION
    from brainmri.inference import read_model_card

    path = tmp_path / "old.h5"
    path.write_bytes(b"old" * 10)
    write_model_card(path, {"name": "old", "classes": list(CLASSES),
                            "input": {"size": 32, "channels": 1},
                            "preprocessing": {"version": PREPROCESSING_VERSION - 1}})
    with pytest.raises(ModelError, match="preprocessing version"):
        read_model_card(path)
