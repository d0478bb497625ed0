"""BatchRenorm1d/2d against Ioffe (2017) written out in float64 here, and against torch.nn for bounds 1 and 0."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bn_lightning as B
from tests.helpers.ddp import run_distributed

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-10, rtol=1e-10)}
F64 = TOL[torch.float64]
EPS = 1e-5


def _dims(x):
    return (0, *range(2, x.dim()))


def _view(t, x):
    return t.view((1, -1) + (1,) * (x.dim() - 2))


def renorm_reference(x, weight, bias, running_mean, running_var, r_max, d_max, eps=EPS):
    """Batch Renormalization's training forward; differentiable, with r and d DETACHED (constants in backward)."""
    dims = _dims(x)
    mu = x.mean(dims)
    sigma_b = torch.sqrt(x.var(dims, correction=0) + eps)
    sigma_r = torch.sqrt(running_var + eps)
    r = (sigma_b / sigma_r).detach().clamp(1 / r_max, r_max)
    d = ((mu - running_mean) / sigma_r).detach().clamp(-d_max, d_max)
    x_hat = (x - _view(mu, x)) / _view(sigma_b, x)
    y = x_hat * _view(r, x) + _view(d, x)
    if weight is not None:
        y = y * _view(weight, x) + _view(bias, x)
    return y


def raw_r_d(x, running_mean, running_var, eps=EPS):
    """Unclipped r and d, to check which regime a test exercises."""
    x = x.double()
    sigma_b = torch.sqrt(x.var(_dims(x), correction=0) + eps)
    sigma_r = torch.sqrt(running_var.double() + eps)
    return sigma_b / sigma_r, (x.mean(_dims(x)) - running_mean.double()) / sigma_r


def _input(shape, seed, dtype=torch.float64, scale=None, shift=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if scale is not None:
        x = x * _view(torch.tensor(scale, dtype=torch.float64), x) + _view(torch.tensor(shift, dtype=torch.float64), x)
    return x.to(dtype)


def _layer(cls, running_mean, running_var, dtype=torch.float64, momentum=0.1, **kwargs):
    c = len(running_mean)
    layer = cls(c, momentum=momentum, dtype=dtype, **kwargs)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        if layer.affine:
            layer.weight.copy_(torch.rand(c, generator=g, dtype=dtype) + 0.5)
            layer.bias.copy_(torch.randn(c, generator=g, dtype=dtype))
        layer.running_mean.copy_(torch.tensor(running_mean, dtype=dtype))
        layer.running_var.copy_(torch.tensor(running_var, dtype=dtype))
    return layer


# Four channels, each in its own regime: unclipped, r clipped at r_max, r clipped at 1/r_max, d clipped at +-d_max.
SCALE, SHIFT = [1.0, 4.0, 0.2, 1.0], [0.3, 0.0, 0.0, 9.0]
RUNNING_MEAN, RUNNING_VAR = [0.0, 0.0, 0.0, -1.0], [1.5, 0.5, 1.0, 0.8]
R_MAX, D_MAX = 2.0, 1.5


@pytest.mark.parametrize(
    ("cls", "shape"), [(B.BatchRenorm1d, (32, 4)), (B.BatchRenorm1d, (8, 4, 5)), (B.BatchRenorm2d, (6, 4, 3, 3))]
)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_matches_float64_reference_in_clipped_and_unclipped_regimes(cls, shape, affine):
    x = _input(shape, 0, scale=SCALE, shift=SHIFT)
    rm, rv = torch.tensor(RUNNING_MEAN, dtype=torch.float64), torch.tensor(RUNNING_VAR, dtype=torch.float64)
    r, d = raw_r_d(x, rm, rv)
    # the regimes the channels are meant to exercise
    assert 1 / R_MAX < r[0] < R_MAX and abs(d[0]) < D_MAX and d[0] != 0
    assert r[1] > R_MAX and r[2] < 1 / R_MAX and d[3] > D_MAX

    layer = _layer(cls, RUNNING_MEAN, RUNNING_VAR, r_max=R_MAX, d_max=D_MAX, affine=affine)
    weight = layer.weight.detach().clone().requires_grad_() if affine else None
    bias = layer.bias.detach().clone().requires_grad_() if affine else None
    grad = _input(shape, 1)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = layer(xa)
    y_ref = renorm_reference(xb, weight, bias, rm, rv, R_MAX, D_MAX)
    y.backward(grad)
    y_ref.backward(grad)

    torch.testing.assert_close(y, y_ref, **F64, msg="output")
    torch.testing.assert_close(xa.grad, xb.grad, **F64, msg="input grad")
    if affine:
        torch.testing.assert_close(layer.weight.grad, weight.grad, **F64, msg="weight grad")
        torch.testing.assert_close(layer.bias.grad, bias.grad, **F64, msg="bias grad")
    # running statistics: plain BN's update, from the batch statistics (not the renormalised ones)
    torch.testing.assert_close(layer.running_mean, 0.9 * rm + 0.1 * x.mean(_dims(x)), **F64)
    torch.testing.assert_close(layer.running_var, 0.9 * rv + 0.1 * x.var(_dims(x), correction=1), **F64)
    assert int(layer.num_batches_tracked) == 1


def test_output_matches_hand_formula_per_channel():
    # y = (x_hat * r + d) * gamma + beta with r and d clipped by hand, channel by channel
    x = _input((32, 4), 3, scale=SCALE, shift=SHIFT)
    layer = _layer(B.BatchRenorm1d, RUNNING_MEAN, RUNNING_VAR, r_max=R_MAX, d_max=D_MAX)
    y = layer(x).detach()
    gamma, beta = layer.weight.detach(), layer.bias.detach()
    for c in range(4):
        col = x[:, c]
        mu, sigma_b = col.mean(), torch.sqrt(col.var(correction=0) + EPS)
        sigma_r = (RUNNING_VAR[c] + EPS) ** 0.5
        r = min(max(float(sigma_b) / sigma_r, 1 / R_MAX), R_MAX)
        d = min(max((float(mu) - RUNNING_MEAN[c]) / sigma_r, -D_MAX), D_MAX)
        expected = ((col - mu) / sigma_b * r + d) * gamma[c] + beta[c]
        torch.testing.assert_close(y[:, c], expected, **F64, msg=f"channel {c}")
    assert torch.isclose(y[:, 3].mean(), D_MAX * gamma[3] + beta[3])  # d clipped at +d_max


@pytest.mark.parametrize(
    ("renorm_cls", "torch_cls", "shape"),
    [
        (B.BatchRenorm1d, nn.BatchNorm1d, (16, 4)),
        (B.BatchRenorm1d, nn.BatchNorm1d, (6, 4, 3)),
        (B.BatchRenorm2d, nn.BatchNorm2d, (5, 4, 3, 3)),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_unit_bounds_equal_torch_batchnorm(renorm_cls, torch_cls, shape, dtype):
    # far-off running statistics: with r_max=1, d_max=0 they must not matter
    layer = _layer(renorm_cls, [3.0, -2.0, 0.5, 1.0], [9.0, 0.1, 4.0, 1.0], dtype=dtype, r_max=1.0, d_max=0.0)
    ref = torch_cls(4, dtype=dtype)
    ref.load_state_dict(layer.state_dict())
    for step in range(3):
        x, grad = _input(shape, step, dtype), _input(shape, step + 10, dtype)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, y_ref = layer(xa), ref(xb)
        y.backward(grad)
        y_ref.backward(grad)
        torch.testing.assert_close(y, y_ref, **TOL[dtype])
        torch.testing.assert_close(xa.grad, xb.grad, **TOL[dtype])
    for (name, a), (_, b) in zip(layer.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, **TOL[dtype], msg=name)
    for (name, a), (_, b) in zip(layer.named_buffers(), ref.named_buffers(), strict=True):
        torch.testing.assert_close(a, b, **TOL[dtype], msg=name)


def test_current_bounds_warmup_ramp():
    layer = B.BatchRenorm1d(3, r_max=3.0, d_max=5.0, warmup_steps=10)
    expected = {0: (1.0, 0.0), 5: (2.0, 2.5), 10: (3.0, 5.0), 25: (3.0, 5.0)}
    for nbt, bounds in expected.items():
        layer.num_batches_tracked.fill_(nbt)
        assert layer.current_bounds() == pytest.approx(bounds)
    assert B.BatchRenorm1d(3, r_max=2.5, d_max=4.0).current_bounds() == (2.5, 4.0)  # no warmup


def test_forward_uses_bounds_of_the_step_before_counting_it():
    x = _input((32, 4), 0, scale=SCALE, shift=SHIFT)
    rm, rv = torch.tensor(RUNNING_MEAN, dtype=torch.float64), torch.tensor(RUNNING_VAR, dtype=torch.float64)
    layer = _layer(B.BatchRenorm1d, RUNNING_MEAN, RUNNING_VAR, r_max=3.0, d_max=5.0, warmup_steps=8)
    layer.num_batches_tracked.fill_(4)  # half way: r_max 2, d_max 2.5
    y = layer(x)
    expected = renorm_reference(x, layer.weight, layer.bias, rm, rv, 2.0, 2.5)
    torch.testing.assert_close(y, expected, **F64)
    assert int(layer.num_batches_tracked) == 5

    fresh = _layer(B.BatchRenorm1d, RUNNING_MEAN, RUNNING_VAR, r_max=3.0, d_max=5.0, warmup_steps=8)
    plain = F.batch_norm(x, None, None, fresh.weight, fresh.bias, training=True, eps=EPS)
    torch.testing.assert_close(fresh(x), plain, **F64)  # step 0 of the warmup is plain BN


@pytest.mark.parametrize("cls, shape", [(B.BatchRenorm1d, (8, 4)), (B.BatchRenorm2d, (4, 4, 3, 3))])
def test_eval_uses_running_statistics(cls, shape):
    layer = _layer(cls, RUNNING_MEAN, RUNNING_VAR, r_max=R_MAX, d_max=D_MAX).eval()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = _input(shape, 0)
    expected = F.batch_norm(x, before["running_mean"], before["running_var"], layer.weight, layer.bias, eps=EPS)
    torch.testing.assert_close(layer(x), expected, **F64)
    for name, value in layer.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert layer.last_batch_stats is None


def test_track_running_stats_false_raises():
    with pytest.raises(ValueError, match="track_running_stats"):
        B.BatchRenorm2d(4, track_running_stats=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r_max": 0.5}, "r_max"),
        ({"r_max": float("nan")}, "r_max"),
        ({"d_max": -0.1}, "d_max"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": 2.5}, "warmup_steps"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        B.BatchRenorm1d(4, **kwargs)


def test_bad_input_shape_raises():
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        B.BatchRenorm2d(4)(torch.randn(2, 4, 3))


def test_repr_and_state_dict():
    layer = B.BatchRenorm2d(4, r_max=2, d_max=1, warmup_steps=3)
    assert repr(layer).endswith("r_max=2.0, d_max=1.0, warmup_steps=3)")
    assert sorted(layer.state_dict()) == sorted(nn.BatchNorm2d(4).state_dict())
    assert isinstance(layer, nn.modules.batchnorm._BatchNorm)


@pytest.mark.parametrize(
    ("r_max", "d_max", "running_mean", "running_var"),
    [
        (1.0, 0.0, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]),  # plain BN
        (2.0, 0.5, [-50.0, 5.0, 50.0], [100.0, 0.01, 100.0]),  # every r and d clipped: locally constant, exact grads
    ],
    ids=["unit_bounds", "all_clipped"],
)
def test_gradcheck_training_mode(r_max, d_max, running_mean, running_var):
    layer = _layer(B.BatchRenorm2d, running_mean, running_var, momentum=0.0, r_max=r_max, d_max=d_max)
    x = _input((3, 3, 2, 2), 0).requires_grad_()
    r, d = raw_r_d(x.detach(), layer.running_mean, layer.running_var)
    if r_max > 1:
        assert ((r > r_max) | (r < 1 / r_max)).all() and (d.abs() > d_max).all()
    weight = layer.weight.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()

    def fn(x, weight, bias):
        return torch.func.functional_call(layer, {"weight": weight, "bias": bias}, (x,))

    assert torch.autograd.gradcheck(fn, (x, weight, bias))
    # momentum 0: the buffers the bounds are computed from did not move between evaluations
    assert torch.equal(layer.running_mean, torch.tensor(running_mean, dtype=torch.float64))


@pytest.mark.parametrize("cls, shape", [(B.BatchRenorm1d, (16, 4)), (B.BatchRenorm2d, (4, 4, 3, 3))])
def test_sync_without_process_group_is_local(cls, shape):
    local = _layer(cls, RUNNING_MEAN, RUNNING_VAR, r_max=R_MAX, d_max=D_MAX)
    synced = _layer(cls, RUNNING_MEAN, RUNNING_VAR, r_max=R_MAX, d_max=D_MAX, sync=True)
    assert synced.sync and not local.sync
    x, grad = _input(shape, 0, scale=SCALE, shift=SHIFT), _input(shape, 1)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = local(xa), synced(xb)
    ya.backward(grad)
    yb.backward(grad)
    torch.testing.assert_close(yb, ya, atol=0, rtol=0)
    torch.testing.assert_close(xb.grad, xa.grad, atol=0, rtol=0)
    for (name, a), (_, b) in zip(local.named_parameters(), synced.named_parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, atol=0, rtol=0, msg=name)
    for (name, a), (_, b) in zip(local.named_buffers(), synced.named_buffers(), strict=True):
        torch.testing.assert_close(b, a, atol=0, rtol=0, msg=name)


# ---------------------------------------------------------------- 2 gloo processes


SIZES = [5, 3]  # uneven: the merge must weight the ranks by their counts
DDP_SHAPE = (sum(SIZES), 4, 3, 3)


def _sync_worker(rank, world):
    layer = _layer(B.BatchRenorm2d, RUNNING_MEAN, RUNNING_VAR, r_max=R_MAX, d_max=D_MAX, sync=True)
    start = sum(SIZES[:rank])
    x = _input(DDP_SHAPE, 0, scale=SCALE, shift=SHIFT)[start : start + SIZES[rank]].clone().requires_grad_()
    grad = _input(DDP_SHAPE, 1)[start : start + SIZES[rank]]
    y = layer(x)
    y.backward(grad)
    return {
        "y": y.detach(),
        "grad_x": x.grad,
        "grad_w": layer.weight.grad,
        "grad_b": layer.bias.grad,
        "buffers": dict(layer.named_buffers()),
    }


@pytest.mark.ddp
def test_sync_two_processes_match_one_process_on_concatenated_batch():
    results = run_distributed(_sync_worker, 2)
    layer = _layer(B.BatchRenorm2d, RUNNING_MEAN, RUNNING_VAR, r_max=R_MAX, d_max=D_MAX)
    x = _input(DDP_SHAPE, 0, scale=SCALE, shift=SHIFT).requires_grad_()
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()
    weight = layer.weight.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    y = renorm_reference(x, weight, bias, rm, rv, R_MAX, D_MAX)
    y.backward(_input(DDP_SHAPE, 1))

    torch.testing.assert_close(torch.cat([r["y"] for r in results]), y.detach(), **F64)
    torch.testing.assert_close(torch.cat([r["grad_x"] for r in results]), x.grad, **F64)
    # gamma/beta gradients are each rank's share: DDP's all-reduce sums them to the global gradient
    torch.testing.assert_close(sum(r["grad_w"] for r in results), weight.grad, **F64)
    torch.testing.assert_close(sum(r["grad_b"] for r in results), bias.grad, **F64)
    xd = x.detach()
    for r in results:
        torch.testing.assert_close(r["buffers"]["running_mean"], 0.9 * rm + 0.1 * xd.mean((0, 2, 3)), **F64)
        torch.testing.assert_close(r["buffers"]["running_var"], 0.9 * rv + 0.1 * xd.var((0, 2, 3)), **F64)
        assert int(r["buffers"]["num_batches_tracked"]) == 1
