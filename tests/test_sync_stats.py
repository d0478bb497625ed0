"""sync_running_stats: the mixture of the ranks' statistics (float64 reference), rank zero's bit for bit, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bn_lightning as B
from bn_lightning.sync_stats import running_stat_layers, sync_running_stats
from tests.helpers.ddp import run_distributed

KEYS = ("running_mean", "running_var", "num_batches_tracked")


def _model() -> nn.Module:
    """Every kind of layer: torch's, ours (plain, sync, ghost, renorm), float64, untracked and frozen ones."""
    return nn.ModuleDict(
        {
            "torch1d": nn.BatchNorm1d(3),
            "torch2d": nn.BatchNorm2d(5, affine=False),
            "ours2d": B.BatchNorm2d(4),
            "sync": B.SyncBatchNorm(6),
            "ghost": B.GhostBatchNorm2d(2, virtual_batch_size=4),
            "renorm": B.BatchRenorm1d(3),
            "f64": nn.BatchNorm1d(2, dtype=torch.float64),
            "untracked": nn.BatchNorm1d(3, track_running_stats=False),
            "frozen": B.FrozenBatchNorm2d(3),
        }
    )


def _fill(model: nn.Module, seed: int) -> None:
    """Rank-dependent running statistics (and counters), far from zero so that a wrong formula shows."""
    g = torch.Generator().manual_seed(seed)
    for layer in running_stat_layers(model).values():
        c = layer.num_features
        layer.running_mean.copy_(torch.randn(c, generator=g, dtype=torch.float64) * 3 + 10 * (seed + 1))
        layer.running_var.copy_(torch.rand(c, generator=g, dtype=torch.float64) * 2 + 0.5)
        layer.num_batches_tracked.fill_(7 + 5 * seed)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_one_process_changes_nothing_and_names_the_layers() -> None:
    model = _model()
    _fill(model, 3)
    before = _state(model)
    names = sync_running_stats(model)
    assert names == ["torch1d", "torch2d", "ours2d", "sync", "ghost", "renorm", "f64"]
    assert B.sync_running_stats is sync_running_stats
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bad_reduce() -> None:
    with pytest.raises(ValueError, match=r"sync_running_stats: reduce must be one of \('mean', 'broadcast'\)"):
        sync_running_stats(_model(), reduce="max")


# --------------------------------------------------------------------------------------------- 2 gloo processes


def _worker(rank: int, world: int) -> dict:
    out: dict = {}
    model = _model()
    _fill(model, rank)
    objects = {n: [getattr(m, k) for k in KEYS] for n, m in running_stat_layers(model).items()}
    out["before"] = _state(model)
    out["names"] = sync_running_stats(model, "mean")
    out["mean"] = _state(model)
    out["same_objects"] = all(
        getattr(m, k) is t for n, m in running_stat_layers(model).items() for k, t in zip(KEYS, objects[n], strict=True)
    )
    # ranks that already agree keep their buffers bit for bit (the mixture of identical distributions is itself)
    agreed = _state(model)
    sync_running_stats(model, "mean")
    out["again_equal"] = all(torch.equal(agreed[k], v) for k, v in model.state_dict().items())
    # broadcast: rank zero's, bit for bit, including -0.0 and values a float64 round trip must keep
    _fill(model, 10 + rank)
    model["torch1d"].running_mean[0] = -0.0
    model["torch1d"].running_mean[1] = 1.0 + 2.0**-23
    out["before_broadcast"] = _state(model)
    sync_running_stats(model, "broadcast")
    out["broadcast"] = _state(model)
    # a NaN on one rank: both ranks raise the same error and change nothing
    _fill(model, rank)
    if rank == 1:
        model["ours2d"].running_var[2] = float("nan")
    before = _state(model)
    out["nan_mean"] = _error(lambda: sync_running_stats(model, "mean"), FloatingPointError)
    out["nan_untouched"] = all(torch.equal(_bits(before[k]), _bits(v)) for k, v in model.state_dict().items())
    # broadcast spreads rank zero's only: rank 1's NaN goes, rank zero's infinity is refused on both ranks
    sync_running_stats(model, "broadcast")
    out["nan_replaced"] = bool(torch.isfinite(model["ours2d"].running_var).all())
    if rank == 0:
        model["sync"].running_mean[1] = float("inf")
    out["inf_broadcast"] = _error(lambda: sync_running_stats(model, "broadcast"), FloatingPointError)
    # different BN layers of the same total size on the ranks: a clear error on both, not silent garbage
    widths = (4, 4) if rank == 0 else (3, 5)
    other = nn.Sequential(*(nn.BatchNorm1d(w) for w in widths))
    out["layout"] = _error(lambda: sync_running_stats(other), ValueError)
    return out


def _error(call, kind: type[Exception]) -> str | None:
    try:
        call()
    except kind as err:
        return str(err)
    return None


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.is_floating_point() else t


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_distributed(_worker, 2)


@pytest.mark.ddp
def test_mean_is_the_mixture_of_the_ranks(ranks: list[dict]) -> None:
    r0, r1 = ranks
    assert r0["names"] == r1["names"] == ["torch1d", "torch2d", "ours2d", "sync", "ghost", "renorm", "f64"]
    assert r0["same_objects"] and r1["same_objects"]
    for name in r0["names"]:
        means = torch.stack([r["before"][f"{name}.running_mean"].double() for r in ranks])
        variances = torch.stack([r["before"][f"{name}.running_var"].double() for r in ranks])
        mean = (means[0] + means[1]) / 2
        var = (variances[0] + variances[1]) / 2 + ((means[0] - mean) ** 2 + (means[1] - mean) ** 2) / 2
        for r in ranks:
            got_mean, got_var = r["mean"][f"{name}.running_mean"], r["mean"][f"{name}.running_var"]
            # float32 buffers: the float64 result rounded once (half an ulp, 6e-8 relative)
            tol = 1e-15 if got_mean.dtype == torch.float64 else 1.2e-7
            torch.testing.assert_close(got_mean.double(), mean, rtol=tol, atol=0)
            torch.testing.assert_close(got_var.double(), var, rtol=tol, atol=0)
            assert int(r["mean"][f"{name}.num_batches_tracked"]) == 12  # max(7, 12)
        assert torch.equal(r0["mean"][f"{name}.running_mean"], r1["mean"][f"{name}.running_mean"])
        assert torch.equal(r0["mean"][f"{name}.running_var"], r1["mean"][f"{name}.running_var"])
    # the spread term matters: without it the variance would be the plain average
    assert (r0["mean"]["torch1d.running_var"] > (r0["before"]["torch1d.running_var"] + 1)).all()
    for key in ("frozen.running_mean", "frozen.running_var", "frozen.weight", "untracked.weight"):
        assert torch.equal(r1["mean"][key], r1["before"][key])  # skipped layers keep their state
    assert r0["again_equal"] and r1["again_equal"]


@pytest.mark.ddp
def test_broadcast_is_rank_zero_bit_for_bit(ranks: list[dict]) -> None:
    r0, r1 = ranks
    source = r0["before_broadcast"]
    for name in r0["names"]:
        for key in KEYS:
            full = f"{name}.{key}"
            for r in ranks:
                got = r["broadcast"][full]
                assert got.dtype == source[full].dtype
                assert torch.equal(_bits(got), _bits(source[full])), full
    assert torch.signbit(r1["broadcast"]["torch1d.running_mean"][0])  # -0.0 arrives as -0.0
    assert not torch.equal(r1["before_broadcast"]["sync.running_mean"], source["sync.running_mean"])
    assert torch.equal(r1["broadcast"]["frozen.running_mean"], r1["before_broadcast"]["frozen.running_mean"])


@pytest.mark.ddp
def test_non_finite_and_mismatched_models_raise_on_every_rank(ranks: list[dict]) -> None:
    r0, r1 = ranks
    assert r0["nan_mean"] == r1["nan_mean"] and "'ours2d' (rank 1)" in r0["nan_mean"]
    assert r0["nan_untouched"] and r1["nan_untouched"]
    assert r0["nan_replaced"] and r1["nan_replaced"]
    assert r0["inf_broadcast"] == r1["inf_broadcast"] and "'sync' (rank 0)" in r0["inf_broadcast"]
    assert r0["layout"] == r1["layout"] and "different BN layers" in r0["layout"]
