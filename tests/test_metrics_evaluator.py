"""AnomalyEvaluator behaviour: streaming, merging, categories, defect types, curves, inputs, errors."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, precision_recall_curve, roc_auc_score, roc_curve

from dcad.core.errors import DcadError, MetricsError
from dcad.core.metrics import DEFECT_METRIC_KEYS, METRIC_KEYS, AnomalyEvaluator, f1_max_threshold


def make_data(seed: int, size: int = 24, side: int = 24, defects=("crack", "hole")):
    """scores, labels, maps, masks, defect types: defects are squares the maps partly light up."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(size) < 0.5).astype(int)
    labels[:2] = (0, 1)
    masks = np.zeros((size, side, side), bool)
    kinds = np.array(["good"] * size, dtype=object)
    for index in np.flatnonzero(labels):
        top, left, extent = *rng.integers(0, side // 2, 2), rng.integers(2, side // 2)
        masks[index, top : top + extent, left : left + extent] = True
        kinds[index] = defects[index % len(defects)]
    maps = rng.normal(size=masks.shape) + masks * rng.uniform(0.5, 2.0)
    scores = maps.reshape(size, -1).max(axis=1)
    return scores, labels, maps, masks, kinds


def evaluate_in_batches(data, category_of, batch_size: int, evaluator=None, **settings) -> AnomalyEvaluator:
    evaluator = evaluator or AnomalyEvaluator(**settings)
    scores, labels, maps, masks, kinds = data
    for start in range(0, len(labels), batch_size):
        part = slice(start, start + batch_size)
        names = [category_of(i) for i in range(len(labels))[part]]
        evaluator.update(scores[part], labels[part], maps[part], masks[part], names, kinds[part])
    return evaluator


def assert_same_report(first: dict, second: dict, tolerance: float = 1e-12) -> None:
    assert first.keys() == second.keys()
    for key, value in first.items():
        if isinstance(value, dict):
            assert_same_report(value, second[key], tolerance)
        elif math.isnan(value):
            assert math.isnan(second[key]), key
        else:
            assert second[key] == pytest.approx(value, abs=tolerance), key


# ---- streaming, merging, state ---------------------------------------------------------------
def test_streaming_in_batches_equals_one_batch():
    data = make_data(0)
    whole = evaluate_in_batches(data, lambda i: "bottle", batch_size=len(data[1]))
    streamed = evaluate_in_batches(data, lambda i: "bottle", batch_size=5)
    assert_same_report(whole.compute(), streamed.compute())


def test_merge_equals_one_evaluator_over_all_data():
    data = make_data(1, size=30)
    category = lambda i: ("bottle", "carpet")[i % 2]  # noqa: E731
    whole = evaluate_in_batches(data, category, batch_size=4)
    half = len(data[1]) // 2
    first = evaluate_in_batches(tuple(d[:half] for d in data), category, batch_size=4)
    second = evaluate_in_batches(tuple(d[half:] for d in data), lambda i: category(i + half), batch_size=4)
    second_before = second.compute()
    first.merge(second)
    assert_same_report(whole.compute(), first.compute())
    assert_same_report(second_before, second.compute())  # merge leaves `other` unchanged


def test_state_dict_survives_pickling_and_merges_like_the_evaluator():
    data = make_data(2)
    evaluator = evaluate_in_batches(data, lambda i: "bottle", batch_size=6, track_defect_types=True)
    shipped = pickle.loads(pickle.dumps(evaluator.state_dict()))
    rebuilt = AnomalyEvaluator.from_state_dict(shipped)
    assert_same_report(evaluator.compute(), rebuilt.compute())
    empty = AnomalyEvaluator(track_defect_types=True)
    empty.merge(rebuilt)
    assert_same_report(evaluator.compute(), empty.compute())


def test_state_is_bounded_by_the_number_of_bins_not_pixels():
    evaluator = AnomalyEvaluator(num_bins=64)
    scores, labels, maps, masks, _ = make_data(3, size=12, side=64)  # 49k pixels >> 64 bins
    evaluator.update(scores, labels, maps, masks, "bottle")
    histogram = evaluator.state_dict()["categories"]["bottle"]["pixels"]["all"]
    assert len(histogram["normal"]) <= 64
    assert sum(histogram["normal"]) + sum(histogram["anomalous"]) == maps.size


# ---- categories and undefined cases ------------------------------------------------------------
def test_each_category_is_evaluated_alone_and_the_mean_is_unweighted():
    data = make_data(4, size=30)
    category = lambda i: "bottle" if i < 22 else "carpet"  # noqa: E731  (unequal sizes)
    report = evaluate_in_batches(data, category, batch_size=7).compute()
    for name, part in (("bottle", slice(0, 22)), ("carpet", slice(22, None))):
        alone = evaluate_in_batches(tuple(d[part] for d in data), lambda i: name, batch_size=7).compute()
        assert_same_report(alone["categories"][name], report["categories"][name])
    for key in METRIC_KEYS:
        expected = (report["categories"]["bottle"][key] + report["categories"]["carpet"][key]) / 2
        assert report["mean"][key] == pytest.approx(expected, abs=1e-12)


def test_category_without_anomalies_is_nan_and_left_out_of_the_mean():
    scores, labels, maps, masks, _ = make_data(5)
    evaluator = AnomalyEvaluator()
    evaluator.update(scores, labels, maps, masks, "bottle")
    normal = labels == 0
    evaluator.update(scores[normal], labels[normal], maps[normal], masks[normal], "carpet")
    report = evaluator.compute()
    assert all(math.isnan(value) for value in report["categories"]["carpet"].values())
    assert_same_report(report["categories"]["bottle"], report["mean"])


def test_category_without_normal_images_has_nan_image_metrics_only():
    scores, labels, maps, masks, _ = make_data(6)
    anomalous = labels == 1
    evaluator = AnomalyEvaluator()
    evaluator.update(scores[anomalous], labels[anomalous], maps[anomalous], masks[anomalous], "bottle")
    result = evaluator.compute()["categories"]["bottle"]
    assert all(math.isnan(result[key]) for key in ("image_auroc", "image_ap", "image_f1max"))
    assert 0.5 < result["pixel_auroc"] <= 1.0 and 0.0 < result["aupro"] <= 1.0


def test_empty_evaluator_reports_nan_means():
    report = AnomalyEvaluator().compute()
    assert report["categories"] == {} and all(math.isnan(v) for v in report["mean"].values())


# ---- defect types --------------------------------------------------------------------------
def test_defect_types_are_scored_against_the_categorys_good_images():
    data = make_data(7, size=30)
    scores, labels, maps, masks, kinds = data
    report = evaluate_in_batches(data, lambda i: "bottle", batch_size=8, track_defect_types=True).compute()
    assert set(report["defect_types"]["bottle"]) == {"crack", "hole"}
    for defect in ("crack", "hole"):
        chosen = np.array([kind in ("good", defect) for kind in kinds])
        subset = tuple(d[chosen] for d in data)
        alone = evaluate_in_batches(subset, lambda i: "bottle", batch_size=8).compute()["categories"]["bottle"]
        per_defect = report["defect_types"]["bottle"][defect]
        assert set(per_defect) == set(DEFECT_METRIC_KEYS)
        for key in DEFECT_METRIC_KEYS:
            assert per_defect[key] == pytest.approx(alone[key], abs=1e-12), (defect, key)
    plain = evaluate_in_batches(data, lambda i: "bottle", batch_size=8).compute()
    assert_same_report(plain["categories"], report["categories"])


# ---- curves and thresholds --------------------------------------------------------------------
def test_curves_match_sklearn_and_the_reported_areas():
    scores, labels, maps, masks, _ = make_data(8)
    evaluator = AnomalyEvaluator(fpr_limit=0.3)
    evaluator.update(scores, labels, maps, masks, "bottle")
    curves, result = evaluator.curves("bottle"), evaluator.compute()["categories"]["bottle"]
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(curves["image_roc"][0], fpr)
    np.testing.assert_allclose(curves["image_roc"][1], tpr)
    pixel_fpr, pixel_tpr = curves["pixel_roc"]
    assert np.trapezoid(pixel_tpr, pixel_fpr) == pytest.approx(result["pixel_auroc"], abs=1e-12)
    pro_fpr, pro = curves["pro"]
    assert pro_fpr[-1] == pytest.approx(0.3) and np.all(np.diff(pro_fpr) >= 0) and np.all(np.diff(pro) >= 0)
    assert np.trapezoid(pro, pro_fpr) / 0.3 == pytest.approx(result["aupro"], abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_f1_max_threshold_is_exact(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 60)
    scores = np.round(rng.normal(size=60) + labels, 1)  # with ties
    best, threshold = f1_max_threshold(torch.tensor(scores), labels)
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore"):
        assert best == pytest.approx(np.nanmax(2 * precision * recall / (precision + recall)), abs=1e-12)
    assert f1_score(labels, scores >= threshold) == pytest.approx(best, abs=1e-12)


def test_f1_max_threshold_without_anomalies_is_nan():
    best, threshold = f1_max_threshold([0.1, 0.4], [0, 0])
    assert math.isnan(best) and math.isnan(threshold)


# ---- inputs ------------------------------------------------------------------------------------
def test_torch_inputs_and_channel_dimension_give_the_same_result():
    scores, labels, maps, masks, _ = make_data(9)
    as_numpy = AnomalyEvaluator()
    as_numpy.update(scores.astype(np.float32), labels, maps.astype(np.float32), masks, "bottle")
    as_torch = AnomalyEvaluator()
    as_torch.update(
        torch.tensor(scores, dtype=torch.float32),
        torch.tensor(labels),
        torch.tensor(maps, dtype=torch.float32).unsqueeze(1),
        torch.tensor(masks, dtype=torch.uint8).unsqueeze(1) * 255,
        ["bottle"] * len(labels),
    )
    assert_same_report(as_numpy.compute(), as_torch.compute())
    assert roc_auc_score(labels, scores) == pytest.approx(as_torch.compute()["mean"]["image_auroc"], abs=1e-6)


BAD_UPDATES = {
    "labels": lambda s, l, m, k: (s, l[:-1], m, k, "c"),
    "masks": lambda s, l, m, k: (s, l, m, k[:, :-1], "c"),
    "anomaly_maps": lambda s, l, m, k: (s, l, np.where(k, np.nan, m), k, "c"),
    "image_scores": lambda s, l, m, k: (s.reshape(2, -1), l, m, k, "c"),
    "categories": lambda s, l, m, k: (s, l, m, k, ["c"]),
}


@pytest.mark.parametrize("argument", sorted(BAD_UPDATES))
def test_bad_input_names_the_argument(argument):
    scores, labels, maps, masks, _ = make_data(10, size=6)
    with pytest.raises(MetricsError, match=argument):
        AnomalyEvaluator().update(*BAD_UPDATES[argument](scores, labels, maps, masks))


def test_labels_must_be_binary_and_agree_with_masks():
    scores, labels, maps, masks, _ = make_data(11, size=6)
    with pytest.raises(MetricsError, match="labels: must be 0"):
        AnomalyEvaluator().update(scores, labels * 2, maps, masks, "c")
    with pytest.raises(MetricsError, match="label is 0"):
        AnomalyEvaluator().update(scores, np.zeros_like(labels), maps, masks, "c")


def test_misuse_gives_one_line_dcad_errors():
    scores, labels, maps, masks, _ = make_data(12, size=6)
    with pytest.raises(MetricsError, match="defect_types"):
        AnomalyEvaluator(track_defect_types=True).update(scores, labels, maps, masks, "c")
    with pytest.raises(MetricsError, match="num_bins"):
        AnomalyEvaluator().merge(AnomalyEvaluator(num_bins=1024))
    with pytest.raises(MetricsError, match="category 'screw'"):
        AnomalyEvaluator().curves("screw")
    with pytest.raises(DcadError, match="fpr_limit"):
        AnomalyEvaluator(fpr_limit=0.0)


def test_empty_batch_changes_nothing():
    scores, labels, maps, masks, _ = make_data(13, size=8)
    evaluator = AnomalyEvaluator()
    evaluator.update(scores, labels, maps, masks, "c")
    before = evaluator.compute()
    evaluator.update(scores[:0], labels[:0], maps[:0], masks[:0], [])
    assert_same_report(before, evaluator.compute())
