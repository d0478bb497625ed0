"""bn_lightning.BatchNorm1d/2d/3d against torch.nn (the independent reference), plus float64 math for edge cases."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import bn_lightning as B
from bn_lightning.layers import ScratchBatchNormMixin
from tests.helpers.tiny import TinyBNNet

# (our class, torch class, input shape, memory format)
CASES = {
    "1d_NC": (B.BatchNorm1d, nn.BatchNorm1d, (16, 6), None),
    "1d_NCL": (B.BatchNorm1d, nn.BatchNorm1d, (8, 6, 5), None),
    "2d_NCHW": (B.BatchNorm2d, nn.BatchNorm2d, (4, 6, 5, 7), None),
    "2d_channels_last": (B.BatchNorm2d, nn.BatchNorm2d, (4, 6, 5, 7), torch.channels_last),
    "3d_NCDHW": (B.BatchNorm3d, nn.BatchNorm3d, (3, 6, 3, 4, 5), None),
    "3d_channels_last": (B.BatchNorm3d, nn.BatchNorm3d, (3, 6, 3, 4, 5), torch.channels_last_3d),
    # rows of >= 64 values per (n, c): the CPU fast paths (row-wise sums of squares, uncentred statistics)
    "2d_NCHW_rows": (B.BatchNorm2d, nn.BatchNorm2d, (4, 6, 8, 16), None),
    "3d_NCDHW_rows": (B.BatchNorm3d, nn.BatchNorm3d, (2, 6, 4, 8, 8), None),
    "1d_NCL_split_rows": (B.BatchNorm1d, nn.BatchNorm1d, (2, 6, 5120), None),  # rows cut into 2 x 2560
}
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-10, rtol=1e-10)}


@pytest.fixture(params=["small", "blocked"])
def kernel_path(request, monkeypatch):
    """Both CPU training kernels on the same small inputs: the float64 small-input kernel, and the blocked float32
    kernels that serve inputs above ``SMALL_VALUES`` (forced here by setting that limit to zero)."""
    if request.param == "blocked":
        monkeypatch.setattr("bn_lightning.functional.small.SMALL_VALUES", 0)
    return request.param


def _pair(ours_cls, torch_cls, dtype, **kwargs):
    ref = torch_cls(6, dtype=dtype, **kwargs)
    if ref.affine:  # non-trivial gamma/beta, identical in both
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-0.5, 0.5)
    ours = ours_cls(6, dtype=dtype, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _input(shape, fmt, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2.0 + 0.5).to(dtype)
    return x.contiguous(memory_format=fmt) if fmt is not None else x


def _step(layer, x, grad):
    xr = x.clone().requires_grad_()
    y = layer(xr)
    y.backward(grad)
    return y, xr.grad


def _assert_same(ours, ref, dtype, values_per_channel=1, ref64=None):
    # gamma/beta grads are sums of `values_per_channel` products, rounded differently by each float32 implementation:
    # with a float64 reference, ours' worst error must be within twice torch's worst (plus a sqrt(n)-scaled floor)
    atol = TOL[dtype]["atol"] * max(1.0, (values_per_channel / 64) ** 0.5)
    params64 = dict(ref64.named_parameters()) if ref64 is not None else {}
    for (name, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
        if name in params64:
            truth = params64[name].grad
            ours_err, torch_err = (a.grad.double() - truth).abs().max(), (b.grad.double() - truth).abs().max()
            allowed = 2 * torch_err + atol + TOL[dtype]["rtol"] * truth.abs().max()
            assert ours_err <= allowed, f"grad of {name}: ours {a.grad}, torch {b.grad}, float64 {truth}"
        else:
            torch.testing.assert_close(a.grad, b.grad, atol=atol, rtol=TOL[dtype]["rtol"], msg=f"grad of {name}")
    for (name, a), (_, b) in zip(ours.named_buffers(), ref.named_buffers(), strict=True):
        torch.testing.assert_close(a, b, **TOL[dtype], msg=f"buffer {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("track", [True, False], ids=["track", "notrack"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "mNone"])
@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_torch(case, momentum, affine, track, dtype, kernel_path):
    ours_cls, torch_cls, shape, fmt = CASES[case]
    ours, ref = _pair(ours_cls, torch_cls, dtype, momentum=momentum, affine=affine, track_running_stats=track)
    for mode, seed in itertools.product(("train", "eval"), range(3)):
        ours.train(mode == "train")
        ref.train(mode == "train")
        x = _input(shape, fmt, dtype, seed)
        grad = _input(shape, fmt, dtype, 100 + seed)
        ref64 = copy.deepcopy(ref).double() if dtype == torch.float32 else None
        for p in itertools.chain(ours.parameters(), ref.parameters()):
            p.grad = None
        y, dx = _step(ours, x, grad)
        y_ref, dx_ref = _step(ref, x, grad)
        if ref64 is not None:
            _step(ref64, x.double(), grad.double())
        torch.testing.assert_close(y, y_ref, **TOL[dtype], msg=f"{mode} output")
        torch.testing.assert_close(dx, dx_ref, **TOL[dtype], msg=f"{mode} input grad")
        assert y.dtype == y_ref.dtype
        if fmt is not None:
            assert y.is_contiguous(memory_format=fmt) and dx.is_contiguous(memory_format=fmt)
        _assert_same(ours, ref, dtype, x.numel() // x.shape[1], ref64)


@pytest.mark.parametrize("case", ["1d_NC", "2d_NCHW", "2d_channels_last", "3d_NCDHW"])
def test_bf16_autocast_cpu(case):
    ours_cls, torch_cls, shape, fmt = CASES[case]
    ours, ref = _pair(ours_cls, torch_cls, torch.float32)
    x = _input(shape, fmt, torch.float32, 0)
    grad = _input(shape, fmt, torch.float32, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xb = x.to(torch.bfloat16)  # what a conv under autocast hands to BN
        y, dx = _step(ours, xb, grad.to(torch.bfloat16))
        y_ref, dx_ref = _step(ref, xb, grad.to(torch.bfloat16))
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert dx.dtype == dx_ref.dtype == torch.bfloat16
    # both compute statistics in float32 from the same bf16 values, so buffers agree tightly
    torch.testing.assert_close(ours.running_mean, ref.running_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.running_var, ref.running_var, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y.float(), y_ref.float(), atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(dx.float(), dx_ref.float(), atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize(
    "cls,shape", [(B.BatchNorm1d, (5, 3)), (B.BatchNorm2d, (3, 3, 2, 3)), (B.BatchNorm3d, (2, 3, 2, 2, 2))]
)
def test_gradcheck_float64(cls, shape, affine, training, kernel_path):
    layer = cls(3, affine=affine, dtype=torch.float64)
    if affine:
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-0.5, 0.5)
    with torch.no_grad():
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
    layer.train(training)
    layer.momentum = 0.0  # keep the buffers fixed across gradcheck's many forwards
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    params = {"weight": layer.weight, "bias": layer.bias} if affine else {}

    def fn(inp, *ps):
        return torch.func.functional_call(layer, dict(zip(params, ps, strict=True)), (inp,))

    assert torch.autograd.gradcheck(fn, (x, *params.values()))


def _smooth_tiny_net(bn2d: type[nn.Module], bn1d: type[nn.Module]) -> TinyBNNet:
    """TinyBNNet with SiLU in place of ReLU, so that the whole training step is a smooth function of the weights."""
    return TinyBNNet(bn2d, bn1d, activation=nn.SiLU)


# A float32 run of 20 SGD steps is compared with torch.nn's float64 run, and so is torch.nn's own float32 run: ours
# must stay within TORCH_FACTOR x torch's deviation from float64 (per step, per tensor) plus FLOOR x (1 + |value|).
# Comparing ours with torch's float32 run directly would judge the CPU: each CPU and thread count rounds the float32
# conv, linear and SGD kernels differently, and a ReLU whose input lies within rounding of 0 gates differently in
# the two runs (seen on a 2-core AMD EPYC without AVX-512: torch's float32 run left float64 by 2e-2, ours by 1e-6).
# Hence SiLU: without a gate, rounding differences stay rounding-sized through all 20 steps. Over AVX-512, AVX2 and
# default kernels (ATEN_CPU_CAPABILITY) with 1 and 2 threads, the largest ratio (error / bound) measured here is 0.3;
# adding 1-ulp noise to every input and initial weight of each float32 run keeps either run's error below 7 ulps of
# (1 + |value|) and ours below 1.6x torch's. A 1e-3 relative error in BN's output, input or parameter gradient, or
# running statistics gives ratios of 12 to 90. FLOOR (16 ulps, 2e-6 for values below 1) covers a tensor whose torch
# error happens to be far below its typical size.
# float64 keeps torch.nn's float64 run as the reference with the 1e-9 tolerance (atol and rtol).
TORCH_FACTOR = 4.0
FLOOR = {torch.float32: 16 * torch.finfo(torch.float32).eps, torch.float64: 1e-9}


def _deviations(step: str, ours: dict, ref64: dict, torch_run: dict | None, dtype: torch.dtype) -> list[tuple]:
    """One row per tensor: (step, name, ours' max error, torch's max error, bound at ours' worst element, ratio)."""
    rows = []
    for name, truth in ref64.items():
        if not truth.is_floating_point():
            assert torch.equal(ours[name], truth), f"step {step}: {name} {ours[name]} != {truth}"
            continue
        err = (ours[name].double() - truth).abs()
        torch_err = 0.0 if torch_run is None else (torch_run[name].double() - truth).abs().max().item()
        bound = TORCH_FACTOR * torch_err + FLOOR[dtype] * (1 + truth.abs())
        ratio = err / bound
        worst = int(ratio.argmax())
        rows.append((step, name, err.max().item(), torch_err, bound.flatten()[worst].item(), ratio.max().item()))
    return rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_training_equivalence_20_sgd_steps(dtype):
    torch.manual_seed(0)
    nets = {"ours": _smooth_tiny_net(B.BatchNorm2d, B.BatchNorm1d).to(dtype)}
    ref64 = _smooth_tiny_net(nn.BatchNorm2d, nn.BatchNorm1d)
    ref64.load_state_dict(nets["ours"].state_dict())  # the same float32-representable start for every run
    ref64.double()
    if dtype != torch.float64:
        nets["torch"] = _smooth_tiny_net(nn.BatchNorm2d, nn.BatchNorm1d).to(dtype)
        nets["torch"].load_state_dict(nets["ours"].state_dict())
    nets["float64"] = ref64
    opts = {k: torch.optim.SGD(n.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4) for k, n in nets.items()}
    g = torch.Generator().manual_seed(1)
    rows = []
    for step in range(20):
        x = torch.randn(16, 3, 8, 8, generator=g).to(dtype)  # float32-representable, so every run sees the same x
        target = torch.randint(0, 5, (16,), generator=g)
        for key, net in nets.items():
            opts[key].zero_grad()
            nn.functional.cross_entropy(net(x.to(next(net.parameters()).dtype)), target).backward()
            opts[key].step()
        states = {key: net.state_dict() for key, net in nets.items()}
        rows += _deviations(str(step), states["ours"], states["float64"], states.get("torch"), dtype)
    assert int(nets["ours"].features[1].num_batches_tracked) == 20
    x = torch.randn(4, 3, 8, 8).to(dtype)
    with torch.no_grad():
        outs = {key: {"logits": net.eval()(x.to(next(net.parameters()).dtype))} for key, net in nets.items()}
    rows += _deviations("eval", outs["ours"], outs["float64"], outs.get("torch"), dtype)
    table = [f"{'step':>5} {'tensor':<24} {'ours-f64':>9} {'torch-f64':>9} {'bound':>9} {'ratio':>6}"]
    table += [f"{s:>5} {n:<24} {e:9.2e} {t:9.2e} {b:9.2e} {r:6.2f}" for s, n, e, t, b, r in rows]
    print("\n".join(table))  # pytest shows it when the test fails
    failed = [line for line, row in zip(table[1:], rows, strict=True) if not row[-1] <= 1.0]
    if failed:
        pytest.fail("beyond the bound (ratio > 1):\n" + "\n".join([table[0], *failed[:20]]))


@pytest.mark.parametrize("track", [True, False])
def test_state_dict_loads_both_ways(track):
    ref = nn.BatchNorm2d(5, track_running_stats=track)
    ref.train()
    ref(torch.randn(8, 5, 3, 3))
    ours = B.BatchNorm2d(5, track_running_stats=track)
    ours.load_state_dict(ref.state_dict(), strict=True)
    back = nn.BatchNorm2d(5, track_running_stats=track)
    back.load_state_dict(ours.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    ours.eval()
    ref.eval()
    x = torch.randn(2, 5, 3, 3)
    torch.testing.assert_close(ours(x), ref(x))


def test_old_state_dict_without_num_batches_tracked_loads():
    sd = nn.BatchNorm1d(3).state_dict()
    del sd["num_batches_tracked"]
    ours = B.BatchNorm1d(3)
    ours.load_state_dict(sd, strict=False)  # torch's _load_from_state_dict fills in the counter
    assert int(ours.num_batches_tracked) == 0


def test_is_found_by_tools_that_look_for_batchnorm():
    layers = [B.BatchNorm1d(2), B.BatchNorm2d(2), B.BatchNorm3d(2)]
    assert all(isinstance(m, _BatchNorm) for m in layers)
    assert isinstance(layers[1], nn.BatchNorm2d)  # user init code `if isinstance(m, nn.BatchNorm2d)` works
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(B.BatchNorm2d(2)))
    assert isinstance(converted[0], nn.SyncBatchNorm)


def test_device_and_dtype_arguments():
    layer = B.BatchNorm2d(3, device="cpu", dtype=torch.float64)
    assert layer.weight.dtype == layer.running_mean.dtype == torch.float64
    y = layer(torch.randn(2, 3, 2, 2, dtype=torch.float64))
    assert y.dtype == torch.float64


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "layer,shape,expected",
    [
        (B.BatchNorm1d(4), (2, 4, 3, 3), r"\(N, C\) or \(N, C, L\)"),
        (B.BatchNorm2d(4), (2, 4, 3), r"\(N, C, H, W\)"),
        (B.BatchNorm3d(4), (2, 4, 3, 3), r"\(N, C, D, H, W\)"),
    ],
)
def test_wrong_number_of_dims_names_expected_shape(layer, shape, expected):
    with pytest.raises(ValueError, match=expected):
        layer(torch.randn(shape))


def test_wrong_channel_count_is_clear():
    with pytest.raises(ValueError, match=r"BatchNorm2d\(4\) expects 4 channels.*\(2, 3, 5, 5\)"):
        B.BatchNorm2d(4)(torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match="expects 4 channels"):
        B.BatchNorm2d(4).eval()(torch.randn(2, 3, 5, 5))


@pytest.mark.parametrize("layer,shape", [(B.BatchNorm1d(3), (1, 3)), (B.BatchNorm2d(3), (1, 3, 1, 1))])
def test_single_value_per_channel_in_training_names_the_layer(layer, shape):
    with pytest.raises(ValueError, match=r"BatchNorm\dd\(3\): expected more than 1 value per channel"):
        layer(torch.randn(shape))
    assert int(layer.num_batches_tracked) == 0  # nothing was half-updated


def test_eval_with_batch_size_one_and_batch_one_with_length_in_training():
    layer = B.BatchNorm1d(3)
    layer(torch.randn(1, 3, 4))  # (N=1, L=4): 4 values per channel is fine in training
    layer.eval()
    assert layer(torch.randn(1, 3)).shape == (1, 3)


def test_empty_batch_matches_torch():
    ours, ref = B.BatchNorm2d(3), nn.BatchNorm2d(3)
    x = torch.randn(0, 3, 2, 2, requires_grad=True)
    y = ours(x)
    ref(x.detach())
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    for a, b in zip(ours.buffers(), ref.buffers(), strict=True):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- last batch statistics


def test_last_batch_stats_hold_what_the_forward_used():
    layer = B.BatchNorm2d(4)
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64).float() * 3 + 1
    layer(x)
    stats = layer.last_batch_stats
    x64 = x.double()
    torch.testing.assert_close(stats.mean.double(), x64.mean((0, 2, 3)), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(stats.var.double(), x64.var((0, 2, 3), unbiased=False), atol=1e-5, rtol=1e-5)
    assert stats.count == 6 * 9
    assert not stats.mean.requires_grad
    layer.eval()
    layer(x)
    assert layer.last_batch_stats is None


def test_last_batch_stats_are_not_in_state_dict_and_survive_deepcopy():
    layer = B.BatchNorm1d(2)
    layer(torch.randn(4, 2))
    assert "last_batch_stats" not in layer.state_dict()
    clone = copy.deepcopy(layer)
    assert isinstance(clone, ScratchBatchNormMixin)
    torch.testing.assert_close(clone.last_batch_stats.mean, layer.last_batch_stats.mean)
