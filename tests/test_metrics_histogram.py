"""The growing pixel histogram: bounded size, order independence, exact merges, robustness of range."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from dcad.core.metrics import AnomalyEvaluator
from dcad.core.metrics.histogram import PixelHistogram
from dcad.core.metrics.regions import region_weights


def pixel_batches(seed: int, spreads: list[float], size: int = 4, side: int = 32):
    """Batches of maps whose score range changes from batch to batch (spread 0 = constant map)."""
    rng = np.random.default_rng(seed)
    batches = []
    for spread in spreads:
        masks = np.zeros((size, side, side), bool)
        masks[1:, 5:12, 6:15] = True
        masks[2:, 20:23, 20:30] = True
        maps = spread * (rng.normal(size=masks.shape) + masks * 1.2)
        batches.append((maps, masks))
    return batches


def histogram_of(batches, max_bins: int = 2**10) -> PixelHistogram:
    histogram = PixelHistogram(max_bins)
    for maps, masks in batches:
        weights, n_regions = region_weights(masks)
        histogram.add(maps, masks, weights, n_regions)
    return histogram


def assert_same_histogram(first: PixelHistogram, second: PixelHistogram) -> None:
    assert first.exponent == second.exponent
    for name in ("index", "normal", "anomalous"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
    np.testing.assert_allclose(first.region_weight, second.region_weight, rtol=1e-12)
    assert first.n_regions == second.n_regions


SPREADS = [0.0, 1e-3, 0.5, 40.0, 2.0]  # a constant map first, then narrow, then wide ranges


def test_size_stays_bounded_and_counts_are_conserved():
    batches = pixel_batches(0, SPREADS * 3)
    histogram = histogram_of(batches, max_bins=256)
    assert 128 < histogram.index.size <= 256  # as fine as the bound allows, no finer
    assert np.all(np.diff(histogram.index) > 0)
    pixels = sum(maps.size for maps, _ in batches)
    anomalous = sum(int(masks.sum()) for _, masks in batches)
    assert histogram.normal.sum() + histogram.anomalous.sum() == pixels
    assert histogram.anomalous.sum() == anomalous
    assert histogram.region_weight.sum() == pytest.approx(histogram.n_regions)


def test_batch_order_does_not_change_the_histogram():
    batches = pixel_batches(1, SPREADS)
    assert_same_histogram(histogram_of(batches), histogram_of(batches[::-1]))
    assert_same_histogram(histogram_of(batches), histogram_of([batches[2], batches[0], *batches[3:], batches[1]]))


def test_merge_of_histograms_with_different_widths_equals_one_histogram():
    batches = pixel_batches(2, SPREADS)
    narrow, wide = histogram_of(batches[:2]), histogram_of(batches[2:])
    assert narrow.exponent < wide.exponent
    narrow.merge(wide)
    assert_same_histogram(histogram_of(batches), narrow)


def test_range_growth_keeps_sklearn_agreement():
    batches = pixel_batches(3, SPREADS)
    evaluator = AnomalyEvaluator()
    for maps, masks in batches:
        labels = masks.any(axis=(1, 2)).astype(int)
        evaluator.update(labels * 1.0, labels, maps, masks, "c")
    result = evaluator.compute()["categories"]["c"]
    scores = np.concatenate([maps.ravel() for maps, _ in batches])
    truth = np.concatenate([masks.ravel() for _, masks in batches])
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(truth, scores), abs=1e-3)
    assert result["pixel_ap"] == pytest.approx(average_precision_score(truth, scores), abs=1e-3)


@pytest.mark.parametrize("outlier", [1e3, 1e6, -1e6])
def test_a_far_outlier_does_not_coarsen_the_other_bins(outlier):
    maps, masks = pixel_batches(4, [1.0], size=8)[0]
    maps[0, 0, 0] = outlier  # on a normal pixel
    evaluator = AnomalyEvaluator()
    labels = masks.any(axis=(1, 2)).astype(int)
    evaluator.update(labels * 1.0, labels, maps, masks, "c")
    result = evaluator.compute()["categories"]["c"]
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-4)
    assert result["pixel_ap"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()), abs=1e-4)


def test_few_distinct_scores_are_kept_exactly():
    maps, masks = pixel_batches(5, [1.0], size=6)[0]
    maps = np.round(maps * 4) / 4 + 1000.0  # about 30 distinct values, far from zero
    histogram = histogram_of([(maps, masks)])
    np.testing.assert_array_equal(histogram.lower_edges(), np.unique(maps))
