"""anomalib's PaDiM, PatchCore and STFPM in the benchmark (`bench/methods/anomalib_models.py`): the backbone they
load is dcad's, tensor for tensor, and on a tiny synthetic dataset all three separate anomalous from good images."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `bench` is a folder of the repository, not an installed package
    sys.path.insert(0, str(REPO))

from sklearn.metrics import roc_auc_score  # noqa: E402

from bench.__main__ import main  # noqa: E402
from bench.methods import MethodOptions, build_methods  # noqa: E402
from bench.methods.anomalib_backbone import check_same_weights, local_backbone  # noqa: E402
from bench.methods.base import FitData  # noqa: E402
from bench.suite_data import SynthSpec, prepare  # noqa: E402
from dcad.core.config import load_config  # noqa: E402
from dcad.core.errors import WeightsError  # noqa: E402
from dcad.core.model.backbone import FeatureExtractor  # noqa: E402

CATEGORIES = ("brick", "hex_nut")
ANOMALIB = ("anomalib_padim", "anomalib_patchcore", "anomalib_stfpm")
STFPM_ITERATIONS = 40  # ~0.2 s each at 64 px on one thread


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny", None, ["train.seed=0"])


def test_anomalib_models_load_dcads_backbone_tensor_for_tensor(cfg, tmp_path):
    from bench.methods.anomalib_models import PadimModel, PatchcoreModel, STFPMModel  # (quiets anomalib's imports)
    from anomalib.models.components import TimmFeatureExtractor

    reference = FeatureExtractor(cfg.backbone, cfg.data.image_size)
    backbone, layers = local_backbone(cfg.backbone, tmp_path), list(cfg.backbone.out_indices)
    assert backbone.startswith("local-dir:") and (Path(backbone.partition(":")[2]) / "model.safetensors").is_file()
    n_ref = len(reference.model.state_dict())
    padim = PadimModel(backbone=backbone, layers=layers, n_features=50)
    patchcore = PatchcoreModel(layers=layers, backbone=backbone)
    stfpm = STFPMModel(layers=layers, backbone=backbone)
    for loaded in (padim.feature_extractor, patchcore.feature_extractor, stfpm.teacher_model):
        assert check_same_weights(loaded.feature_extractor, reference.model, "test") == n_ref
        assert set(loaded.feature_extractor.state_dict()) == set(reference.model.state_dict())
    # the same features, not only the same tensors (anomalib builds timm's model with exportable=True)
    x = (torch.rand(2, 3, cfg.data.image_size, cfg.data.image_size) - reference.mean) / reference.std
    for ours, theirs in zip(reference.model(x), padim.feature_extractor(x).values()):
        assert torch.equal(ours, theirs)
    # random weights are caught: STFPM's student, and an extractor built without pretrained weights
    with pytest.raises(WeightsError, match="differ"):
        check_same_weights(stfpm.student_model.feature_extractor, reference.model, "student")
    with pytest.raises(WeightsError, match="differ"):
        random = TimmFeatureExtractor(backbone, layers=layers, pre_trained=False)
        check_same_weights(random.feature_extractor, reference.model, "random")
    with pytest.raises(WeightsError, match="random"):
        local_backbone(cfg.backbone.model_copy(update={"weights": "none"}), tmp_path)


def test_missing_anomalib_is_one_line_naming_the_package(monkeypatch, tmp_path, capsys):
    for name in ["anomalib", *(m for m in sys.modules if m.startswith("anomalib."))]:
        monkeypatch.setitem(sys.modules, name, None)  # `import anomalib…` now fails as if not installed
    monkeypatch.delitem(sys.modules, "bench.methods.anomalib_models", raising=False)
    assert main(["--seeds", "0", "--methods", "autoencoder,anomalib_stfpm", "--out", str(tmp_path / "out"),
                 "--cache", str(tmp_path / "data"), "--categories", "brick", "--train", "2", "--test", "2",
                 "--stfpm-iters", "1", "--no-readme"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'anomalib'" in err and "anomalib_stfpm" in err
    assert not (tmp_path / "data").exists()  # it fails before synthesising anything


@pytest.fixture(scope="module")
def scored(cfg, tmp_path_factory):
    """Image scores of the anomalib methods on the test split of a tiny two-category dataset."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("anomalib")
    data = prepare(root / "data", SynthSpec(cfg.data.image_size, 16, 12, CATEGORIES), 0, cfg)
    fit = FitData(cfg, data.train.images, data.train.categories, data.splits.categories, data.splits.val,
                  data.splits)
    scores = {}
    for method in build_methods(list(ANOMALIB), MethodOptions(stfpm_iterations=STFPM_ITERATIONS)):
        method.weights_cache = root / "weights"
        method.fit(fit)
        s, maps = method.predict(data.test.images, data.test.categories)
        assert s.shape == (len(data.test),) and maps.shape == (len(data.test), *data.test.images.shape[-2:])
        assert maps.dtype == torch.float32 and torch.isfinite(maps).all() and torch.isfinite(s).all()
        scores[method.name] = s
    rows = {c: [i for i, name in enumerate(data.test.categories) if name == c] for c in CATEGORIES}
    return scores, data.test.labels, rows


@pytest.mark.slow
def test_every_anomalib_method_separates_anomalous_images(scored):
    scores, labels, rows = scored
    for name in ANOMALIB:
        aurocs = [roc_auc_score(labels[r].numpy(), scores[name][r].numpy()) for r in rows.values()]
        assert min(aurocs) >= 0.7 and sum(aurocs) / len(aurocs) >= 0.8, (name, aurocs)
