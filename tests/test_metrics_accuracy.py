"""The binned, streaming metrics against exact references: scikit-learn and an exact AUPRO.

Run with `-s` to see the largest disagreement found (test_largest_disagreement_is_below_1e_3).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.measure import label as label_components
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from dcad.core.metrics import METRIC_KEYS, AnomalyEvaluator

TOLERANCE = 1e-3


# ---- exact references ------------------------------------------------------------------------
def sklearn_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    return float(np.nanmax(f1))


def exact_aupro(maps: list[np.ndarray], masks: list[np.ndarray], limit: float = 0.3) -> float:
    """Per-region TPR curves (8-connected components, scikit-image), averaged, against global FPR."""
    regions = []
    for image_map, image_mask in zip(maps, masks):
        components = label_components(image_mask, connectivity=2)
        regions += [np.sort(image_map[components == k]) for k in range(1, components.max() + 1)]
    normal = np.sort(np.concatenate([m[~k] for m, k in zip(maps, masks)]))
    all_scores = np.concatenate([m.ravel() for m in maps])
    thresholds = np.unique(all_scores)[::-1]  # descending; score >= t is anomalous

    def share_at_or_above(sorted_values: np.ndarray) -> np.ndarray:
        return (sorted_values.size - np.searchsorted(sorted_values, thresholds, side="left")) / sorted_values.size

    fpr = np.concatenate([[0.0], share_at_or_above(normal)])
    pro = np.concatenate([[0.0], np.mean([share_at_or_above(r) for r in regions], axis=0)])
    area = 0.0
    for i in range(1, fpr.size):  # walk the segments, cutting the one that crosses `limit`
        x0, x1, y0, y1 = fpr[i - 1], fpr[i], pro[i - 1], pro[i]
        if x1 >= limit:
            y_cut = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            return (area + (limit - x0) * (y0 + y_cut) / 2) / limit
        area += (x1 - x0) * (y0 + y1) / 2
    raise AssertionError("the FPR never reached the limit")


def reference_metrics(scores, labels, maps, masks) -> dict[str, float]:
    pixel_scores = np.concatenate([m.ravel() for m in maps])
    pixel_labels = np.concatenate([k.ravel() for k in masks])
    return {
        "image_auroc": roc_auc_score(labels, scores),
        "image_ap": average_precision_score(labels, scores),
        "image_f1max": sklearn_f1_max(labels, scores),
        "pixel_auroc": roc_auc_score(pixel_labels, pixel_scores),
        "pixel_ap": average_precision_score(pixel_labels, pixel_scores),
        "pixel_f1max": sklearn_f1_max(pixel_labels, pixel_scores),
        "aupro": exact_aupro(maps, masks),
    }


# ---- random data -------------------------------------------------------------------------------
def random_batches(seed: int, shapes: list[tuple[int, int, int]], quantum: float | None, offset: float = 0.0):
    """Batches (scores, labels, maps, masks) of blob-shaped defects with several regions of different sizes."""
    rng = np.random.default_rng(seed)
    batches = []
    for size, height, width in shapes:
        labels = rng.random(size) < 0.5
        masks = np.zeros((size, height, width), bool)
        for index in np.flatnonzero(labels):
            for _ in range(rng.integers(1, 4)):
                radius = rng.uniform(1, min(height, width) / 5)
                cy, cx = rng.uniform(0, height), rng.uniform(0, width)
                yy, xx = np.mgrid[:height, :width]
                masks[index] |= (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        noise = ndimage.gaussian_filter(rng.normal(size=masks.shape), sigma=(0, 1.5, 1.5))
        maps = offset + noise * 3 + rng.uniform(0.3, 1.5) * ndimage.gaussian_filter(masks * 1.0, sigma=(0, 1, 1))
        scores = maps.reshape(size, -1).max(axis=1) + rng.normal(scale=0.3, size=size)
        if quantum is not None:  # many exact ties
            maps, scores = np.round(maps / quantum) * quantum, np.round(scores / quantum) * quantum
        batches.append((scores, labels.astype(int), maps, masks))
    return batches


CASES = {
    "seed0-32px": (0, [(6, 32, 32)] * 4, None),
    "seed1-ties": (1, [(5, 40, 48)] * 3, 0.05),
    "seed2-mixed-sizes": (2, [(4, 24, 24), (7, 56, 40), (3, 64, 64)], None),
    "seed3-coarse-ties": (3, [(8, 32, 32)] * 2, 0.5),
    "seed4-large-offset": (4, [(6, 32, 32)] * 3, None),
}


def disagreements(case: str) -> dict[str, float]:
    seed, shapes, quantum = CASES[case]
    batches = random_batches(seed, shapes, quantum, offset=1e4 if "offset" in case else 0.0)
    evaluator = AnomalyEvaluator()
    for scores, labels, maps, masks in batches:
        evaluator.update(scores, labels, maps, masks, ["cat"] * len(labels))
    got = evaluator.compute()["categories"]["cat"]
    scores, labels = np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])
    maps = [m for b in batches for m in b[2]]
    masks = [k for b in batches for k in b[3]]
    expected = reference_metrics(scores, labels, maps, masks)
    return {key: abs(got[key] - expected[key]) for key in METRIC_KEYS}


@pytest.mark.parametrize("case", sorted(CASES))
def test_streamed_metrics_match_exact_references(case):
    diffs = disagreements(case)
    print(f"{case}: largest |diff| {max(diffs.values()):.2e} ({max(diffs, key=diffs.get)})")
    assert max(diffs.values()) <= TOLERANCE, diffs
    for key in ("image_auroc", "image_ap", "image_f1max"):  # image level is exact
        assert diffs[key] < 1e-12, (key, diffs[key])


def test_largest_disagreement_is_below_1e_3():
    largest = {key: max(disagreements(case)[key] for case in CASES) for key in METRIC_KEYS}
    print("\nlargest |binned - exact| over all cases:", {k: f"{v:.1e}" for k, v in largest.items()})
    assert max(largest.values()) <= TOLERANCE


# ---- hand-built cases with known answers -------------------------------------------------------
def evaluate(scores, labels, maps, masks, **settings) -> dict[str, float]:
    evaluator = AnomalyEvaluator(**settings)
    evaluator.update(np.asarray(scores, float), np.asarray(labels), maps, masks, "cat")
    return evaluator.compute()["categories"]["cat"]


def square_defects(size: int = 8, side: int = 32) -> tuple[np.ndarray, np.ndarray]:
    labels = np.arange(size) % 2
    masks = np.zeros((size, side, side), bool)
    for index in np.flatnonzero(labels):
        masks[index, 4 : 4 + index, 5 : 7 + 2 * index] = True  # regions of different sizes
    return labels, masks


def test_perfect_predictor_scores_one_everywhere():
    labels, masks = square_defects()
    maps = masks * 2.0 + np.random.default_rng(0).uniform(0, 1, masks.shape)
    result = evaluate(labels + 0.1, labels, maps, masks)
    assert result == pytest.approx({key: 1.0 for key in METRIC_KEYS}, abs=1e-12)


def test_inverted_predictor_is_not_flipped():
    labels, masks = square_defects()
    maps = -(masks * 2.0 + np.random.default_rng(1).uniform(0, 1, masks.shape))
    result = evaluate(-labels, labels, maps, masks)
    assert result["image_auroc"] == pytest.approx(0.0, abs=1e-12)
    assert result["pixel_auroc"] == pytest.approx(0.0, abs=1e-12)
    assert result["aupro"] == pytest.approx(0.0, abs=1e-12)


def test_constant_predictor_has_chance_values():
    labels, masks = square_defects()
    positive_share = masks.mean()
    result = evaluate(np.zeros(labels.size), labels, np.full(masks.shape, 0.7), masks)
    assert result["image_auroc"] == pytest.approx(0.5, abs=1e-12)
    assert result["pixel_auroc"] == pytest.approx(0.5, abs=1e-12)
    assert result["aupro"] == pytest.approx(0.15, abs=1e-12)  # PRO = FPR: 0.3**2 / 2 / 0.3
    assert result["image_ap"] == pytest.approx(labels.mean(), abs=1e-12)
    assert result["pixel_ap"] == pytest.approx(positive_share, abs=1e-12)
    assert result["pixel_f1max"] == pytest.approx(2 * positive_share / (1 + positive_share), abs=1e-12)


def test_random_predictor_is_near_chance():
    rng = np.random.default_rng(7)
    labels, masks = square_defects(size=40, side=64)
    result = evaluate(rng.random(labels.size), labels, rng.random(masks.shape), masks)
    assert result["pixel_auroc"] == pytest.approx(0.5, abs=0.01)
    assert result["aupro"] == pytest.approx(0.15, abs=0.01)


def three_regions_image() -> np.ndarray:
    mask = np.zeros((1, 64, 64), bool)
    mask[0, 2:22, 2:22] = True  # 400 pixels
    mask[0, 40:50, 40:50] = True  # 100 pixels
    mask[0, 30:32, 5:7] = True  # 4 pixels
    return mask


def test_pro_weights_regions_equally_not_pixels():
    masks = three_regions_image()
    maps = np.zeros(masks.shape)
    maps[0, 30:32, 5:7] = 1.0  # only the 4-pixel region is found
    result = evaluate([1.0], [1], maps, masks)
    # PRO jumps to 1/3 at FPR 0, then rises linearly to 1 at FPR 1: mean height over [0, 0.3].
    assert result["aupro"] == pytest.approx((1 / 3 + (1 / 3 + 2 / 3 * 0.3)) / 2, abs=1e-12)
    found = 4 / masks.sum()
    assert result["pixel_auroc"] == pytest.approx((found + 1) / 2, abs=1e-12)


def test_regions_are_8_connected():
    masks = np.zeros((1, 16, 16), bool)
    masks[0, 2, 2] = masks[0, 3, 3] = True  # touch at a corner: one region of 2 pixels
    masks[0, 8:12, 8:12] = True
    maps = np.zeros(masks.shape)
    maps[0, 2, 2] = 1.0
    result = evaluate([1.0], [1], maps, masks)
    # 8-connected: PRO jumps to (1/2 + 0) / 2 = 1/4 (4-connectivity would give 1/3).
    assert result["aupro"] == pytest.approx((0.25 + (0.25 + 0.75 * 0.3)) / 2, abs=1e-12)


def test_aupro_interpolates_exactly_at_the_fpr_limit():
    masks = three_regions_image()
    maps = np.random.default_rng(3).random(masks.shape) + masks * 0.5
    for limit in (0.05, 0.3, 1.0):
        result = evaluate([1.0], [1], maps, masks, fpr_limit=limit)
        assert result["aupro"] == pytest.approx(exact_aupro(list(maps), list(masks), limit), abs=TOLERANCE)
