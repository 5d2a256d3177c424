"""Benchmarks of dcad: `python -m bench` runs the method suite (DRDC against baselines, quality and speed).

The older single-purpose scripts stay runnable as files (`python bench/metrics_memory.py`,
`python bench/ray_train_throughput.py`). See `bench/README.md`.
"""
