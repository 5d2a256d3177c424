"""Leak-free, bounded-memory anomaly-detection metrics (pure numpy/scipy).

Keys (values in [0, 1], per category and as the unweighted mean over categories): image_auroc,
pixel_auroc, aupro, image_ap, pixel_ap, image_f1max, pixel_f1max. Image-level metrics are exact;
pixel-level ones come from per-category histograms whose range grows with the scores, so memory
does not depend on the number of maps. See `evaluator` for undefined cases (nan).

    evaluator = AnomalyEvaluator()
    for batch in loader:
        evaluator.update(scores, labels, maps, masks, categories)
    report = evaluator.compute()   # {"categories": {cat: {key: v}}, "mean": {key: v}}
"""

from dcad.core.metrics.evaluator import (
    DEFAULT_NUM_BINS,
    DEFECT_METRIC_KEYS,
    METRIC_KEYS,
    AnomalyEvaluator,
)
from dcad.core.metrics.scoring import f1_max_threshold

__all__ = ["AnomalyEvaluator", "DEFAULT_NUM_BINS", "DEFECT_METRIC_KEYS", "METRIC_KEYS", "f1_max_threshold"]
