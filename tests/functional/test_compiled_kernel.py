"""The opt-in compiled kernel (``functional.set_kernel("compiled")``): float64-exact like the eager one, the same
layer contract (outputs, grads, running statistics, memory format), and a clean fallback when it cannot compile."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import bn_lightning as B
from bn_lightning import functional as BF
from bn_lightning.functional import compiled as kernels


@pytest.fixture
def compiled(monkeypatch):
    """Switch to the compiled kernel and count its calls; restores the kernel choice and the failure flag after."""
    calls = []
    run = kernels._run_compiled
    monkeypatch.setattr(kernels, "_run_compiled", lambda i, *a: calls.append(i) or run(i, *a))
    monkeypatch.setattr(kernels, "_compiled_broken", False)
    monkeypatch.setattr(kernels, "_chosen", kernels._chosen)
    BF.set_kernel("compiled")
    return calls


def _float64_reference(x, w, b, dy):
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    mean = x64.mean((0, 2, 3), keepdim=True)
    var = ((x64 - mean) ** 2).mean((0, 2, 3), keepdim=True)
    y = (x64 - mean) / torch.sqrt(var + 1e-5) * w64.view(1, -1, 1, 1) + b64.view(1, -1, 1, 1)
    y.backward(dy.double())
    return y.detach(), x64.grad, w64.grad, b64.grad


@pytest.mark.slow
@pytest.mark.parametrize(
    "fmt,shift", [(None, 0.5), (torch.channels_last, 0.5), (None, 1e4)], ids=["nchw", "channels_last", "mean-1e4"]
)
def test_compiled_layer_matches_float64_math_and_torch(compiled, fmt, shift):
    g = torch.Generator().manual_seed(0)
    shape = (16, 6, 8, 8)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + shift).float()
    dy = torch.randn(shape, generator=g) + 0.3  # a gradient with a mean of its own
    if fmt is not None:
        x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
    ref = nn.BatchNorm2d(6, momentum=0.3)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5, generator=g)
        ref.bias.uniform_(-0.5, 0.5, generator=g)
    ours = B.BatchNorm2d(6, momentum=0.3)
    ours.load_state_dict(ref.state_dict())

    xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = ours(xo)
    y.backward(dy)
    ref(xr).backward(dy)
    assert compiled == [0, 1]  # one compiled forward, one compiled backward
    y64, dx64, dw64, db64 = _float64_reference(x, ref.weight, ref.bias, dy)
    torch.testing.assert_close(y.double(), y64, atol=1e-5, rtol=0)
    torch.testing.assert_close(xo.grad.double(), dx64, atol=1e-5, rtol=0)
    if fmt is not None:
        assert y.is_contiguous(memory_format=fmt) and xo.grad.is_contiguous(memory_format=fmt)
    # gamma/beta grads are float32 sums of 1,024 products: within a few times torch's own error of float64
    floor = 3e-6 * 1024**0.5
    for ours_grad, torch_grad, exact in (
        (ours.weight.grad, ref.weight.grad, dw64),
        (ours.bias.grad, ref.bias.grad, db64),
    ):
        ours_err = (ours_grad.double() - exact).abs().max()
        torch_err = (torch_grad.double() - exact).abs().max()
        assert ours_err <= 4 * torch_err + floor, (ours_err, torch_err)
    torch.testing.assert_close(ours.running_mean.double(), x.double().mean((0, 2, 3)) * 0.3, rtol=1e-6, atol=1e-6)
    n = x.numel() // 6
    unbiased = x.double().var((0, 2, 3), correction=0) * n / (n - 1)
    torch.testing.assert_close(ours.running_var.double(), 0.7 + 0.3 * unbiased, rtol=1e-6, atol=1e-6)
    assert ours.last_batch_stats.count == n


def test_compiled_kernel_falls_back_to_eager_with_one_warning(compiled, monkeypatch):
    def fail(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(kernels, "_compiled_pair", (fail, fail))
    layer, ref = B.BatchNorm2d(3), nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5)
    with pytest.warns(RuntimeWarning, match="compiled BN kernel is unavailable.*no C\\+\\+ compiler"):
        y = layer(x)
    torch.testing.assert_close(y, ref(x))
    assert kernels._compiled_broken
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)  # no second warning: the eager kernel from now on


def test_compiled_kernel_is_only_for_plain_local_float_bn(compiled):
    x = torch.randn(4, 3, 5, 5)
    B.BatchRenorm2d(3)(x)  # Batch Renorm
    B.BatchNorm2d(3, dtype=torch.bfloat16)(x.bfloat16())  # half precision
    B.BatchNorm2d(3, dtype=torch.bfloat16).eval()(x.bfloat16())
    assert compiled == []
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        B.BatchNorm2d(3)(torch.randn(1, 3, 1, 1))  # the eager path's error, not a compile attempt
    assert compiled == []


def test_set_kernel_rejects_unknown_names(monkeypatch):
    monkeypatch.delenv("BN_LIGHTNING_KERNEL", raising=False)
    with pytest.raises(ValueError, match="unknown BN kernel 'fast'"):
        BF.set_kernel("fast")
    assert BF.get_kernel() == "eager"


@pytest.mark.parametrize("value,expected", [("compiled", "compiled"), ("", "eager"), ("fast", "eager")])
def test_kernel_from_the_environment(value, expected, monkeypatch):
    code = (
        "import warnings; warnings.simplefilter('ignore'); import bn_lightning.functional as F; print(F.get_kernel())"
    )
    env = {**os.environ, "BN_LIGHTNING_KERNEL": value}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected
    # in this process too: without a set_kernel choice the variable is read when the kernel is used
    monkeypatch.setattr(kernels, "_chosen", None)
    monkeypatch.setattr(kernels, "_warned_env_values", set())
    monkeypatch.setenv("BN_LIGHTNING_KERNEL", value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert BF.get_kernel() == expected
        assert BF.get_kernel() == expected
    assert [str(w.message) for w in caught] == (
        ["BN_LIGHTNING_KERNEL='fast' is not one of ('eager', 'compiled'); using the eager kernel"]
        if value == "fast"
        else []
    )  # an invalid value warns once


def test_kernel_variable_is_read_when_used_not_at_import():
    code = """
import os, warnings
os.environ["BN_LIGHTNING_KERNEL"] = "fast"
with warnings.catch_warnings():
    warnings.simplefilter("error")  # any warning at import fails the run
    import bn_lightning
    import bn_lightning.functional as F
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    print(F.get_kernel(), F.get_kernel(), len(caught))
os.environ["BN_LIGHTNING_KERNEL"] = "compiled"
print(F.get_kernel())
F.set_kernel("eager")  # an explicit choice wins over the variable
print(F.get_kernel())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == ["eager eager 1", "compiled", "eager"], out.stdout + out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["eager", "compiled"])
def test_layer_inside_a_torch_compiled_model_matches_torch(kernel, monkeypatch):
    # under torch.compile the eager kernel takes no data-dependent branch (no host reads: see _is_compiling)
    monkeypatch.setattr(kernels, "_chosen", kernel)
    torch.manual_seed(0)
    ours = nn.Sequential(nn.Conv2d(1, 4, 3), B.BatchNorm2d(4), nn.ReLU())
    ref = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(8, 1, 12, 12)
    y = torch.compile(ours)(x)
    y_ref = ref(x)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[0].weight.grad, ref[0].weight.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours[1].running_var, ref[1].running_var)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", [None, torch.channels_last], ids=["nchw", "channels_last"])
def test_compiled_eval_matches_torch_and_keeps_the_layout(compiled, fmt):
    g = torch.Generator().manual_seed(1)
    ref = nn.BatchNorm2d(6)
    with torch.no_grad():
        for t in (ref.weight, ref.bias, ref.running_mean):
            t.uniform_(-1.0, 1.0, generator=g)
        ref.running_var.uniform_(0.5, 2.0, generator=g)
    ours = B.BatchNorm2d(6)
    ours.load_state_dict(ref.state_dict())
    ours.eval(), ref.eval()
    x = torch.randn(8, 6, 7, 7, generator=g)
    x = x if fmt is None else x.contiguous(memory_format=fmt)
    xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = ours(xo)
    y.sum().backward()  # eval backward stays hand-written (fine-tuning with frozen statistics)
    ref(xr).sum().backward()
    assert compiled == [2]
    torch.testing.assert_close(y, ref(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xo.grad, xr.grad)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, atol=1e-4, rtol=1e-5)
    assert fmt is None or y.is_contiguous(memory_format=fmt)
