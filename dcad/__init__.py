"""dcad: multi-class industrial anomaly detection (DRDC) as distributed experiments."""

__version__ = "0.1.0"
