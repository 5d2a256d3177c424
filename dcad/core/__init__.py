"""Model, data and metrics: pure torch/numpy. Nothing here imports Ray, MLflow or the CLI."""
