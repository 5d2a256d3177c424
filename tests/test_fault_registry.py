"""Concurrent writers of one registered model against a real MLflow server: two `dcad promote` at once, and a
`dcad promote` while a sweep registers its best trial."""

from __future__ import annotations

import json

import pytest
from fixtures_mlflow import run_dcad
from ray_helpers import start_dcad, wait_for

from dcad.platform.registry import alias_history, alias_log, lock_name, model_lock
from dcad.platform.mlflow_store import mlflow_client

pytestmark = pytest.mark.slow
MODEL = "concurrent"


def _logged_runs(capsys, trained, uri: str, names: tuple[str, ...]) -> list[str]:
    runs = []
    for name in names:
        logged = run_dcad(capsys, "log", str(trained.model_dir), "--experiment", "concurrent", "--run-name", name,
                          "--data", str(trained.data), "--tracking-uri", uri)
        assert logged.code == 0, logged.err
        client = mlflow_client(uri)
        exp = client.get_experiment_by_name("concurrent")
        runs.append(client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'")[0].info.run_id)
    return runs


def test_two_promotions_at_once_each_decide_against_the_holder_of_their_moment(proxied_server, trained, tmp_path, capsys):
    uri = proxied_server.url
    runs = _logged_runs(capsys, trained, uri, ("cand-a", "cand-b"))

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


def test_a_promotion_while_a_sweep_registers_its_best(proxied_server, trained, tmp_path, capsys):
    """A champion exists; `dcad promote` of a new candidate (gated against it) and a sweep's `register_best`
    (moving `challenger`) run at once: every version is numbered once, both alias moves are recorded, and the
    gate was decided against the champion of that moment."""
    import threading

    from dcad.platform.sweep.reporting import BestTrial, register_best
    from dcad.platform.sweep.spec import SweepSpec

    uri, name = proxied_server.url, "racing"
    champion_run, candidate_run, sweep_run = _logged_runs(capsys, trained, uri, ("champ", "cand", "sweep-best"))
    first = run_dcad(capsys, "promote", name, "--run", champion_run, "--alias", "champion", "--floor", "0", "--json",
                     "--tracking-uri", uri)
    assert first.code == 0, first.err
    champion = json.loads(first.out)["version"]
    spec = SweepSpec.model_validate({
        "name": "race", "base": {"profile": "tiny"}, "dataset": str(trained.data), "register_best": name,
        "search_space": {"refiner.guidance_scale": {"type": "float", "low": 0.0, "high": 2.0}},
        "objective": [{"metric": "val_pixel_auroc", "mode": "max"}],
    })
    waiting = "registered model 'racing' is being changed by another process: waiting for it"
    sweep_log: list[str] = []
    registered: dict[str, str] = {}
    with model_lock(mlflow_client(uri), name):  # held until both writers wait for it: then they race for it
        promotion = start_dcad(["promote", name, "--run", candidate_run, "--alias", "champion", "--floor", "0",
                                "--json", "--tracking-uri", uri], tmp_path / "promote.log")
        sweep = threading.Thread(target=lambda: registered.update(version=register_best(
            mlflow_client(uri), spec, BestTrial("t0", sweep_run, {}, {}), trained.data, uri, log=sweep_log.append)))
        sweep.start()
        wait_for(lambda: waiting in promotion.text() or promotion.proc.poll() is not None, 120, "promote to wait")
        wait_for(lambda: waiting in sweep_log or not sweep.is_alive(), 120, "the sweep to wait")
        assert promotion.proc.poll() is None and sweep.is_alive(), promotion.text()[-2000:]
    assert promotion.wait(timeout=300) == 0, promotion.text()[-2000:]
    sweep.join(timeout=300)
    decision = json.loads(promotion.text()[promotion.text().index("{"):])

    client = mlflow_client(uri)
    model = client.get_registered_model(name)
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    assert versions == [1, 2, 3]  # one each, none twice
    assert sorted([int(champion), int(decision["version"]), int(registered["version"])]) == versions
    by_version = {v.version: v.run_id for v in client.search_model_versions(f"name='{name}'")}
    assert by_version[decision["version"]] == candidate_run and by_version[registered["version"]] == sweep_run
    assert decision["previous"] == champion  # gated against the champion of that moment
    assert [e["version"] for e in alias_log(model, "challenger")] == [registered["version"]]
    assert model.aliases["challenger"] == registered["version"]
    champions = [(e["version"], e["from"]) for e in alias_log(model, "champion")]
    assert champions == [(champion, None)] + ([(decision["version"], champion)] if decision["moved"] else [])
    assert str(model.aliases["champion"]) == (decision["version"] if decision["moved"] else champion)
    assert lock_name(name) not in {m.name for m in client.search_registered_models()}
