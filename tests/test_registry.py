"""Gated promotion, version tags, alias history and rollback on a real sqlite registry.

Models are fake directories (logged and registered for real); evaluation is injected, so the gate
sees metrics the test chooses. The end-to-end path with a trained model is in test_mlflow_e2e.py.
"""

from __future__ import annotations

import json
import math

import pytest
from fixtures_mlflow import fake_model_dir, run_dcad, sqlite_uri

from dcad.platform import registry
from dcad.platform.errors import RegistryError
from dcad.platform.gate import check_gate
from dcad.platform.mlflow_store import mlflow_client
from dcad.platform.tracking import TrackingOptions, start_run

CATS = ["cat_a", "cat_b"]


def result(a: float, b: float, pixel: float = 0.9) -> dict:
    cats = {"cat_a": {"image_auroc": a, "pixel_auroc": pixel}, "cat_b": {"image_auroc": b, "pixel_auroc": pixel}}
    return {"categories": cats, "mean": {"image_auroc": (a + b) / 2, "pixel_auroc": pixel}}


# ---- the gate on its own -------------------------------------------------------------------------
def test_gate_allows_drops_within_tolerance_and_refuses_larger_ones():
    incumbent = result(0.90, 0.80)
    assert check_gate(result(0.895, 0.85), incumbent, ("image_auroc",), 0.01).passed
    refused = check_gate(result(0.95, 0.78), incumbent, ("image_auroc",), 0.01)
    assert not refused.passed
    assert [(r.category, r.metric) for r in refused.regressions] == [("cat_b", "image_auroc")]
    assert refused.regressions[0].delta == pytest.approx(-0.02)


def test_gate_counts_a_missing_category_as_regression_and_skips_undefined_values():
    incumbent = result(0.9, float("nan"))
    candidate = {"categories": {"cat_b": {"image_auroc": 0.1, "pixel_auroc": 0.9}}, "mean": {}}
    gate = check_gate(candidate, incumbent, ("image_auroc",), 0.0)
    assert [r.category for r in gate.regressions] == ["cat_a"]  # cat_b's incumbent value is nan: not comparable
    assert check_gate(result(0.1, 0.1), None).has_incumbent is False


# ---- promotion against a real registry ------------------------------------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_dataset):
    """A sqlite store, and a function that logs a fake model run whose evaluation gives `metrics`."""
    from dcad.core.data import open_dataset

    tmp_path = tmp_path_factory.mktemp("registry")
    uri = sqlite_uri(tmp_path / "store")
    digest = open_dataset(tiny_dataset).digest()
    client = mlflow_client(uri)
    metrics_by_model: dict[str, dict] = {}
    calls: list[str] = []

    def make_run(metrics: dict, parent: str | None = None) -> str:
        tracker = start_run(TrackingOptions(uri, "reg", parent_run_id=parent), "train")
        model_dir = fake_model_dir(tmp_path / tracker.run_id, CATS, digest, data_root=tiny_dataset)
        tracker.log_dataset(tiny_dataset, digest, "train")
        tracker.log_model(model_dir)
        tracker.finish()
        assert tracker.lost is None, tracker.lost
        metrics_by_model[tracker.model_uri.removeprefix("models:/")] = metrics
        return tracker.run_id

    def evaluate(model_uri: str, data) -> dict:
        calls.append(model_uri)
        ref = model_uri.split("/", 1)[1]
        if ref.startswith("m-"):
            return metrics_by_model[ref]
        name, version = ref.split("/")
        return metrics_by_model[registry.version_model_id(client.get_model_version(name, version))]

    return uri, client, make_run, evaluate, calls


def snapshot(client) -> str:
    """Everything the registry holds (models, aliases, tags, versions and their tags)."""
    state = []
    for m in client.search_registered_models():
        full = client.get_registered_model(m.name)
        versions = [(v.version, sorted(v.tags.items())) for v in client.search_model_versions(f"name='{m.name}'")]
        state.append((full.name, sorted(full.aliases.items()), sorted(full.tags.items()), sorted(versions)))
    return json.dumps(state, default=str)


def test_promotion_gate_history_and_rollback(store, decoy_global_store):
    uri, client, make_run, evaluate, calls = store
    run1, run2, run3 = make_run(result(0.80, 0.80)), make_run(result(0.90, 0.85)), make_run(result(0.99, 0.70))

    first = registry.promote(client, registry.PromotionRequest("dcad-reg", run1), evaluate)
    assert (first.decision, first.version, first.moved) == ("first", "1", True)

    better = registry.promote(client, registry.PromotionRequest("dcad-reg", run2), evaluate)
    assert (better.decision, better.previous, better.version) == ("passed", "1", "2")
    assert str(client.get_model_version_by_alias("dcad-reg", "champion").version) == "2"

    worse = registry.promote(client, registry.PromotionRequest("dcad-reg", run3), evaluate)
    assert worse.decision == "refused" and not worse.moved
    assert [(r.category, r.metric) for r in worse.gate.regressions] == [("cat_b", "image_auroc")]
    assert str(client.get_model_version_by_alias("dcad-reg", "champion").version) == "2"  # alias did not move
    v3 = client.get_model_version("dcad-reg", "3")
    assert v3.tags["dcad.gate.champion.result"] == "refused"
    assert json.loads(v3.tags["dcad.gate.champion.regressions"])[0]["category"] == "cat_b"

    forced = registry.promote(client, registry.PromotionRequest("dcad-reg", run3, force=True), evaluate)
    assert (forced.decision, forced.version) == ("forced", "3")  # the same logged model: no new version
    assert client.get_model_version("dcad-reg", "3").tags["dcad.gate.champion.forced"] == "true"
    assert len(client.search_model_versions("name='dcad-reg'")) == 3

    # Lineage and metrics on the version.
    v2 = client.get_model_version("dcad-reg", "2")
    assert v2.tags["dcad.source_run"] == run2 and v2.run_id == run2
    assert v2.tags["dcad.dataset_digest"] == v2.tags["dcad.eval_dataset_digest"] and len(v2.tags["dcad.dataset_digest"]) == 64
    assert float(v2.tags["dcad.metric.image_auroc"]) == pytest.approx(0.875)
    assert v2.tags["dcad.gate.champion.result"] == "passed" and v2.tags["dcad.gate.champion.against"] == "1"
    assert v2.tags["dcad.gate.champion.by"] and v2.tags["dcad.gate.champion.at"].endswith("+00:00")

    # Rollback walks the history back; the versions and the log stay.
    assert registry.rollback(client, "dcad-reg", "champion") == ("3", "2")
    assert registry.rollback(client, "dcad-reg", "champion") == ("2", "1")
    with pytest.raises(RegistryError, match="no previous holder"):
        registry.rollback(client, "dcad-reg", "champion")
    shown = registry.show_model(client, "dcad-reg")
    assert shown["aliases"] == {"champion": "1"}
    assert [e["event"] for e in shown["log"]["champion"]] == ["first", "passed", "refused", "forced", "rollback", "rollback"]
    assert [v["version"] for v in shown["versions"]] == ["1", "2", "3"]
    assert client.get_model_version("dcad-reg", "3").tags["dcad.gate.champion.rolled_back"]


def test_holder_metrics_recorded_on_the_same_data_are_reused(store):
    _, client, make_run, evaluate, calls = store
    run1, run2 = make_run(result(0.8, 0.8)), make_run(result(0.8, 0.8))
    registry.promote(client, registry.PromotionRequest("dcad-reuse", run1), evaluate)
    calls.clear()
    registry.promote(client, registry.PromotionRequest("dcad-reuse", run2), evaluate)
    assert len(calls) == 1 and calls[0].startswith("models:/m-")  # only the candidate was evaluated
    calls.clear()
    registry.promote(client, registry.PromotionRequest("dcad-reuse", run1, reuse_recorded=False), evaluate)
    assert len(calls) == 2


def test_sweep_parent_is_recorded_on_the_version(store):
    uri, client, make_run, evaluate, _ = store
    parent = start_run(TrackingOptions(uri, "reg", run_name="sweep"), "sweep")
    child = make_run(result(0.8, 0.8), parent=parent.run_id)
    registry.promote(client, registry.PromotionRequest("dcad-sweep", child), evaluate)
    assert client.get_model_version("dcad-sweep", "1").tags["dcad.sweep"] == parent.run_id


@pytest.fixture(scope="module")
def good_run(store) -> str:
    """A run whose model holds dcad-bad@champion."""
    _, client, make_run, evaluate, _ = store
    run = make_run(result(0.8, 0.8))
    registry.promote(client, registry.PromotionRequest("dcad-bad", run), evaluate)
    return run


@pytest.mark.parametrize(
    "name, run, alias, message",
    [
        ("bad/name", None, "champion", "invalid model name"),
        ("dcad-bad", "0123456789abcdef0123456789abcdef", "champion", "not found"),
        ("dcad-bad", "not a run id!", "champion", "invalid run id"),
        ("dcad-bad", None, "v3", "invalid alias"),
        ("dcad-bad", None, "latest", "invalid alias"),
        ("dcad-bad", None, "champ ion", "invalid alias"),
    ],
)
def test_bad_promotion_requests_leave_the_registry_unchanged(store, good_run, name, run, alias, message):
    _, client, _, evaluate, _ = store
    good = good_run
    before = snapshot(client)
    with pytest.raises(RegistryError, match=message):
        registry.promote(client, registry.PromotionRequest(name, run or good, alias), evaluate)
    assert snapshot(client) == before


def test_cli_promote_refuses_with_a_table_and_exit_code(store, capsys, monkeypatch, decoy_global_store):
    uri, client, make_run, evaluate, _ = store
    run1, run2 = make_run(result(0.9, 0.9)), make_run(result(0.9, 0.5))
    monkeypatch.setattr("dcad.platform.evaluation.uri_evaluator", lambda *a, **k: evaluate)
    assert run_dcad(capsys, "promote", "dcad-cli", "--run", run1, "--tracking-uri", uri).code == 0
    refused = run_dcad(capsys, "promote", "dcad-cli", "--run", run2, "--tracking-uri", uri)
    assert refused.code == 3
    assert "cat_b" in refused.out and "regressed" in refused.out and "cat_a" not in refused.out
    assert refused.err.startswith("error: refused") and refused.err.count("\n") == 1
    bad = run_dcad(capsys, "promote", "dcad-cli", "--run", run2, "--alias", "v1", "--tracking-uri", uri)
    assert bad.code == 2 and "invalid alias" in bad.err
    shown = run_dcad(capsys, "models", "show", "dcad-cli", "--json", "--tracking-uri", uri)
    info = json.loads(shown.out)
    assert info["aliases"] == {"champion": "1"}
    assert [v["tags"]["dcad.gate.champion.result"] for v in info["versions"]] == ["first", "refused"]
    listed = json.loads(run_dcad(capsys, "models", "list", "--json", "--tracking-uri", uri).out)
    assert [(m["versions"], m["aliases"]) for m in listed if m["name"] == "dcad-cli"] == [(2, {"champion": "1"})]
    forced = run_dcad(capsys, "promote", "dcad-cli", "--run", run2, "--force", "--tracking-uri", uri)
    assert forced.code == 0 and "forced" in forced.out
    back = run_dcad(capsys, "promote", "dcad-cli", "--rollback", "--alias", "champion", "--tracking-uri", uri)
    assert back.code == 0 and str(client.get_model_version_by_alias("dcad-cli", "champion").version) == "1"


def test_nan_metrics_survive_the_version_tags(store):
    _, client, make_run, evaluate, _ = store
    run = make_run(result(0.8, float("nan")))
    registry.promote(client, registry.PromotionRequest("dcad-nan", run), evaluate)
    recorded = registry.recorded_metrics(client.get_model_version("dcad-nan", "1"), registry.dataset_digest(registry.evaluation_data(client.get_run(run), None)))
    assert math.isnan(recorded["categories"]["cat_b"]["image_auroc"])


def test_the_floor_keeps_a_model_below_it_from_any_alias_first_holder_included(store):
    _, client, make_run, evaluate, _ = store
    poor, good = make_run(result(0.45, 0.40)), make_run(result(0.8, 0.7))
    refused = registry.promote(client, registry.PromotionRequest("dcad-floor", poor), evaluate)
    assert (refused.decision, refused.moved) == ("refused", False)
    assert refused.gate.below_floor == {"image_auroc": pytest.approx(0.425)}
    assert "below the floor 0.6" in refused.refusal()
    assert "champion" not in client.get_registered_model("dcad-floor").aliases
    assert client.get_model_version("dcad-floor", refused.version).tags["dcad.gate.champion.result"] == "refused"
    first = registry.promote(client, registry.PromotionRequest("dcad-floor", good), evaluate)
    assert (first.decision, first.moved) == ("first", True)
    unfloored = check_gate(result(0.45, 0.40), None, ("image_auroc",), 0.01, floor=0.0)
    assert unfloored.passed and check_gate(result(0.45, 0.40), None, ("image_auroc",), 0.01, floor=0.5).below_floor
