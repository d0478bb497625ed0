"""convert_batchnorm round trips (same Parameters, flags, dtype, state_dict), options, patterns; bn_param_groups."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import bn_lightning as B
from bn_lightning.app.models import ResNet20
from bn_lightning.convert import (
    TorchBatchNormXd,
    bn_param_groups,
    convert_batchnorm,
    convert_sync_batchnorm,
    revert_sync_batchnorm,
)
from bn_lightning.layers.frozen import FrozenBatchNormBase

F64 = dict(atol=1e-10, rtol=1e-10)
KINDS = ["scratch", "sync", "frozen", "ghost", "renorm"]
NO_3D = {"ghost", "renorm"}  # implementations without a 3d layer
EXPECTED = {
    "scratch": {1: B.BatchNorm1d, 2: B.BatchNorm2d, 3: B.BatchNorm3d},
    "sync": {1: B.SyncBatchNorm, 2: B.SyncBatchNorm, 3: B.SyncBatchNorm},
    "frozen": {1: B.FrozenBatchNorm1d, 2: B.FrozenBatchNorm2d, 3: B.FrozenBatchNorm3d},
    "ghost": {1: B.GhostBatchNorm1d, 2: B.GhostBatchNorm2d},
    "renorm": {1: B.BatchRenorm1d, 2: B.BatchRenorm2d},
}
DIM = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}


class Net(nn.Module):
    """A small CNN + MLP with torch BN 1d, 2d and 3d (3d in its own branch, so it can be excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1, bias=False),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 6, 3, bias=False),
            nn.BatchNorm2d(6, momentum=None, eps=1e-3),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.branch3d = nn.Sequential(nn.Conv3d(3, 2, 1), nn.BatchNorm3d(2, momentum=0.3))
        self.head = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = self.branch3d(x.unsqueeze(2)).mean((1, 2, 3, 4)).unsqueeze(1)
        return self.head(self.features(x)) + side


def _net(dtype=torch.float64) -> Net:
    """Non-trivial BN state; one BN weight frozen by the user; one BN layer in eval mode inside a training model."""
    torch.manual_seed(0)
    net = Net().to(dtype).train()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, _BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(11)
    net.features[1].weight.requires_grad_(False)
    net.head[1].eval()
    return net


def _x(dtype=torch.float64, n=8, seed=1):
    return torch.randn(n, 3, 5, 5, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _bn_layers(net):
    """Every BN layer, frozen ones included (they are not torch ``_BatchNorm`` subclasses)."""
    return {name: m for name, m in net.named_modules() if isinstance(m, _BatchNorm | FrozenBatchNormBase)}


def _snapshot(net):
    """Everything a round trip must give back: classes, Parameter objects, flags, hyper-parameters, state."""
    return {
        "types": {name: type(m) for name, m in net.named_modules()},
        "params": {name: p for name, p in net.named_parameters()},
        "requires_grad": {name: p.requires_grad for name, p in net.named_parameters()},
        "training": {name: m.training for name, m in net.named_modules()},
        "hparams": {name: (m.eps, m.momentum, m.affine, m.track_running_stats) for name, m in _bn_layers(net).items()},
        "state": {k: v.clone() for k, v in net.state_dict().items()},
    }


def _assert_restored(net, snap):
    assert {name: type(m) for name, m in net.named_modules()} == snap["types"]
    params = dict(net.named_parameters())
    assert params.keys() == snap["params"].keys()
    for name, p in params.items():
        assert p is snap["params"][name], f"{name} is not the original Parameter"
        assert p.requires_grad == snap["requires_grad"][name], name
    assert {name: m.training for name, m in net.named_modules()} == snap["training"]
    hparams = {name: (m.eps, m.momentum, m.affine, m.track_running_stats) for name, m in _bn_layers(net).items()}
    assert hparams == snap["hparams"]
    state = net.state_dict()
    assert list(state) == list(snap["state"])
    for key, value in state.items():
        assert value.dtype == snap["state"][key].dtype, key
        assert torch.equal(value, snap["state"][key]), key
    assert not any(hasattr(m, "_bn_lightning_original") for m in net.modules())


def _options(kind):
    return {"exclude": ["branch3d.*"]} if kind in NO_3D else {}


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_restores_everything(kind):
    net = _net()
    reference = copy.deepcopy(net).eval()
    snap = _snapshot(net)
    originals = _bn_layers(net)

    out = convert_batchnorm(net, kind, **_options(kind))
    assert out is net
    for name, m in _bn_layers(net).items():
        dim = DIM[snap["types"][name]]
        if kind in NO_3D and dim == 3:
            assert m is originals[name]  # excluded
            continue
        assert type(m) is EXPECTED[kind][dim], name
        assert m.training == snap["training"][name], name
        assert m.running_mean is originals[name].running_mean  # the very same buffers
        if kind == "frozen":
            assert "weight" in m._buffers and m.weight.data_ptr() == originals[name].weight.data_ptr()
        else:
            assert m.weight is originals[name].weight and m.bias is originals[name].bias
        assert m.weight.dtype == torch.float64
    torch.testing.assert_close(copy.deepcopy(net).eval()(_x()), reference(_x()), **F64)

    back = convert_batchnorm(net, "torch")
    assert back is net
    _assert_restored(net, snap)
    torch.testing.assert_close(net.eval()(_x()), reference(_x()), **F64)


def test_chained_conversions_restore_the_original():
    net = _net()
    snap = _snapshot(net)
    for kind in ["ghost", "renorm", "frozen", "scratch", "sync", "frozen", "ghost"]:
        net = convert_batchnorm(net, kind, **_options(kind))
    convert_batchnorm(net, "torch")
    _assert_restored(net, snap)


@pytest.mark.parametrize("kind", ["scratch", "sync"])
def test_training_through_converted_layers_updates_the_original_state(kind):
    net, reference = _net(), _net()
    convert_batchnorm(net, kind)
    x = _x()
    torch.testing.assert_close(net(x), reference(x), **F64)
    convert_batchnorm(net, "torch")
    for (key, a), (_, b) in zip(net.state_dict().items(), reference.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, **F64, msg=key)
    assert int(net.features[1].num_batches_tracked) == 12


def test_frozen_conversion_gives_eval_mode_outputs_in_training():
    net = _net().train()
    net(_x(seed=5))  # a training step moves the running statistics
    reference = copy.deepcopy(net).eval()
    frozen = convert_batchnorm(copy.deepcopy(net).train(), "frozen")
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    x = _x(seed=6).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    y, y_ref = frozen(x), reference(xr)
    torch.testing.assert_close(y, y_ref, **F64)
    y.sum().backward()
    y_ref.sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, **F64)
    for key, value in frozen.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not any(isinstance(m, _BatchNorm) and list(m.parameters(recurse=False)) for m in frozen.modules())
    layers = _bn_layers(frozen).values()
    assert len(layers) == 4 and not any(isinstance(m, _BatchNorm) or list(m.parameters()) for m in layers)


def test_frozen_keeps_the_original_momentum_and_counter_for_later_conversions():
    # the frozen layer's momentum (0) and missing counter are placeholders: layers built from it get the model's back
    net = _net()
    counter = net.features[1].num_batches_tracked
    convert_batchnorm(net, "frozen")
    convert_batchnorm(net, "ghost", exclude=["branch3d.*"])
    assert net.features[1].momentum == 0.1 and net.features[4].momentum is None
    assert net.features[1].num_batches_tracked is counter
    convert_batchnorm(net, "frozen")
    convert_batchnorm(net, "scratch")
    net(_x())  # one training step counts on the original counter
    convert_batchnorm(net, "frozen")
    convert_batchnorm(net, "torch")
    assert net.features[1].momentum == 0.1 and net.features[4].momentum is None and net.branch3d[1].momentum == 0.3
    assert net.features[1].num_batches_tracked is counter and int(counter) == 12


@pytest.mark.parametrize("kind", ["frozen", "ghost"])
def test_round_trip_follows_a_cast_made_while_converted(kind):
    net = _net(torch.float32)
    weight = net.features[1].weight
    convert_batchnorm(net, kind, **_options(kind))
    net.double()
    convert_batchnorm(net, "torch")
    assert net.features[1].weight is weight
    assert {v.dtype for k, v in net.state_dict().items() if "num_batches" not in k} == {torch.float64}
    net.eval()(_x())  # no dtype mismatch


def test_ghost_and_renorm_options_are_passed():
    net = convert_batchnorm(_net(), "ghost", exclude=["branch3d.*"], virtual_batch_size=4)
    ghosts = [m for m in net.modules() if isinstance(m, B.GhostBatchNorm1d | B.GhostBatchNorm2d)]
    assert len(ghosts) == 3 and all(m.virtual_batch_size == 4 for m in ghosts)
    net = convert_batchnorm(net, "renorm", exclude=["branch3d.*"], r_max=2.0, d_max=1.0, warmup_steps=7)
    renorms = [m for m in net.modules() if isinstance(m, B.BatchRenorm1d | B.BatchRenorm2d)]
    assert len(renorms) == 3
    assert all((m.r_max, m.d_max, m.warmup_steps) == (2.0, 1.0, 7) for m in renorms)
    # options a target does not take are dropped, not passed on
    net = convert_batchnorm(net, "frozen", virtual_batch_size=4, r_max=2.0)
    assert not any(hasattr(m, "virtual_batch_size") or hasattr(m, "r_max") for m in net.modules())


def test_include_and_exclude_patterns():
    net = convert_batchnorm(_net(), "scratch", include=["features.*"])
    assert [type(m) for m in _bn_layers(net).values()] == [B.BatchNorm2d, B.BatchNorm2d, nn.BatchNorm3d, nn.BatchNorm1d]
    net = convert_batchnorm(_net(), "frozen", exclude=["features.1", "head.*"])
    types = [type(m) for m in _bn_layers(net).values()]
    assert types == [nn.BatchNorm2d, B.FrozenBatchNorm2d, B.FrozenBatchNorm3d, nn.BatchNorm1d]
    net = convert_batchnorm(_net(), "ghost", include=["*.1"], exclude=["branch3d.*"])
    types = [type(m) for m in _bn_layers(net).values()]
    assert types == [B.GhostBatchNorm2d, nn.BatchNorm2d, nn.BatchNorm3d, B.GhostBatchNorm1d]


@pytest.mark.parametrize(
    ("alias", "cls"),
    [
        ("sync_batchnorm", B.SyncBatchNorm),
        ("syncbn", B.SyncBatchNorm),
        ("FrozenBN", B.FrozenBatchNorm2d),
        ("ghost-bn", B.GhostBatchNorm2d),
        ("BatchRenorm", B.BatchRenorm2d),
        ("Scratch", B.BatchNorm2d),
    ],
)
def test_aliases(alias, cls):
    layer = convert_batchnorm(nn.BatchNorm2d(3), alias)
    assert type(layer) is cls


def test_unknown_name_lists_the_names():
    with pytest.raises(ValueError, match="Unknown BatchNorm implementation 'group'") as err:
        convert_batchnorm(_net(), "group")
    for name in KINDS + ["torch"]:
        assert repr(name) in str(err.value)


@pytest.mark.parametrize("kind", sorted(NO_3D))
def test_3d_layer_without_implementation_raises_naming_it(kind):
    with pytest.raises(ValueError, match=r"branch3d\.1"):
        convert_batchnorm(_net(), kind)


def test_root_layer_returns_the_converted_layer():
    bn = nn.BatchNorm1d(5, momentum=0.2)
    weight = bn.weight
    ghost = convert_batchnorm(bn, "ghost", virtual_batch_size=2)
    assert type(ghost) is B.GhostBatchNorm1d and ghost.weight is weight and ghost.virtual_batch_size == 2
    back = convert_batchnorm(ghost, "torch")
    assert type(back) is nn.BatchNorm1d and back.weight is weight and back.momentum == 0.2
    assert convert_batchnorm(back, "torch") is back  # already torch: untouched


def test_never_converted_layers_become_torch():
    net = nn.Sequential(B.BatchNorm2d(3), B.GhostBatchNorm1d(3, virtual_batch_size=2), B.FrozenBatchNorm3d(3))
    weight = net[0].weight
    convert_batchnorm(net, "torch")
    assert [type(m) for m in net] == [nn.BatchNorm2d, nn.BatchNorm1d, nn.BatchNorm3d]
    assert net[0].weight is weight
    assert isinstance(net[2].weight, nn.Parameter) and net[2].weight.requires_grad
    # a layer built frozen has no momentum nor tracking flag: the trainable layer gets torch's defaults
    assert (net[2].momentum, net[2].track_running_stats, int(net[2].num_batches_tracked)) == (0.1, True, 0)


def test_sync_conversion_leaves_frozen_ghost_and_renorm_alone():
    net = nn.Sequential(
        nn.BatchNorm2d(3), B.FrozenBatchNorm2d(3), B.GhostBatchNorm2d(3), B.BatchRenorm2d(3), B.BatchNorm1d(3)
    )
    kept = list(net)[1:4]
    for convert in (lambda m: convert_sync_batchnorm(m), lambda m: convert_batchnorm(m, "sync")):
        model = convert(net)
        assert type(model[0]) is B.SyncBatchNorm and type(model[4]) is B.SyncBatchNorm
        assert list(model)[1:4] == kept
        assert all(a is b for a, b in zip(list(model)[1:4], kept, strict=True))
        model = revert_sync_batchnorm(model)
        assert type(model[0]) is nn.BatchNorm2d and type(model[4]) is B.BatchNorm1d
        assert all(a is b for a, b in zip(list(model)[1:4], kept, strict=True))


@pytest.mark.parametrize("training", [True, False])
def test_revert_makes_a_torch_sync_batchnorm_built_elsewhere_local(training):
    """torch's own converter leaves no trace of the 1d/2d layer it replaced: the local layer takes any (N, C, *)
    input, with torch's kernel, and keeps the very same (bit-identical) parameters and buffers."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 5), nn.BatchNorm1d(5))
    for bn in (net[1], net[4]):
        with torch.no_grad():
            bn.weight.uniform_(0.5, 2)
            bn.bias.uniform_(-1, 1)
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
        bn.num_batches_tracked.fill_(7)
    net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    net.train(training)
    assert type(net[1]) is nn.SyncBatchNorm and type(net[4]) is nn.SyncBatchNorm
    objects = {n: t for n, t in list(net.named_parameters()) + list(net.named_buffers())}
    before = {n: t.clone() for n, t in objects.items()}
    reference = copy.deepcopy(net)  # torch's SyncBatchNorm, run locally (no process group)
    net = revert_sync_batchnorm(net)
    assert type(net[1]) is TorchBatchNormXd and type(net[4]) is TorchBatchNormXd
    assert net[1].training is training and net[4].momentum == 0.1 and net[4].eps == 1e-5
    after = dict(list(net.named_parameters()) + list(net.named_buffers()))
    assert after.keys() == objects.keys() and all(after[n] is objects[n] for n in objects)  # the same objects
    assert all(torch.equal(after[n], before[n]) for n in objects)
    x = torch.randn(6, 3, 6, 6)
    out, ref = net(x), reference(x)
    assert torch.equal(out, ref)  # the same kernel: bit for bit, outputs and running-statistics updates
    for n, t in reference.named_buffers():
        assert torch.equal(dict(net.named_buffers())[n], t), n
    with pytest.raises(ValueError, match=r"TorchBatchNormXd\(5\) expects input of shape \(N, C, \*\), got 1D"):
        net[4](torch.randn(5))


# ---------------------------------------------------------------- bn_param_groups


def _resnet():
    torch.manual_seed(0)
    return ResNet20(norm="torch", width=4)


def test_param_groups_on_resnet20():
    model = _resnet()
    bn_layers = list(_bn_layers(model).values())
    assert len(bn_layers) == 21  # 19 convs + 2 projection shortcuts
    bn_ids = {id(p) for m in bn_layers for p in (m.weight, m.bias)}
    decay, no_decay = bn_param_groups(model, 5e-4)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert len(no_decay["params"]) == 2 * len(bn_layers)
    assert {id(p) for p in no_decay["params"]} == bn_ids
    everything = [id(p) for p in model.parameters()]
    grouped = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert sorted(grouped) == sorted(everything) and len(set(grouped)) == len(grouped)


def test_param_groups_no_decay_bias():
    model = _resnet()
    n_bn = len(_bn_layers(model))
    decay, no_decay = bn_param_groups(model, 1e-4, no_decay_bias=True)
    assert len(no_decay["params"]) == 2 * n_bn + 1  # + the classifier's bias (convs have none)
    assert any(p is model.fc.bias for p in no_decay["params"])
    assert all(p.dim() > 1 for p in decay["params"])  # only conv/linear weights are decayed


def test_param_groups_without_bn_exemption_is_one_group():
    model = _resnet()
    decay, no_decay = bn_param_groups(model, 1e-4, no_decay_bn=False)
    assert len(decay["params"]) == len(list(model.parameters())) and no_decay["params"] == []


def test_param_groups_skip_frozen_parameters_and_count_shared_once():
    model = _resnet()
    model.bn1.weight.requires_grad_(False)
    model.conv1.weight.requires_grad_(False)
    shared = nn.Sequential(model, model.fc)  # model.fc appears twice
    decay, no_decay = bn_param_groups(shared, 1e-4)
    grouped = [p for g in (decay, no_decay) for p in g["params"]]
    assert all(p is not model.bn1.weight and p is not model.conv1.weight for p in grouped)
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(model.parameters())) - 2
    assert len(no_decay["params"]) == 2 * len(_bn_layers(model)) - 1


def test_param_groups_skip_frozen_bn_layers():
    model = convert_batchnorm(_resnet(), "frozen", include=["layer1.*"])
    n_trainable_bn = sum(1 for m in model.modules() if type(m) is nn.BatchNorm2d)
    _, no_decay = bn_param_groups(model, 1e-4)
    assert len(no_decay["params"]) == 2 * n_trainable_bn < 2 * 21


def test_param_groups_negative_weight_decay_raises():
    with pytest.raises(ValueError, match="weight_decay"):
        bn_param_groups(_resnet(), -1e-4)


def test_param_groups_drive_sgd():
    model = _resnet()
    opt = torch.optim.SGD(bn_param_groups(model, 0.1), lr=1.0)
    conv, bn = model.conv1.weight.detach().clone(), model.bn1.weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # zero gradients: only the decay moves anything
    torch.testing.assert_close(model.conv1.weight.detach(), conv * 0.9)
    assert torch.equal(model.bn1.weight.detach(), bn)


def test_untracked_layers_cannot_become_frozen_or_renorm_and_the_error_names_them():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    for impl in ("frozen", "renorm"):
        with pytest.raises(ValueError, match=r"BN layer '1'.*no running statistics"):
            convert_batchnorm(net, impl)


def test_momentum_and_eps_options_apply_to_every_target():
    for impl in ("scratch", "ghost", "renorm", "sync"):
        net = convert_batchnorm(nn.Sequential(nn.BatchNorm2d(4)), impl, momentum=0.01, eps=1e-3)
        assert (net[0].momentum, net[0].eps) == (0.01, 1e-3), impl
