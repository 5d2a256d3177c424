"""Training loops and checkpoints (no Ray, no MLflow)."""
