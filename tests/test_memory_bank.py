"""`base.map: memory`: the patch memory's coreset and distances, its place in the model directory, training
and shared stages."""

import warnings

import pytest
import torch

from dcad.core.config import ConfigError, MemoryConfig, load_config
from dcad.core.data import CATEGORIES, build_splits, synthesize
from dcad.core.errors import ModelError
from dcad.core.model.drdc import DRDC
from dcad.core.model.memory_bank import PatchMemory, greedy_coreset
from dcad.core.model.model_dir import load_model, save_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")
MEMORY = ["base.map=memory", "train.refiner.epochs=1", "train.refiner.iters_per_epoch=3"]


def test_the_greedy_coreset_takes_one_patch_from_each_far_cluster_first():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0], [100.0, 100.0]])
    points = torch.cat([c + torch.randn(50, 2, generator=g) for c in centres])
    chosen = greedy_coreset(points, 4, projection_dim=0)
    assert sorted((chosen // 50).tolist()) == [0, 1, 2, 3]
    assert torch.equal(greedy_coreset(points, 500), torch.arange(200))


def test_distances_are_to_the_nearest_kept_patch_of_the_images_own_category():
    memory = PatchMemory(MemoryConfig(stride=4, coreset_ratio=1.0), channels=3, image_size=16)
    g = torch.Generator().manual_seed(0)
    normal = torch.rand(2, 3, 4, 4, generator=g)
    memory.add_category(0, normal)
    memory.add_category(1, normal + 10.0)
    assert memory.bank.shape == (64, 3) and memory.bank_category.tolist() == [0] * 32 + [1] * 32
    assert torch.allclose(memory.distance_map(normal, torch.tensor([0, 0])), torch.zeros(2, 1, 4, 4), atol=1e-3)
    query = torch.rand(1, 3, 4, 4, generator=g) * 3
    patches = normal.permute(0, 2, 3, 1).reshape(-1, 3)
    expected = torch.cdist(query.permute(0, 2, 3, 1).reshape(-1, 3), patches).amin(dim=1).reshape(1, 1, 4, 4)
    assert torch.allclose(memory.distance_map(query, torch.tensor([0])), expected, atol=1e-4)
    far = memory.distance_map(normal[:1], torch.tensor([1]))  # category 1's patches only: all ~10·√3 away
    assert far.min() > 15.0
    memory.add_category(1, normal)  # replaces category 1's patches
    assert len(memory.bank) == 64 and memory.distance_map(normal[:1], torch.tensor([1])).max() < 1e-2
    with pytest.raises(ModelError, match="no patch of category 2"):
        memory.distance_map(normal[:1], torch.tensor([2]))


def test_a_stored_bank_of_any_length_loads_strictly_but_not_one_of_other_channels():
    fitted = PatchMemory(MemoryConfig(coreset_ratio=0.5), channels=3, image_size=16)
    fitted.add_category(0, torch.rand(1, 3, 4, 4))
    fresh = PatchMemory(MemoryConfig(coreset_ratio=0.5), channels=3, image_size=16)
    fresh.load_state_dict(fitted.state_dict(), strict=True)
    assert torch.equal(fresh.bank, fitted.bank) and len(fresh.bank) == 8
    with pytest.raises(RuntimeError, match="size mismatch"):
        PatchMemory(MemoryConfig(), channels=5, image_size=16).load_state_dict(fitted.state_dict())


def test_memory_settings_are_checked():
    with pytest.raises(ConfigError, match="pool"):
        load_config("tiny", overrides=["base.map=memory", "base.memory.pool=2"])
    with pytest.raises(ConfigError, match="base.memory.stride"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            DRDC(load_config("tiny", overrides=["base.map=memory", "base.memory.stride=5"]), ["a"])
    assert load_config("tiny", overrides=["base.map=memory"]).base_epochs == 0
    assert load_config("tiny").base_epochs == load_config("tiny").train.base.epochs


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory") / "data"
    synthesize(root, seed=0, size=64, categories=CATEGORIES[:2], n_train=12, n_test=4)
    return build_splits(root, load_config("tiny").data)


def test_a_memory_model_trains_without_the_transformer_and_round_trips(tmp_path, splits):
    from dcad.train.pipeline import TrainHooks, train_drdc

    cfg = load_config("tiny", overrides=MEMORY)
    hooks = TrainHooks()
    model, val = train_drdc(cfg, splits, device=torch.device("cpu"), hooks=hooks)
    assert {h["stage"] for h in hooks.history} == {"refiner"} and val["val_image_auroc"] >= 0.0
    assert model.base is None  # no transformer is built, trained or saved
    assert sorted(set(model.memory.bank_category.tolist())) == [0, 1]
    images = torch.stack([splits.test[i]["image"] for i in range(4)])
    cats = torch.tensor([splits.test[i]["category_index"] for i in range(4)])
    save_model(model, tmp_path / "m")
    assert (tmp_path / "m" / "memory" / "model.safetensors").is_file() and not (tmp_path / "m" / "base").exists()
    loaded = load_model(tmp_path / "m")
    passes = []
    hook = loaded.backbone.model.register_forward_hook(lambda *_: passes.append(1))
    predicted = loaded(images, cats)
    hook.remove()
    assert torch.equal(model(images, cats).anomaly_map, predicted.anomaly_map)
    assert len(passes) == 1  # the memory's stages and the category features come from one backbone pass
    assert torch.equal(predicted.base_map, loaded.base_map(images, loaded.backbone(images), cats))
    reconstruction = DRDC(load_config("tiny"), splits.categories)
    assert reconstruction.memory is None  # and its base map is the transformer's, which the memory model ignores
    (tmp_path / "m" / "config.yaml").write_text(reconstruction.cfg.to_yaml())
    with pytest.raises(ModelError, match="component base has no readable config.json"):
        load_model(tmp_path / "m")


def test_a_shared_base_stage_carries_the_memory(splits):
    from dcad.train.pipeline import StageStart, train_base, train_drdc

    cfg = load_config("tiny", overrides=MEMORY)
    shared = train_base(cfg, splits, device=torch.device("cpu"))
    assert shared.memory is not None and len(shared.memory["bank"]) > 0
    model, _ = train_drdc(cfg, splits, device=torch.device("cpu"), start=StageStart(base=shared))
    assert torch.equal(model.memory.bank, shared.memory["bank"]) and shared.base is None
    reconstruction = load_config("tiny", overrides=MEMORY[1:])
    with pytest.raises(ModelError, match="no base transformer"):
        train_drdc(reconstruction, splits, device=torch.device("cpu"), start=StageStart(base=shared))
    shared.memory = None
    with pytest.raises(ModelError, match="no patch memory"):
        train_drdc(cfg, splits, device=torch.device("cpu"), start=StageStart(base=shared))
