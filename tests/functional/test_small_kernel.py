"""The float64 training kernel for small inputs: where it serves, and its results against float64 math.

Its parity with torch.nn, gradcheck and the blocked kernels' results on the same inputs are in
tests/layers/test_batchnorm.py (the ``kernel_path`` fixture runs those tests on both kernels).
"""

from __future__ import annotations

import pytest
import torch

import bn_lightning as B
import bn_lightning.functional.batchnorm as bn_module
from bn_lightning.functional.small import SMALL_VALUES, small_eligible


def test_serves_cpu_float32_and_float64_inputs_up_to_the_limit():
    c = 4
    at_limit = torch.empty(SMALL_VALUES // c, c)
    assert small_eligible(at_limit) and small_eligible(at_limit.double())
    assert not small_eligible(torch.empty(SMALL_VALUES // c + 1, c))
    assert not small_eligible(at_limit.bfloat16()) and not small_eligible(at_limit.half())
    assert not small_eligible(torch.empty(0, c)) and not small_eligible(torch.empty(8))


@pytest.mark.parametrize("values", [SMALL_VALUES, SMALL_VALUES + 16])
def test_layers_take_it_exactly_below_the_limit(values, monkeypatch):
    calls = []
    real = bn_module.small_forward
    monkeypatch.setattr(bn_module, "small_forward", lambda *a: calls.append(1) or real(*a))
    B.BatchNorm1d(16)(torch.randn(values // 16, 16))
    assert bool(calls) == (values <= SMALL_VALUES)


def _float64_bn(x, weight, bias, grad, eps=1e-5):
    x64 = x.double().requires_grad_()
    w64, b64 = weight.double().requires_grad_(), bias.double().requires_grad_()
    dims, view = (0, *range(2, x.dim())), (1, -1) + (1,) * (x.dim() - 2)
    mean = x64.mean(dims, keepdim=True)
    var = x64.var(dims, correction=0, keepdim=True)
    y = (x64 - mean) / torch.sqrt(var + eps) * w64.view(view) + b64.view(view)
    y.backward(grad.double())
    return y, x64.grad, w64.grad, b64.grad, mean.view(-1), var.view(-1)


@pytest.mark.parametrize("offset", [0.0, 30.0, 1e4], ids=["centred", "30std", "1e4std"])
@pytest.mark.parametrize(
    "cls,shape,fmt",
    [
        (B.BatchNorm1d, (64, 32), None),
        (B.BatchNorm1d, (8, 32, 9), None),
        (B.BatchNorm2d, (4, 32, 5, 7), torch.channels_last),
    ],
    ids=["NC", "NCL", "NHWC"],
)
def test_float32_results_match_float64_math_for_any_mean(cls, shape, fmt, offset):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64) + offset
    x = x.float() if fmt is None else x.float().contiguous(memory_format=fmt)
    grad = torch.randn(shape, generator=g).contiguous(memory_format=fmt or torch.contiguous_format)
    layer = cls(shape[1])
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    x_in = x.clone().requires_grad_()
    y = layer(x_in)
    y.backward(grad)
    y64, dx64, dw64, db64, mean64, var64 = _float64_bn(x, layer.weight.detach(), layer.bias.detach(), grad)
    # float64 throughout, rounded once to float32: each result within a few float32 ulps of the truth, whatever
    # the mean (the float32 input is exact; its centring in float64 loses nothing at 1e4 std)
    torch.testing.assert_close(y.double(), y64, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(x_in.grad.double(), dx64, atol=2e-6 * dx64.abs().max(), rtol=2e-6)
    torch.testing.assert_close(layer.weight.grad.double(), dw64, atol=2e-6 * dw64.abs().max(), rtol=2e-6)
    torch.testing.assert_close(layer.bias.grad.double(), db64, atol=2e-6 * db64.abs().max(), rtol=2e-6)
    stats = layer.last_batch_stats
    torch.testing.assert_close(stats.mean.double(), mean64, atol=0, rtol=2e-7)
    torch.testing.assert_close(stats.var.double(), var64, atol=0, rtol=2e-7)
    if fmt is not None:
        assert y.is_contiguous(memory_format=fmt)


def test_double_backward_and_float64_gradcheck():
    layer = B.BatchNorm2d(3, dtype=torch.float64)
    layer.momentum = 0.0
    x = torch.randn(4, 3, 2, 3, dtype=torch.float64, requires_grad=True) + 5
    assert torch.autograd.gradcheck(layer, (x,))
    assert torch.autograd.gradgradcheck(layer, (x,))
