"""The documentation: the site builds strictly, the generated model cards and figure tables match
the reports, the README stays a short page whose links resolve, every Grafana query names a
series /metrics exports, and the page and the API link to the answering model's card."""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from brainmri.config import PROJECT_ROOT
from brainmri.inference import CLASSES
from brainmri.inference import discover_models
from brainmri.training import cards
from conftest import encode
from conftest import synthetic_slice

README = PROJECT_ROOT / "README.md"
DASHBOARD = PROJECT_ROOT / "docs" / "grafana-dashboard.json"
TEST_COMMAND = "python3 -m pip install uv && uv run --locked pytest"
SERVE_COMMAND = "python3 -m pip install uv && uv run --locked gunicorn"


# --- generated cards and figures ---------------------------------------------------------------


def test_generated_cards_and_figures_match_the_reports():
    """A card or figure table that differs from what `brainmri docs` writes fails here."""
    stale = cards.stale_files(PROJECT_ROOT)
    assert not stale, (f"{', '.join(map(str, stale))} differ from the model metadata and reports/; "
                       f"run: {cards.GENERATOR_COMMAND}")


def test_every_model_in_the_model_folder_has_a_card():
    for path in discover_models(PROJECT_ROOT / "model"):
        card = PROJECT_ROOT / cards.CARDS_DIR / f"{path.stem}.md"
        assert card.is_file(), card
        text = card.read_text()
        for heading in ("## Uses", "### Out-of-scope use", "## Training data", "## Evaluation data",
                        "## Results", "## Calibration and the uncertain flag", "## The input guard",
                        "## Bias, risks and limitations", "## Training procedure"):
            assert heading in text, (card.name, heading)


def _tiny_project(root: Path, report_extra: dict, report_sha: str | None = None) -> None:
    """A model folder with one (fake) model file and a report of it."""
    (root / "model").mkdir()
    (root / "reports").mkdir()
    weights = root / "model" / "brainmri_tiny.h5"
    weights.write_bytes(b"not a real model")
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    meta = {"name": "brainmri_tiny", "version": "9.0.0", "classes": list(CLASSES),
            "input": {"size": 128, "channels": 1}, "sha256": sha,
            "training": {"collections": ["sartaj", "lgg"], "command": "uv run brainmri train ...",
                         "wall_seconds": 600.0}}
    (root / "model" / "brainmri_tiny.json").write_text(json.dumps(meta))
    report = {"model": {"name": "brainmri_tiny", "version": "9.0.0", "sha256": report_sha or sha},
              "trained_on": ["sartaj", "lgg"],
              "sets": {"brats/unseen": {"images": 1809, "accuracy": 0.612,
                                        "by_sequence": {"t1": {"images": 1100, "accuracy": 0.6,
                                                               "sensitivity": 0.444,
                                                               "specificity": 0.901}}}},
              **report_extra}
    (root / "reports" / "metrics.json").write_text(json.dumps(report))
    (root / "README.md").write_text("# x\n\n<!-- generated:default-figures -->\nold\n"
                                    "<!-- /generated:default-figures -->\n")


def test_report_keys_the_generator_does_not_know_still_reach_the_card(tmp_path):
    """New protocols (leave-one-sequence-out, confident precision off-collection, ...) are
    rendered generically, so the lead only re-runs the generator after retraining."""
    _tiny_project(tmp_path, {
        "leave_one_sequence_out": {"t1c": {"images": 1234, "accuracy": 0.771, "sensitivity": 0.65}},
        "trust": {"off_collection_confident": {"brats/unseen": {"coverage": 0.314,
                                                                "precision": 0.882}}},
    })
    written = cards.write_all(tmp_path)
    card = (tmp_path / "docs" / "models" / "brainmri_tiny.md").read_text()
    assert "### Leave one sequence out" in card and "0.771" in card and "1,234" in card
    assert "### Off collection confident" in card and "0.314" in card and "0.882" in card
    # A collection it never trained on is marked, and its weakest figure named in plain words.
    readme = (tmp_path / "README.md").read_text()
    assert "| BRATS all of it (never trained on) | **no** | T1 | 1,100 |" in readme
    assert "misses 56% of tumour slices on BRATS all of it (never trained on), T1" in readme
    assert "old" not in readme
    assert Path("README.md") in written and cards.stale_files(tmp_path) == []


def test_a_report_of_another_file_is_flagged_as_such(tmp_path):
    _tiny_project(tmp_path, {}, report_sha="0" * 64)
    card = cards.render_all(tmp_path)[Path("docs/models/brainmri_tiny.md")]
    assert "measured on another file of this name" in card


def test_reports_no_served_model_owns_are_listed_on_the_models_page(tmp_path):
    """A baseline or leave-one-out run kept in reports/ still reaches the documentation."""
    _tiny_project(tmp_path, {})
    (tmp_path / "reports" / "baseline").mkdir()
    (tmp_path / "reports" / "baseline" / "metrics.json").write_text(json.dumps({
        "model": {"name": "brainmri_tiny", "version": "1.0.0", "sha256": "1" * 64},
        "trained_on": ["sartaj"],
        "sets": {"lgg/unseen": {"images": 99, "accuracy": 0.401, "sensitivity": 0.25,
                                "specificity": 0.55}}}))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "models.md").write_text("<!-- generated:other-reports -->\n"
                                                 "<!-- /generated:other-reports -->\n")
    page = cards.render_all(tmp_path)[Path("docs/models.md")]
    assert "`reports/baseline/metrics.json`" in page and "trained on sartaj" in page
    assert "| LGG all of it (never trained on) | **no** | mixed | 99 | 0.401 | 0.250 | 0.550 |" in page
    assert "reports/metrics.json" not in page  # the served model's own report is on its card


def test_cards_of_models_no_longer_served_are_stale(tmp_path):
    _tiny_project(tmp_path, {})
    cards.write_all(tmp_path)
    (tmp_path / "docs" / "models" / "brainmri_gone.md").write_text("# old card\n")
    assert Path("docs/models/brainmri_gone.md") in cards.stale_files(tmp_path)
    cards.write_all(tmp_path)
    assert not (tmp_path / "docs" / "models" / "brainmri_gone.md").exists()


# --- the site ----------------------------------------------------------------------------------


def test_the_documentation_site_builds_strictly(tmp_path):
    """`mkdocs build --strict`: a broken link, anchor or nav entry fails the build."""
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
         "--config-file", str(PROJECT_ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
        capture_output=True, text=True, timeout=300, cwd=PROJECT_ROOT,
        env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "models" / "brainmri_cnn" / "index.html").is_file() or \
        list((tmp_path / "site" / "models").glob("*/index.html"))


# --- the README --------------------------------------------------------------------------------


def test_the_readme_is_a_short_page_that_starts_with_the_two_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    first_code = re.findall(r"```sh\n(.*?)\n```", text, re.S)[:2]
    assert first_code == [SERVE_COMMAND, TEST_COMMAND]
    assert "uv run --locked pytest\n" in (PROJECT_ROOT / ".ci" / "run").read_text()
    assert "Research and education only" in text


def test_every_relative_link_in_the_readme_resolves():
    text = README.read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    relative = [link for link in links if not re.match(r"[a-z]+:", link) and not link.startswith("#")]
    assert relative
    for link in relative:
        assert (PROJECT_ROOT / link.split("#")[0]).exists(), link


# --- the Grafana dashboard ---------------------------------------------------------------------


def _panels(node: dict) -> list[dict]:
    found = []
    for panel in node.get("panels", []):
        found.append(panel)
        found += _panels(panel)
    return found


def _exported_series(client) -> set[str]:
    """Every sample name /metrics exports (or would, once a labelled child exists)."""
    # One answer and one refusal, so the labelled series exist too.
    client.post("/api/v1/predict", data={"file": (io.BytesIO(encode(synthetic_slice())), "a.png")},
                content_type="multipart/form-data")
    text = client.get("/metrics").get_data(as_text=True)
    names = set()
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "gauge": ("",), "summary": ("_sum", "_count", "_created")}
    for family in text_string_to_metric_families(text):
        names |= {family.name + suffix for suffix in suffixes.get(family.type, ("",))}
        names |= {sample.name for sample in family.samples}
    return names


def test_every_dashboard_query_names_a_series_metrics_exports(client):
    dashboard = json.loads(DASHBOARD.read_text())
    exported = _exported_series(client)
    queries = [target["expr"] for panel in _panels(dashboard) for target in panel.get("targets", [])]
    assert len(queries) >= 8
    for query in queries:
        named = set(re.findall(r"\bbrainmri_[a-z_]+", query))
        assert named, query
        assert named <= exported, (query, named - exported)
    covered = {name for query in queries for name in re.findall(r"\bbrainmri_[a-z_]+", query)}
    for series in ("brainmri_http_requests_total", "brainmri_http_request_duration_seconds_bucket",
                   "brainmri_predictions_total", "brainmri_uncertain_predictions_total",
                   "brainmri_refusals_total", "brainmri_model_load_seconds"):
        assert series in covered, series


def test_every_exported_series_is_documented_on_the_deployment_page(client):
    page = (PROJECT_ROOT / "docs" / "deployment.md").read_text()
    text = client.get("/metrics").get_data(as_text=True)
    for family in text_string_to_metric_families(text):
        if family.name.startswith("brainmri_") and not family.name.endswith("_created"):
            name = family.name + ("_total" if family.type == "counter" else "")
            assert f"`{name}`" in page, name


def test_the_dashboard_imports_as_is():
    """Grafana's import form: a data-source input every panel and query uses, unique panel ids."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["__inputs"][0]["pluginId"] == "prometheus"
    uid = "${" + dashboard["__inputs"][0]["name"] + "}"
    panels = _panels(dashboard)
    assert len({panel["id"] for panel in panels}) == len(panels)
    for panel in panels:
        assert panel["datasource"]["uid"] == uid
        assert all(target["datasource"]["uid"] == uid for target in panel["targets"])


# --- the page and the API link to the card ------------------------------------------------------


@pytest.fixture
def card_dir(app, tmp_path):
    (tmp_path / "fake-cnn.md").write_text("# Model card: fake-cnn\n")
    app.config["BRAINMRI_MODEL_CARDS_DIR"] = str(tmp_path)
    return tmp_path


def test_the_models_api_links_to_each_card(client, card_dir):
    models = client.get("/api/v1/models").get_json()["models"]
    assert models[0]["card"] == "/models/fake-cnn/card"
    response = client.get(models[0]["card"])
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    assert response.get_data(as_text=True) == "# Model card: fake-cnn\n"


def test_the_result_page_links_to_the_card_of_the_model_that_answered(pages, card_dir):
    html = pages.upload(encode(synthetic_slice())).get_data(as_text=True)
    assert 'href="/models/fake-cnn/card"' in html


def test_no_card_no_link_and_unknown_names_are_not_found(client, pages, app, tmp_path):
    app.config["BRAINMRI_MODEL_CARDS_DIR"] = str(tmp_path)  # empty
    assert client.get("/api/v1/models").get_json()["models"][0]["card"] is None
    assert "/card" not in pages.upload(encode(synthetic_slice())).get_data(as_text=True)
    (tmp_path / "other.md").write_text("x")
    for name in ("other", "fake-cnn", "..%2Fmodel%2Fbrainmri_cnn"):
        assert client.get(f"/models/{name}/card").status_code == 404


def test_a_report_of_an_unexpected_shape_is_shown_raw_not_a_crash(tmp_path):
    _tiny_project(tmp_path, {"trust": {"calibration": {"lgg/test": 0.5}, "temperature": 1.2}})
    card = cards.render_all(tmp_path)[Path("docs/models/brainmri_tiny.md")]
    assert "Laid out generically" in card and "## The input guard" in card


def test_the_study_page_joins_the_nav_once_it_exists(tmp_path):
    """docs/studies.md comes with the study view; the nav lists it only when it is there."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("optional_pages",
                                                  PROJECT_ROOT / "docs" / "hooks" / "optional_pages.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    nav = [{"Home": "index.md"}, {"Using the pages": "pages.md"}, {"HTTP API": "api.md"}]
    config = {"docs_dir": str(tmp_path), "nav": [dict(entry) for entry in nav]}
    assert hook.on_config(config)["nav"] == nav
    (tmp_path / "studies.md").write_text("# Studies\n")
    assert hook.on_config(config)["nav"][2] == {"Studies": "studies.md"}
    assert len(hook.on_config(config)["nav"]) == 4  # not added twice
