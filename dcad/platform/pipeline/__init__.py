"""Declarative end-to-end pipelines (`pipelines/*.yaml`): data → train or sweep → evaluate → register → gated promotion."""
