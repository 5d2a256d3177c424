"""Per-epoch metrics when an epoch runs again (Ray Train workers restarted from an earlier checkpoint)."""

from types import SimpleNamespace

from mlflow.tracking import MlflowClient

from dcad.platform.tracking import RunTracker


def test_an_epoch_reported_again_is_logged_once_also_by_a_restarted_worker(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("epochs")
    run_id = client.create_run(experiment).info.run_id
    first = RunTracker(uri, client, run_id, experiment)
    first.log_epoch(SimpleNamespace(stage="refiner", epoch=1, metrics={"train_loss": 0.9}))
    first.log_epoch(SimpleNamespace(stage="refiner", epoch=2, metrics={"train_loss": 0.5}))
    first.log_epoch(SimpleNamespace(stage="refiner", epoch=2, metrics={"train_loss": 0.5, "val_auroc": 0.8}))
    restarted = RunTracker(uri, client, run_id, experiment)  # a new worker process after a node was lost
    restarted.log_epoch(SimpleNamespace(stage="refiner", epoch=2, metrics={"train_loss": 0.6}))
    restarted.log_epoch(SimpleNamespace(stage="refiner", epoch=3, metrics={"train_loss": 0.4}))
    history = client.get_metric_history(run_id, "refiner_train_loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.9), (2, 0.5), (3, 0.4)]
    assert [m.step for m in client.get_metric_history(run_id, "refiner_val_auroc")] == [2]
