"""GhostBatchNorm1d/2d against a per-chunk loop of torch's batch norm, running statistics updated by hand in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bn_lightning as B

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-10, rtol=1e-10)}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
C = 4


def _dims(x):
    return (0, *range(2, x.dim()))


class Reference:
    """Ghost BN written out: torch's batch norm per chunk; running statistics updated per chunk, in float64."""

    def __init__(self, weight, bias, momentum, eps=1e-5):
        self.weight = weight.detach().clone().requires_grad_()
        self.bias = bias.detach().clone().requires_grad_()
        self.momentum, self.eps = momentum, eps
        self.running_mean = torch.zeros(weight.shape[0], dtype=torch.float64)
        self.running_var = torch.ones(weight.shape[0], dtype=torch.float64)
        self.num_batches_tracked = 0

    def __call__(self, x, sizes):
        assert sum(sizes) == x.shape[0]
        outputs = []
        for chunk in torch.split(x, sizes):
            outputs.append(F.batch_norm(chunk, None, None, self.weight, self.bias, training=True, eps=self.eps))
            c64 = chunk.detach().double()
            self.num_batches_tracked += 1
            f = 1.0 / self.num_batches_tracked if self.momentum is None else self.momentum
            self.running_mean = (1 - f) * self.running_mean + f * c64.mean(_dims(c64))
            self.running_var = (1 - f) * self.running_var + f * c64.var(_dims(c64), correction=1)
        return torch.cat(outputs)


def _pair(cls, vbs, dtype, momentum=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = cls(C, virtual_batch_size=vbs, momentum=momentum, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(C, generator=g, dtype=dtype) + 0.5)
        layer.bias.copy_(torch.randn(C, generator=g, dtype=dtype))
    return layer, Reference(layer.weight, layer.bias, momentum)


def _input(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1).to(dtype)


def _check_step(layer, ref, x, sizes, dtype, seed):
    grad = _input(x.shape, dtype, seed + 100)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = layer(x_ours)
    y_ref = ref(x_ref, sizes)
    y.backward(grad)
    y_ref.backward(grad)
    tol = TOL[dtype]
    torch.testing.assert_close(y, y_ref, **tol, msg="output")
    torch.testing.assert_close(x_ours.grad, x_ref.grad, **tol, msg="input grad")
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad, **tol, msg="weight grad")
    torch.testing.assert_close(layer.bias.grad, ref.bias.grad, **tol, msg="bias grad")
    torch.testing.assert_close(layer.running_mean, ref.running_mean.to(dtype), **tol, msg="running_mean")
    torch.testing.assert_close(layer.running_var, ref.running_var.to(dtype), **tol, msg="running_var")
    assert int(layer.num_batches_tracked) == ref.num_batches_tracked


# (class, input shape, virtual_batch_size, chunk sizes the documentation promises)
CASES = {
    "1d_NC_even": (B.GhostBatchNorm1d, (16, C), 4, [4, 4, 4, 4]),
    "1d_NCL_remainder": (B.GhostBatchNorm1d, (10, C, 3), 4, [4, 4, 2]),
    "2d_remainder": (B.GhostBatchNorm2d, (10, C, 3, 3), 4, [4, 4, 2]),
    "1d_NC_single_merged": (B.GhostBatchNorm1d, (9, C), 4, [4, 5]),
    "1d_NC_single_merged_into_only": (B.GhostBatchNorm1d, (5, C), 4, [5]),
    "1d_NCL_single_sample_kept": (B.GhostBatchNorm1d, (9, C, 3), 4, [4, 4, 1]),
    "2d_single_sample_kept": (B.GhostBatchNorm2d, (9, C, 2, 2), 4, [4, 4, 1]),
    "1d_vbs_equals_N": (B.GhostBatchNorm1d, (8, C), 8, [8]),
    "2d_vbs_above_N": (B.GhostBatchNorm2d, (6, C, 3, 3), 32, [6]),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "mNone"])
@DTYPES
def test_matches_per_chunk_reference(case, momentum, dtype):
    cls, shape, vbs, sizes = CASES[case]
    layer, ref = _pair(cls, vbs, dtype, momentum)
    for step in range(2):  # a second step: the running statistics and counter carry over
        layer.weight.grad = layer.bias.grad = ref.weight.grad = ref.bias.grad = None
        _check_step(layer, ref, _input(shape, dtype, seed=step), sizes, dtype, step)
    assert int(layer.num_batches_tracked) == 2 * len(sizes)


@pytest.mark.parametrize(
    ("ghost_cls", "torch_cls", "shape", "vbs"),
    [
        (B.GhostBatchNorm1d, nn.BatchNorm1d, (8, C), 8),
        (B.GhostBatchNorm1d, nn.BatchNorm1d, (6, C, 5), 32),
        (B.GhostBatchNorm2d, nn.BatchNorm2d, (5, C, 3, 3), 7),
    ],
)
def test_equals_torch_batchnorm_when_virtual_batch_covers_the_batch(ghost_cls, torch_cls, shape, vbs):
    dtype = torch.float64
    torch_bn = torch_cls(C, dtype=dtype)
    with torch.no_grad():
        torch_bn.weight.uniform_(0.5, 1.5)
        torch_bn.bias.uniform_(-1, 1)
    ghost = ghost_cls(C, virtual_batch_size=vbs, dtype=dtype)
    ghost.load_state_dict(torch_bn.state_dict())
    for seed in range(2):
        x, grad = _input(shape, dtype, seed), _input(shape, dtype, seed + 10)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, y_ref = ghost(xa), torch_bn(xb)
        y.backward(grad)
        y_ref.backward(grad)
        torch.testing.assert_close(y, y_ref, **TOL[dtype])
        torch.testing.assert_close(xa.grad, xb.grad, **TOL[dtype])
    for (name, a), (_, b) in zip(ghost.named_parameters(), torch_bn.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, **TOL[dtype], msg=name)
    for (name, a), (_, b) in zip(ghost.named_buffers(), torch_bn.named_buffers(), strict=True):
        torch.testing.assert_close(a, b, **TOL[dtype], msg=name)


@pytest.mark.parametrize("cls, shape", [(B.GhostBatchNorm1d, (12, C)), (B.GhostBatchNorm2d, (12, C, 3, 3))])
def test_eval_uses_running_statistics(cls, shape):
    dtype = torch.float64
    layer, _ = _pair(cls, 4, dtype)
    layer(_input(shape, dtype, 0))  # move the running statistics off (0, 1)
    layer.eval()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = _input(shape, dtype, 1)
    expected = F.batch_norm(x, before["running_mean"], before["running_var"], layer.weight, layer.bias, False)
    torch.testing.assert_close(layer(x), expected, **TOL[dtype])
    assert layer.last_batch_stats is None
    for name, value in layer.state_dict().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize(
    ("cls", "shape", "vbs"),
    [
        (B.GhostBatchNorm1d, (10, C, 3), 4),
        (B.GhostBatchNorm1d, (9, C), 4),
        (B.GhostBatchNorm2d, (9, C, 2, 2), 4),
        (B.GhostBatchNorm2d, (6, C, 2, 2), 32),
    ],
)
def test_last_batch_stats_are_whole_batch_stats(cls, shape, vbs):
    layer = cls(C, virtual_batch_size=vbs, dtype=torch.float64)
    x = _input(shape, torch.float64, 0)
    layer(x)
    stats = layer.last_batch_stats
    torch.testing.assert_close(stats.mean, x.mean(_dims(x)), **TOL[torch.float64])
    torch.testing.assert_close(stats.var, x.var(_dims(x), correction=0), **TOL[torch.float64])
    assert int(stats.count) == x.numel() // C


def test_track_running_stats_false_uses_virtual_batches_without_buffers():
    layer = B.GhostBatchNorm1d(C, virtual_batch_size=4, track_running_stats=False, dtype=torch.float64)
    assert layer.running_mean is None and layer.num_batches_tracked is None
    x = _input((8, C), torch.float64, 0)
    expected = torch.cat([F.batch_norm(c, None, None, training=True) for c in x.split(4)])
    torch.testing.assert_close(layer(x), expected, **TOL[torch.float64])


def test_single_sample_batch_raises_in_training():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        B.GhostBatchNorm1d(C, virtual_batch_size=4)(torch.randn(1, C))


@pytest.mark.parametrize("vbs", [0, -2, 2.0, "4", None])
def test_bad_virtual_batch_size_raises(vbs):
    with pytest.raises(ValueError, match="virtual_batch_size"):
        B.GhostBatchNorm2d(C, virtual_batch_size=vbs)


@pytest.mark.parametrize(
    ("cls", "shape"),
    [(B.GhostBatchNorm1d, (8, C, 2, 2)), (B.GhostBatchNorm2d, (8, C)), (B.GhostBatchNorm2d, (40, 3, 2, 2))],
)
def test_bad_input_shape_raises(cls, shape):
    with pytest.raises(ValueError, match="expects"):
        cls(C, virtual_batch_size=4)(torch.randn(shape))


def test_repr_and_defaults():
    layer = B.GhostBatchNorm2d(3)
    assert layer.virtual_batch_size == 32
    assert repr(layer).startswith("GhostBatchNorm2d(3, eps=1e-05, momentum=0.1")
    assert repr(layer).endswith("virtual_batch_size=32)")
    assert isinstance(layer, nn.modules.batchnorm._BatchNorm)
    assert sorted(layer.state_dict()) == sorted(nn.BatchNorm2d(3).state_dict())


def test_eval_without_running_stats_normalises_the_whole_batch():
    layer = B.GhostBatchNorm2d(3, virtual_batch_size=2, track_running_stats=False, dtype=torch.float64).eval()
    x = torch.randn(8, 3, 2, 2, dtype=torch.float64)
    expected = torch.nn.functional.batch_norm(x, None, None, layer.weight, layer.bias, training=True, eps=layer.eps)
    torch.testing.assert_close(layer(x), expected)
    assert isinstance(layer.last_batch_stats.count, int)
