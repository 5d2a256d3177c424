"""Concurrent writers of one registered model: two `dcad promote` at once against a real MLflow server."""

from __future__ import annotations

import json

import pytest
from fixtures_mlflow import run_dcad
from ray_helpers import start_dcad

from dcad.platform.registry import alias_history, alias_log
from dcad.platform.registry_lock import lock_name
from dcad.platform.store import mlflow_client

pytestmark = pytest.mark.slow
MODEL = "concurrent"


def test_two_promotions_at_once_each_decide_against_the_holder_of_their_moment(proxied_server, trained, tmp_path, capsys):
    uri = proxied_server.url
    runs = []
    for name in ("cand-a", "cand-b"):
        logged = run_dcad(capsys, "log", str(trained.model_dir), "--experiment", "concurrent", "--run-name", name,
                          "--data", str(trained.data), "--tracking-uri", uri)
        assert logged.code == 0, logged.err
        client = mlflow_client(uri)
        exp = client.get_experiment_by_name("concurrent")
        runs.append(client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'")[0].info.run_id)

    procs = [start_dcad(["promote", MODEL, "--run", run_id, "--alias", "champion", "--floor", "0", "--json",
                         "--tracking-uri", uri], tmp_path / f"promote-{i}.log") for i, run_id in enumerate(runs)]
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [0, 0], [p.text()[-2000:] for p in procs]
    decisions = [json.loads(p.text()[p.text().index("{"):]) for p in procs]

    client = mlflow_client(uri)
    model = client.get_registered_model(MODEL)
    versions = sorted(d["version"] for d in decisions)
    assert versions == sorted(str(v.version) for v in client.search_model_versions(f"name='{MODEL}'"))
    assert len(set(versions)) == 2
    # one went first; the other was gated against the version the first had just made champion
    first, second = sorted(decisions, key=lambda d: d["previous"] is not None)
    assert first["decision"] == "first" and first["previous"] is None
    assert second["previous"] == first["version"], decisions
    # every move is recorded, in order, and the alias is where the history says
    log = alias_log(model, "champion")
    assert [(e["version"], e["from"]) for e in log] == [(first["version"], None), (second["version"], first["version"])]
    history = alias_history(model, "champion")
    holder = model.aliases["champion"]
    assert str(holder) == history[-1]
    assert history == ([first["version"], second["version"]] if second["moved"] else [first["version"]])
    # the lock is gone, and `dcad models list` never showed it
    listed = json.loads(run_dcad(capsys, "models", "list", "--json", "--tracking-uri", uri).out)
    assert lock_name(MODEL) not in {m.name for m in client.search_registered_models()}
    assert MODEL in {m["name"] for m in listed}
