"""FrozenBatchNorm1d/2d/3d against eval-mode torch.nn BN (the independent reference), in training and eval mode.

Tools that find BN layers (torch's, Lightning's, ours) are run against frozen layers in test_frozen_tools.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bn_lightning as B
from bn_lightning.functional import normalize
from bn_lightning.layers import has_batch_stats
from bn_lightning.layers.frozen import FrozenBatchNormBase

# (frozen class, torch class, input shape)
CASES = {
    "1d_NC": (B.FrozenBatchNorm1d, nn.BatchNorm1d, (8, 5)),
    "1d_NCL": (B.FrozenBatchNorm1d, nn.BatchNorm1d, (4, 5, 3)),
    "2d": (B.FrozenBatchNorm2d, nn.BatchNorm2d, (3, 5, 4, 4)),
    "3d": (B.FrozenBatchNorm3d, nn.BatchNorm3d, (2, 5, 3, 3, 3)),
}
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-10, rtol=1e-10)}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])


def _trained_torch_bn(torch_cls, dtype, affine=True, seed=0):
    """A torch BN layer in eval mode with non-trivial running statistics, gamma, beta and counter."""
    g = torch.Generator().manual_seed(seed)
    bn = torch_cls(5, affine=affine, dtype=dtype)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(5, generator=g, dtype=dtype))
        bn.running_var.copy_(torch.rand(5, generator=g, dtype=dtype) * 2 + 0.1)
        bn.num_batches_tracked.fill_(17)
        if affine:
            bn.weight.copy_(torch.rand(5, generator=g, dtype=dtype) + 0.5)
            bn.bias.copy_(torch.randn(5, generator=g, dtype=dtype))
    return bn.eval()


def _input(shape, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)


def _forward_backward(layer, x, grad):
    xr = x.clone().requires_grad_()
    y = layer(xr)
    y.backward(grad)
    return y.detach(), xr.grad


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@DTYPES
def test_matches_eval_mode_torch_bn(case, training, dtype):
    frozen_cls, torch_cls, shape = CASES[case]
    ref = _trained_torch_bn(torch_cls, dtype)
    frozen = frozen_cls(5, dtype=dtype)
    frozen.load_state_dict(ref.state_dict())
    frozen.train(training)
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    x = _input(shape, dtype)
    grad = _input(shape, dtype, seed=2)

    y, gx = _forward_backward(frozen, x, grad)
    y_ref, gx_ref = _forward_backward(ref, x, grad)

    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    torch.testing.assert_close(gx, gx_ref, **TOL[dtype])
    assert y.dtype == dtype
    assert frozen.training is training
    assert frozen.last_batch_stats is None
    for name, value in frozen.state_dict().items():  # nothing moves, in training mode either
        assert torch.equal(value, before[name]), name
        assert value.grad is None and not value.requires_grad, name


def test_matches_hand_formula_float64():
    ref = _trained_torch_bn(nn.BatchNorm2d, torch.float64)
    frozen = B.FrozenBatchNorm2d(5, eps=1e-3, dtype=torch.float64)
    frozen.load_state_dict(ref.state_dict())
    x = _input((3, 5, 2, 2), torch.float64)
    view = (1, -1, 1, 1)
    expected = (x - ref.running_mean.view(view)) / torch.sqrt(ref.running_var.view(view) + 1e-3)
    expected = expected * ref.weight.detach().view(view) + ref.bias.detach().view(view)
    torch.testing.assert_close(frozen(x), expected, atol=1e-12, rtol=1e-12)


def test_all_tensors_are_buffers():
    frozen = B.FrozenBatchNorm2d(4)
    assert list(frozen.parameters()) == []
    assert sorted(name for name, _ in frozen.named_buffers()) == ["bias", "running_mean", "running_var", "weight"]
    assert frozen.num_batches_tracked is None
    assert torch.equal(frozen.weight, torch.ones(4)) and torch.equal(frozen.bias, torch.zeros(4))
    assert torch.equal(frozen.running_mean, torch.zeros(4)) and torch.equal(frozen.running_var, torch.ones(4))
    # a plain module, as torchvision's and detectron2's: tools that reset or update `_BatchNorm`s pass it by
    assert not isinstance(frozen, nn.modules.batchnorm._BatchNorm) and isinstance(frozen, FrozenBatchNormBase)
    assert not has_batch_stats(frozen)
    # an optimizer over the model has nothing of the frozen layer to step
    net = nn.Sequential(nn.Conv2d(2, 4, 1), frozen)
    assert len(list(net.parameters())) == 2


def test_buffers_unchanged_by_training_and_optimizer_steps():
    ref = _trained_torch_bn(nn.BatchNorm2d, torch.float32)
    net = nn.Sequential(nn.Conv2d(3, 5, 1), B.FrozenBatchNorm2d(5)).train()
    net[1].load_state_dict(ref.state_dict())
    before = {k: v.clone() for k, v in net[1].state_dict().items()}
    opt = torch.optim.SGD(net.parameters(), lr=0.1, weight_decay=0.1)
    for seed in range(3):
        opt.zero_grad()
        net(_input((4, 3, 3, 3), torch.float32, seed)).square().mean().backward()
        opt.step()
    for name, value in net[1].state_dict().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("case", list(CASES))
def test_loads_torch_state_dict_strict_and_round_trips(case):
    frozen_cls, torch_cls, _ = CASES[case]
    ref = _trained_torch_bn(torch_cls, torch.float32)
    frozen = frozen_cls(5)
    result = frozen.load_state_dict(ref.state_dict(), strict=True)  # num_batches_tracked is dropped, not unexpected
    assert not result.missing_keys and not result.unexpected_keys
    state = frozen.state_dict()
    assert sorted(state) == ["bias", "running_mean", "running_var", "weight"]
    for name, value in state.items():
        assert torch.equal(value, ref.state_dict()[name]), name

    again = frozen_cls(5)
    again.load_state_dict(state, strict=True)
    for name, value in again.state_dict().items():
        assert torch.equal(value, state[name]), name


@pytest.mark.parametrize("source", ["torch", "frozen"])
def test_loads_state_dict_without_version_metadata(source):
    # `dict(sd)`, `{k.removeprefix(...): v}` and most checkpoint rewriting drop `_metadata`; torch's _NormBase then
    # re-inserts num_batches_tracked for "version < 2" state_dicts, which a strict load must still accept
    ref = _trained_torch_bn(nn.BatchNorm2d, torch.float32)
    if source == "frozen":
        frozen_src = B.FrozenBatchNorm2d(5)
        frozen_src.load_state_dict(ref.state_dict())
        ref = frozen_src
    plain = {k: v.clone() for k, v in ref.state_dict().items()}
    assert not hasattr(plain, "_metadata")
    frozen = B.FrozenBatchNorm2d(5)
    frozen.load_state_dict(plain, strict=True)
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(frozen, name), plain[name]), name


def test_loads_nested_in_a_model():
    torch.manual_seed(0)
    src = nn.Sequential(nn.Conv2d(3, 5, 1), _trained_torch_bn(nn.BatchNorm2d, torch.float32))
    dst = nn.Sequential(nn.Conv2d(3, 5, 1), B.FrozenBatchNorm2d(5))
    dst.load_state_dict(src.state_dict(), strict=True)
    x = _input((2, 3, 4, 4), torch.float32)
    torch.testing.assert_close(dst.train()(x), src.eval()(x), **TOL[torch.float32])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_affine_false(training):
    ref = _trained_torch_bn(nn.BatchNorm1d, torch.float64, affine=False)
    frozen = B.FrozenBatchNorm1d(5, affine=False, dtype=torch.float64).train(training)
    assert frozen.weight is None and frozen.bias is None and not frozen.affine
    frozen.load_state_dict(ref.state_dict(), strict=True)
    assert sorted(frozen.state_dict()) == ["running_mean", "running_var"]
    x, grad = _input((6, 5, 3), torch.float64), _input((6, 5, 3), torch.float64, seed=3)
    y, gx = _forward_backward(frozen, x, grad)
    y_ref, gx_ref = _forward_backward(ref, x, grad)
    torch.testing.assert_close(y, y_ref, **TOL[torch.float64])
    torch.testing.assert_close(gx, gx_ref, **TOL[torch.float64])


def test_constructor_accepts_and_ignores_converter_options():
    frozen = B.FrozenBatchNorm2d(3, eps=1e-3, momentum=0.5, track_running_stats=True, dtype=torch.float64)
    assert frozen.eps == 1e-3
    assert all(t.dtype == torch.float64 for t in frozen.buffers())
    x = _input((2, 3, 2, 2), torch.float64)
    torch.testing.assert_close(frozen(x), x / (1 + 1e-3) ** 0.5, atol=1e-12, rtol=1e-12)


def test_reset_running_stats_and_parameters():
    frozen = B.FrozenBatchNorm2d(3)
    with torch.no_grad():
        frozen.running_mean.fill_(2.0)
        frozen.weight.fill_(3.0)
    frozen.reset_running_stats()
    assert torch.equal(frozen.running_mean, torch.zeros(3)) and torch.equal(frozen.running_var, torch.ones(3))
    assert torch.equal(frozen.weight, torch.full((3,), 3.0))
    frozen.reset_parameters()
    assert torch.equal(frozen.weight, torch.ones(3)) and torch.equal(frozen.bias, torch.zeros(3))


def test_repr():
    assert repr(B.FrozenBatchNorm2d(4)) == "FrozenBatchNorm2d(4, eps=1e-05, affine=True)"
    assert repr(B.FrozenBatchNorm1d(2, eps=0.1, affine=False)) == "FrozenBatchNorm1d(2, eps=0.1, affine=False)"


@pytest.mark.parametrize(
    ("cls", "shape", "match"),
    [
        (B.FrozenBatchNorm1d, (2, 3, 4, 4), r"\(N, C\) or \(N, C, L\)"),
        (B.FrozenBatchNorm2d, (2, 3), r"\(N, C, H, W\)"),
        (B.FrozenBatchNorm3d, (2, 3, 4, 4), r"\(N, C, D, H, W\)"),
        (B.FrozenBatchNorm2d, (2, 4, 3, 3), "expects 3 channels"),
    ],
)
def test_bad_input_shape_raises(cls, shape, match):
    with pytest.raises(ValueError, match=match):
        cls(3)(torch.randn(shape))


def test_single_sample_is_fine_in_training_mode():
    # no batch statistics: a batch of one is normalised like any other
    ref = _trained_torch_bn(nn.BatchNorm1d, torch.float32)
    frozen = B.FrozenBatchNorm1d(5).train()
    frozen.load_state_dict(ref.state_dict())
    x = _input((1, 5), torch.float32)
    torch.testing.assert_close(frozen(x), ref(x), **TOL[torch.float32])


@pytest.mark.parametrize("case", list(CASES))
def test_output_is_eval_mode_bn_bit_for_bit_and_independent_of_the_mode(case):
    frozen_cls, torch_cls, shape = CASES[case]
    frozen = frozen_cls(5)
    frozen.load_state_dict(_trained_torch_bn(torch_cls, torch.float32).state_dict())
    x = _input(shape, torch.float32)
    expected = normalize(x, frozen.running_mean, frozen.running_var, frozen.weight, frozen.bias, frozen.eps)
    assert torch.equal(frozen.train()(x), expected)
    assert torch.equal(frozen.eval()(x), expected)


def test_state_dict_loads_into_torch_bn():
    # no counter is saved: torch's BN loads it strictly and keeps its own counter
    ref = _trained_torch_bn(nn.BatchNorm2d, torch.float32)
    frozen = B.FrozenBatchNorm2d(5)
    frozen.load_state_dict(ref.state_dict())
    bn = nn.BatchNorm2d(5)
    bn.load_state_dict(frozen.state_dict(), strict=True)
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(bn, name).detach(), getattr(frozen, name)), name
    x = _input((3, 5, 2, 2), torch.float32)
    torch.testing.assert_close(bn.eval()(x), frozen(x), **TOL[torch.float32])


def test_casts_and_copies_follow_the_buffers():
    frozen = B.FrozenBatchNorm2d(3).double()
    assert {t.dtype for t in frozen.buffers()} == {torch.float64}
    clone = copy.deepcopy(frozen)
    assert repr(clone) == repr(frozen) and clone.weight is not frozen.weight
    assert torch.equal(clone(torch.ones(1, 3, 1, 1, dtype=torch.float64)), frozen(torch.ones(1, 3, 1, 1).double()))
