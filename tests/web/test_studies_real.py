"""The study API on real data with the shipped model (issue 34): a BraTS volume, and a
held-out LGG patient's slices sent as a ZIP, as a clinician would send them.

Slow (loads the real model) and needs ../shared/data: skipped without it, failed under CI=true.
"""

from __future__ import annotations

import csv
import io
import json
import os
import zipfile
from pathlib import Path

import pytest

from brainmri import create_app
from brainmri.config import DEFAULTS
from brainmri.config import PROJECT_ROOT
from brainmri.inference import DISCLAIMER

from conftest import _missing_data
from conftest import require_lgg_data

pytestmark = [pytest.mark.slow, pytest.mark.realdata]

MODEL = Path(DEFAULTS["BRAINMRI_MODEL_DIR"]) / "brainmri_cnn.h5"
VOLUMES = Path(os.environ.get("BRAINMRI_VOLUMES_DATA",
                              PROJECT_ROOT.parent / "shared" / "data" / "volumes"))


def volume(name: str) -> bytes:
    path = VOLUMES / name
    if not path.is_file():
        _missing_data(f"real volume {name} not found in {VOLUMES} (set BRAINMRI_VOLUMES_DATA)")
    return path.read_bytes()


@pytest.fixture(scope="module")
def client():
    app = create_app({"TESTING": True, "SECRET_KEY": "t", "BRAINMRI_RATE_LIMIT": None,
                      "BRAINMRI_MODEL_PATH": str(MODEL)})
    return app.test_client()


def post(client, files):
    return client.post("/api/v1/studies",
                       data={"files": [(io.BytesIO(data), name) for data, name in files]},
                       content_type="multipart/form-data")


def test_brats_volume(client):
    response = post(client, [(volume("Brats18_TCIA02_471_flair.nii.gz"), "v.nii.gz")])
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["disclaimer"] == DISCLAIMER and body["kind"] == "nifti"
    assert len(body["slices"]) == 155
    counts = body["summary"]["counts"]
    assert counts["blank"] >= 10 and counts["scored"] + counts["refused"] + counts["blank"] == 155
    assert body["summary"]["label"] in ("tumor", "no_tumor", "no_answer")


def _held_out_lgg_patient() -> str:
    manifest = json.loads(MODEL.with_suffix(".splits.json").read_text())["splits"]
    patients = {"_".join(Path(p).name.split("_")[:3]) for p in manifest["test"]
                if p.startswith("lgg/")}
    return sorted(patients)[0]


def test_held_out_lgg_patient_as_zip(client):
    root = require_lgg_data()
    patient = _held_out_lgg_patient()
    rows = [r for r in csv.DictReader((root / "slices.csv").read_text().splitlines()) if r["patient"] == patient]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for row in rows:
            path = root / row["label"] / f"{row['slice']}_flair.jpg"
            archive.writestr(f"{patient}/{path.name}", path.read_bytes())
    response = post(client, [(buffer.getvalue(), "study.zip")])
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["kind"] == "zip" and len(body["slices"]) == len(rows)
    assert patient not in response.get_data(as_text=True)
    # reports/study_rule.json: every held-out LGG patient's study is called tumour.
    assert body["summary"]["label"] == "tumor"
