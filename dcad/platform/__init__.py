"""Ray, MLflow, S3 and the model registry."""
