"""Artifacts in S3 through a real `mlflow server` process and a real S3 endpoint (`moto_server`) over HTTP.

(a) proxied: the server writes to s3://BUCKET/proxied; the client has no S3 endpoint or credentials.
(b) direct: runs get s3://BUCKET/direct locations; the client writes to S3 with MLFLOW_S3_ENDPOINT_URL.
Both check the objects landed in the bucket and that the model loads back from there. The direct
run also checks that the AWS keys in the client's environment appear nowhere in what was logged.
"""

from __future__ import annotations

import numpy as np
import pytest
from fixtures_mlflow import run_dcad
from fixtures_servers import BUCKET, CHECKSUMS, S3_CREDENTIALS, free_port, s3_client

from dcad.platform.storage import list_keys
from dcad.platform.mlflow_store import mlflow_client

pytestmark = pytest.mark.slow
SECRETS = [v for k, v in S3_CREDENTIALS.items() if k != "AWS_DEFAULT_REGION"]


def _clean_client_env(monkeypatch) -> None:
    for key in [*S3_CREDENTIALS, *CHECKSUMS, "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_TRACKING_URI"]:
        monkeypatch.delenv(key, raising=False)


def _log(capsys, trained, server_url: str, experiment: str) -> str:
    result = run_dcad(capsys, "log", str(trained.model_dir), "--experiment", experiment, "--tracking-uri", server_url)
    assert result.code == 0, result.err
    client = mlflow_client(server_url)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run.info.run_id


def _loads_back_and_scores(trained, server_url: str, model_uri: str) -> None:
    import mlflow.pyfunc
    import pandas as pd

    from dcad.core.data import load_image
    from dcad.core.model.model_dir import load_model
    from dcad.core.predict import predict_arrays

    image = sorted(trained.data.glob("*/test/*/*.png"))[0]
    mlflow.set_tracking_uri(server_url)
    served = mlflow.pyfunc.load_model(model_uri).predict(pd.DataFrame({"image": [image.read_bytes()]}))
    local = predict_arrays(load_model(trained.model_dir), [load_image(image)])
    np.testing.assert_allclose(served["score"].to_numpy(), local.scores, atol=1e-5)


def _expected_keys(prefix: str) -> set[str]:
    return {f"{prefix}MLmodel", f"{prefix}artifacts/model_dir/base/model.safetensors", f"{prefix}artifacts/model_dir/dcad_model.json"}


def test_proxied_artifacts_land_in_s3_without_client_credentials(proxied_server, moto_endpoint, trained, capsys, monkeypatch):
    _clean_client_env(monkeypatch)
    run_id = _log(capsys, trained, proxied_server.url, "s3-proxied")
    client = mlflow_client(proxied_server.url)
    run = client.get_run(run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    keys = set(list_keys(s3_client(moto_endpoint), BUCKET, "proxied/"))
    assert any(k.endswith(f"{run_id}/artifacts/report/heatmaps.png") for k in keys)
    assert any(k.endswith(f"{run_id}/artifacts/config.yaml") for k in keys)
    model_id = run.outputs.model_outputs[0].model_id
    model_prefix = next(k for k in keys if f"/models/{model_id}/artifacts/MLmodel" in k)[: -len("MLmodel")]
    assert _expected_keys(model_prefix) <= keys
    assert not any("checkpoints" in k for k in keys)
    _loads_back_and_scores(trained, proxied_server.url, f"models:/{model_id}")


def test_direct_artifacts_land_in_s3_and_secrets_stay_out(direct_server, moto_endpoint, trained, capsys, monkeypatch, tmp_path):
    _clean_client_env(monkeypatch)
    for key, value in {**S3_CREDENTIALS, "MLFLOW_S3_ENDPOINT_URL": moto_endpoint}.items():
        monkeypatch.setenv(key, value)
    run_id = _log(capsys, trained, direct_server.url, "s3-direct")
    client = mlflow_client(direct_server.url)
    run = client.get_run(run_id)
    assert run.info.artifact_uri.startswith(f"s3://{BUCKET}/direct/")
    keys = set(list_keys(s3_client(moto_endpoint), BUCKET, "direct/"))
    assert any(k.endswith(f"{run_id}/artifacts/report/roc.png") for k in keys)
    model_id = run.outputs.model_outputs[0].model_id
    model_prefix = next(k for k in keys if f"/models/{model_id}/artifacts/MLmodel" in k)[: -len("MLmodel")]
    assert _expected_keys(model_prefix) <= keys
    _loads_back_and_scores(trained, direct_server.url, f"models:/{model_id}")

    # Register and promote it too, so version tags are covered by the secret scan.
    promoted = run_dcad(capsys, "promote", "dcad-s3", "--run", run_id, "--data", str(trained.data),
                        "--tracking-uri", direct_server.url, "--device", "cpu")
    assert promoted.code == 0, promoted.err
    logged_text = [str(run.data.params), str(run.data.tags)]
    logged_text += [str(v.tags) for v in client.search_model_versions("name='dcad-s3'")]
    logged_text.append(str(client.get_registered_model("dcad-s3").tags))
    s3 = s3_client(moto_endpoint)
    blobs = [s3.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in list_keys(s3, BUCKET, "direct/")]
    for secret in SECRETS:
        assert all(secret not in text for text in logged_text), "a credential was logged as a param or tag"
        assert all(secret.encode() not in blob for blob in blobs), "a credential was written into an artifact"
        assert secret not in promoted.out + promoted.err


def test_s3_failures_are_one_clear_line_without_credentials(direct_server, trained, capsys, monkeypatch):
    _clean_client_env(monkeypatch)
    dead = f"http://127.0.0.1:{free_port()}"
    for key, value in {**S3_CREDENTIALS, "MLFLOW_S3_ENDPOINT_URL": dead}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    result = run_dcad(capsys, "log", str(trained.model_dir), "--experiment", "s3-dead", "--tracking-uri", direct_server.url)
    assert result.code == 2
    assert "failed" in result.err and len(result.err.strip().splitlines()) == 1
    for secret in SECRETS:
        assert secret not in result.err + result.out
