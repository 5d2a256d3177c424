"""The generic training loop: exact resume, schedule, clipping, callbacks, checkpoints, distributed shards."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dcad.core.config import StageTrainConfig
from dcad.core.errors import DcadError, ModelError
from dcad.train.checkpoint import load_checkpoint, save_checkpoint
from dcad.train.loop import derive_seed, fit_stage, warmup_cosine


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class ToyStage:
    """Regression with dropout and generator noise, so resume must restore data order and every RNG."""

    name = "toy"

    def __init__(self, model_seed: int = 0, n: int = 37, loss_scale: float = 1.0) -> None:
        torch.manual_seed(model_seed)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))
        g = torch.Generator().manual_seed(123)
        x = torch.randn(n, 4, generator=g)
        self.data = torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True).sin())
        self.loss_scale = loss_scale
        self.seen: list[torch.Tensor] = []
        self.validations = 0

    def module(self) -> nn.Module:
        return self.net

    def dataset(self):
        return self.data

    def loss(self, module, batch, generator):
        x, y = batch
        self.seen.append(x)
        noise = torch.randn(x.shape, generator=generator, device=generator.device) * 0.1
        return F.mse_loss(module(x + noise), y) * self.loss_scale

    def validate(self, module):
        self.validations += 1
        assert not module.training
        return {"val_metric": float(self.validations)}


CFG = StageTrainConfig(epochs=4, iters_per_epoch=7, batch_size=8, lr=1e-2, warmup_iters=5, grad_clip=1.0)
CPU = torch.device("cpu")


def weights(stage: ToyStage) -> list[torch.Tensor]:
    return [t.detach().clone() for t in stage.net.state_dict().values()]


def test_resume_from_disk_gives_identical_weights(tmp_path):
    straight = ToyStage()
    final_straight = fit_stage(straight, CFG, CPU, seed=7)

    first = ToyStage()

    def save_at_two(report):
        if report.epoch == 2:
            save_checkpoint(report.checkpoint(), tmp_path / "ckpt.pt")

    fit_stage(first, CFG, CPU, seed=7, on_epoch=save_at_two)
    state = load_checkpoint(tmp_path / "ckpt.pt")
    assert state["stage"] == "toy" and state["epoch"] == 2
    resumed = ToyStage(model_seed=99)  # different init: everything must come from the checkpoint
    final_resumed = fit_stage(resumed, CFG, CPU, seed=7, resume=state)
    assert final_resumed["epoch"] == CFG.epochs
    assert all(torch.equal(a, b) for a, b in zip(weights(straight), weights(resumed)))
    step_a = final_straight["optimizer"]["state"][0]["exp_avg"]
    assert torch.equal(step_a, final_resumed["optimizer"]["state"][0]["exp_avg"])
    # the batches of epochs 3–4 were the same ones, in the same order
    tail = CFG.iters_per_epoch * 2
    assert all(torch.equal(a, b) for a, b in zip(straight.seen[-tail:], resumed.seen))
    other = ToyStage()
    fit_stage(other, CFG, CPU, seed=8)
    assert not all(torch.equal(a, b) for a, b in zip(weights(straight), weights(other)))


def test_snapshot_does_not_change_as_training_continues():
    stage, snapshots = ToyStage(), []
    fit_stage(stage, CFG, CPU, seed=1, on_epoch=lambda r: snapshots.append(r.checkpoint()))
    assert [s["epoch"] for s in snapshots] == [1, 2, 3, 4]
    first, last = snapshots[0]["model"], snapshots[-1]["model"]
    assert not torch.equal(first["0.weight"], last["0.weight"])
    assert torch.equal(last["0.weight"], stage.net.state_dict()["0.weight"])
    assert snapshots[1]["metrics"]["val_metric"] == 2.0


def reference_warmup_cosine(step: int, warmup: int, total: int) -> float:
    """The LR factor the loop computed by hand before it used torch's schedulers."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))


@pytest.mark.parametrize("warmup, total", [(10, 100), (0, 100), (1, 10), (5, 28), (20, 4500), (3, 3)])
def test_warmup_cosine_gives_the_same_lr_per_step_as_before(warmup, total):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-3)
    schedule = warmup_cosine(opt, warmup, total)
    for step in range(total + 1):
        assert schedule.get_last_lr()[0] == pytest.approx(3e-3 * reference_warmup_cosine(step, warmup, total), abs=1e-15)
        opt.step()
        schedule.step()


def test_warmup_cosine_shape():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule, factors = warmup_cosine(opt, 10, 100), []
    for _ in range(101):
        factors.append(schedule.get_last_lr()[0])
        opt.step()
        schedule.step()
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(b > a for a, b in zip(factors[:9], factors[1:10]))  # linear ramp
    assert all(b < a for a, b in zip(factors[10:-2], factors[11:-1]))  # cosine decay
    assert factors[55] == pytest.approx(0.5, abs=1e-9)  # half-way through the decay
    assert factors[100] == pytest.approx(0.0, abs=1e-12)


def test_loop_follows_the_schedule_and_calls_back_once_per_epoch():
    stage, reports, steps = ToyStage(), [], []
    fit_stage(stage, CFG, CPU, seed=0, on_epoch=reports.append, on_step=lambda e, s, loss: steps.append((e, s, loss)))
    assert [r.epoch for r in reports] == [1, 2, 3, 4] and all(r.epochs == 4 for r in reports)
    assert stage.validations == 4
    assert len(steps) == CFG.epochs * CFG.iters_per_epoch == len(stage.seen)
    assert steps[0][:2] == (1, 1) and steps[-1][:2] == (4, 7)
    total = CFG.epochs * CFG.iters_per_epoch
    for r in reports:
        expected = CFG.lr * reference_warmup_cosine(r.epoch * CFG.iters_per_epoch, CFG.warmup_iters, total)
        assert r.metrics["lr"] == pytest.approx(expected)
        epoch_losses = [loss for e, _, loss in steps if e == r.epoch]
        assert r.metrics["train_loss"] == pytest.approx(sum(epoch_losses) / len(epoch_losses))
    # every batch is full (37 items cycle through 8-item batches), drawn from the stage's data
    assert all(x.shape == (8, 4) for x in stage.seen)


def test_gradient_clipping_is_applied():
    def last_grad_norm(clip: float) -> float:
        stage = ToyStage(loss_scale=1e4)
        fit_stage(stage, CFG.model_copy(update={"grad_clip": clip, "epochs": 1, "iters_per_epoch": 2}), CPU, seed=0)
        return math.sqrt(sum(float(p.grad.pow(2).sum()) for p in stage.net.parameters()))

    assert last_grad_norm(0.0) > 10.0
    assert last_grad_norm(0.5) <= 0.5 + 1e-5


def test_non_finite_loss_is_a_clear_error():
    stage = ToyStage(loss_scale=float("nan"))
    with pytest.raises(DcadError, match=r"stage 'toy': loss became nan at epoch 1, step 1"):
        fit_stage(stage, CFG, CPU, seed=0)


def test_checkpoint_files_are_atomic_and_validated(tmp_path):
    path = tmp_path / "sub" / "state.pt"
    stage = ToyStage()
    state = fit_stage(stage, CFG.model_copy(update={"epochs": 1, "iters_per_epoch": 1}), CPU, seed=0)
    save_checkpoint(state, path)
    save_checkpoint(state, path)  # overwrite in place
    assert os.listdir(path.parent) == ["state.pt"]
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["0.weight"], state["model"]["0.weight"])
    assert loaded["config"]["batch_size"] == CFG.batch_size

    with pytest.raises(ModelError, match="nothing.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "nothing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage")
    with pytest.raises(ModelError, match="corrupt.pt: not a readable dcad checkpoint"):
        load_checkpoint(corrupt)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(ModelError, match="foreign.pt: not a dcad training checkpoint"):
        load_checkpoint(foreign)
    pickled = tmp_path / "pickled.pt"
    torch.save({"stage": ToyStage}, pickled)  # arbitrary objects are refused by weights-only loading
    with pytest.raises(ModelError, match="pickled.pt: not a readable dcad checkpoint"):
        load_checkpoint(pickled)
    with pytest.raises(ModelError, match="cannot resume stage 'toy' from a checkpoint of stage 'base'"):
        fit_stage(ToyStage(), CFG, CPU, seed=0, resume={**state, "stage": "base"})


def test_derive_seed_is_stable_and_distinguishes_parts():
    assert derive_seed(1, "base", 0) == derive_seed(1, "base", 0)
    seeds = {derive_seed(1, "base", 0), derive_seed(1, "base", 1), derive_seed(1, "toy", 0), derive_seed(2, "base", 0)}
    assert len(seeds) == 4
    assert 0 <= derive_seed(5, "x") < 2**63


# ---- two processes with gloo: shards, DDP and identical weights on every rank -----------------------------
def _distributed_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        stage = ToyStage(n=32)
        cfg = CFG.model_copy(update={"epochs": 2, "iters_per_epoch": 2, "batch_size": 8})
        state = fit_stage(stage, cfg, CPU, seed=3, wrap_module=DistributedDataParallel)
        torch.save({"seen": stage.seen, "model": state["model"]}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_distributed_ranks_see_different_shards_and_agree(tmp_path):
    torch.multiprocessing.spawn(_distributed_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert set(ranks[0]["model"]) == set(ToyStage().net.state_dict())  # no DDP "module." prefix
    assert all(torch.equal(ranks[0]["model"][k], ranks[1]["model"][k]) for k in ranks[0]["model"])
    first_batches = [torch.cat(r["seen"][:2]) for r in ranks]  # epoch 1: 2 steps × 8 = this rank's 16-item shard
    rows = lambda t: {tuple(row.tolist()) for row in t}  # noqa: E731
    assert len(rows(first_batches[0]) | rows(first_batches[1])) == 32
