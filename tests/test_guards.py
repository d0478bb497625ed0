"""no_stat_update and its snapshot: bit-identical state and identical outputs, for every BN kind.

SyncBatchNorm inside no_stat_update on 2 gloo ranks is checked in the DDP run of tests/callbacks/test_accumulate.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bn_lightning
from bn_lightning import BatchNorm2d, BatchRenorm2d, GhostBatchNorm2d, SyncBatchNorm, no_stat_update
from bn_lightning.guards import StatSnapshot, all_finite, is_guarded, stat_layers
from tests.helpers.tiny import TinyBNNet

KINDS = {
    "torch": dict(bn2d=nn.BatchNorm2d, bn1d=nn.BatchNorm1d),
    "torch_cumulative": dict(bn2d=nn.BatchNorm2d, bn1d=nn.BatchNorm1d, momentum=None),
    "ours": dict(bn2d=BatchNorm2d, bn1d=bn_lightning.BatchNorm1d),
    "ours_cumulative": dict(bn2d=BatchNorm2d, bn1d=bn_lightning.BatchNorm1d, momentum=None),
    "sync_local": dict(bn2d=SyncBatchNorm, bn1d=SyncBatchNorm),
    "ghost": dict(bn2d=lambda c: GhostBatchNorm2d(c, virtual_batch_size=2), bn1d=nn.BatchNorm1d),
    "renorm": dict(bn2d=lambda c: BatchRenorm2d(c, warmup_steps=3), bn1d=nn.BatchNorm1d),
}


def _state(model: nn.Module) -> dict[str, object]:
    """Every buffer and every kept batch statistic, cloned."""
    out: dict[str, object] = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_" in k}
    for name, m in model.named_modules():
        out[name + ".last_batch_stats"] = m.__dict__.get("last_batch_stats", "class default")
    return out


def _assert_same(a: dict[str, object], b: dict[str, object]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        else:
            assert a[k] is b[k], k  # the very same object put back


def _trained(kind: str) -> TinyBNNet:
    kw = dict(KINDS[kind])
    torch.manual_seed(0)
    net = TinyBNNet(kw.pop("bn2d"), kw.pop("bn1d"), **kw)
    for _ in range(2):  # non-trivial buffers (and a renorm warm-up in progress)
        net(torch.randn(6, 3, 5, 5))
    return net


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_no_stat_update_keeps_state_bit_identical_and_outputs_equal(kind):
    net = _trained(kind)
    outside = copy.deepcopy(net)
    before = _state(net)
    x = torch.randn(8, 3, 5, 5)
    with no_stat_update(net) as guarded:
        assert guarded is net and net.training
        y = net(x)
        y.sum().backward()  # gradients flow as usual
        y2 = net(x + 1.0)  # several passes
    _assert_same(_state(net), before)
    assert all(m.training for m in net.modules())
    y_ref = outside(x)
    assert torch.equal(y, y_ref)  # the same forward as outside: batch statistics, same kernels
    assert torch.isfinite(y2).all()
    assert all(p.grad is not None for p in net.parameters())
    # the test can fail: the same forward outside the guard changes the state
    after = _state(outside)
    assert any(isinstance(v, torch.Tensor) and not torch.equal(v, after[k]) for k, v in before.items())


def test_no_stat_update_restores_on_exception_and_nests():
    net = _trained("ours")
    before = _state(net)
    guard = no_stat_update(net)
    with pytest.raises(RuntimeError, match="boom"):
        with guard:
            net(torch.randn(4, 3, 5, 5))
            raise RuntimeError("boom")
    _assert_same(_state(net), before)
    bn = net.features[1]
    with guard:  # the same object, entered again while active
        net(torch.randn(4, 3, 5, 5))
        with guard:
            net(torch.randn(4, 3, 5, 5))
            with no_stat_update(bn):
                net(torch.randn(4, 3, 5, 5))
            assert is_guarded(bn)
        assert is_guarded(bn)
        net(torch.randn(4, 3, 5, 5))
    assert not is_guarded(bn)
    _assert_same(_state(net), before)


def test_backward_after_the_block_works():
    net = _trained("torch")
    with no_stat_update(net):
        y = net(torch.randn(4, 3, 5, 5))
    y.sum().backward()  # the restore must not count as an in-place change of what torch's BN saved for backward
    assert net.features[0].weight.grad is not None


def test_no_stat_update_single_layer_and_eval_layer():
    bn = nn.BatchNorm1d(3, momentum=None)
    bn(torch.randn(5, 3))
    before = _state(bn)
    with no_stat_update(bn):
        bn(torch.randn(5, 3) * 100)
    _assert_same(_state(bn), before)
    with pytest.raises(TypeError, match="no_stat_update: module must be a torch.nn.Module"):
        no_stat_update("net")


def test_snapshot_restores_chosen_layers_and_finite_check():
    net = nn.Sequential(nn.BatchNorm1d(2), nn.BatchNorm1d(2))
    snap = StatSnapshot(stat_layers(net))
    assert list(snap.layers) == ["0", "1"]
    net(torch.randn(4, 2))
    after = {k: v.clone() for k, v in net.state_dict().items()}
    snap.restore(["1"])
    assert torch.equal(net[0].running_mean, after["0.running_mean"])
    assert torch.equal(net[1].running_mean, torch.zeros(2)) and int(net[1].num_batches_tracked) == 0
    assert snap.nonfinite_layers() == [] and bool(all_finite(snap.floating()))
    net[0].running_var[1] = float("inf")
    assert snap.nonfinite_layers() == ["0"] and not bool(all_finite(snap.floating()))
    assert bool(all_finite(snap.floating(ignore=["0"])))
    with pytest.raises(RuntimeError, match="take"):
        StatSnapshot(stat_layers(net), take=False).restore()
