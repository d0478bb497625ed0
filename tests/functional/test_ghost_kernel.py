"""Ghost BN's one-Function kernel against the sequential behaviour it replaces, and against float64 math.

The sequential reference is written out here: bn_lightning's plain BatchNorm1d/2d applied to each virtual batch in
turn (each call its own forward, autograd node and running-statistics update), outputs concatenated. Where Ghost BN
runs the plain kernels on each virtual batch's view, outputs, gradients and buffers must be bit for bit the same
(torch.equal). Where it runs the grouped kernels (every virtual batch at once: NCHW, equal virtual batches, rows of
>= 64 values), the same formulas run on ``(G, C)`` instead of ``(C,)`` per-channel tensors, whose elementwise ops may
round differently on another CPU (vector lanes against scalar tails): there they must agree to float32 rounding of
the per-channel coefficients (a few ulps of outputs of magnitude <= 10: within 1e-5), and both are checked against
float64 math.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import bn_lightning as B
from bn_lightning import functional as BF

C = 4
PLAIN = {B.GhostBatchNorm1d: B.BatchNorm1d, B.GhostBatchNorm2d: B.BatchNorm2d}
CL = torch.channels_last

# (class, input shape, virtual_batch_size, virtual batch sizes, memory format, mean offset). Row lengths >= 64 reach
# the CPU fast paths of the statistics kernels; "blocked" has virtual batches above the kernels' cache block; a mean
# offset of 3 std (10 on channel 0) takes the centred path, 1e4 the offset pass.
CASES = {
    "2d_even": (B.GhostBatchNorm2d, (16, C, 8, 8), 4, [4, 4, 4, 4], None, 0.0),
    "2d_remainder": (B.GhostBatchNorm2d, (10, C, 8, 8), 4, [4, 4, 2], None, 0.0),
    "2d_small_spatial": (B.GhostBatchNorm2d, (10, C, 3, 3), 4, [4, 4, 2], None, 0.0),
    "2d_single_sample_kept": (B.GhostBatchNorm2d, (9, C, 2, 2), 4, [4, 4, 1], None, 0.0),
    "2d_channels_last": (B.GhostBatchNorm2d, (16, 8, 8, 8), 4, [4, 4, 4, 4], CL, 0.0),
    "2d_channels_last_remainder": (B.GhostBatchNorm2d, (11, 8, 4, 4), 4, [4, 4, 3], CL, 0.0),
    "2d_centred": (B.GhostBatchNorm2d, (12, C, 8, 8), 4, [4, 4, 4], None, 3.0),
    "2d_offset_pass": (B.GhostBatchNorm2d, (12, C, 8, 8), 4, [4, 4, 4], None, 1e4),
    "2d_blocked": (B.GhostBatchNorm2d, (48, 32, 32, 32), 24, [24, 24], None, 0.0),
    "1d_NC_remainder": (B.GhostBatchNorm1d, (10, C), 4, [4, 4, 2], None, 0.0),
    "1d_NC_single_merged": (B.GhostBatchNorm1d, (9, C), 4, [4, 5], None, 0.0),
    "1d_NCL": (B.GhostBatchNorm1d, (10, C, 70), 4, [4, 4, 2], None, 0.0),
    "1d_NCL_even": (B.GhostBatchNorm1d, (8, C, 128), 4, [4, 4], None, 0.0),
    # rows of 67 values (a prime) and 2048 channels: no shift plane fits, the grouped kernels multiply then add
    "1d_NCL_even_no_plane": (B.GhostBatchNorm1d, (8, 2048, 67), 4, [4, 4], None, 0.0),
}
# the cases the grouped kernels serve (checked below)
GROUPED = {"2d_even", "2d_centred", "2d_blocked", "1d_NCL_even", "1d_NCL_even_no_plane"}
CLOSE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-12, rtol=1e-12)}
CONFIGS = {
    "default": dict(momentum=0.1, affine=True, track_running_stats=True),
    "momentum_None": dict(momentum=None, affine=True, track_running_stats=True),
    "affine_False": dict(momentum=0.1, affine=False, track_running_stats=True),
    "untracked": dict(momentum=0.1, affine=True, track_running_stats=False),
}


def _input(shape, dtype, seed, fmt=None, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5
    if offset:
        x[:, 0] += 10.0 if offset < 100 else 0.0  # one channel far off centre, the others by `offset` std
        x[:, 1:] = x[:, 1:] * 0.5 + offset
    x = x.to(dtype)
    return x.contiguous(memory_format=fmt) if fmt is not None else x


def _layers(cls, c, vbs, dtype, config, seed=0):
    ghost = cls(c, virtual_batch_size=vbs, dtype=dtype, **config)
    if ghost.affine:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            ghost.weight.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
            ghost.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64))
    plain = PLAIN[cls](c, dtype=dtype, **config)
    plain.load_state_dict(ghost.state_dict())
    return ghost, plain


def _sequential(plain, x, sizes):
    """The sequential behaviour: one plain BN call per virtual batch, in order, outputs concatenated."""
    return torch.cat([plain(chunk) for chunk in x.split(sizes)])


def _assert_steps_equal(ghost, plain, x, sizes, grad, x_requires_grad=True, exact=True):
    x_g, x_p = x.clone().requires_grad_(x_requires_grad), x.clone().requires_grad_(x_requires_grad)
    y_g, y_p = ghost(x_g), _sequential(plain, x_p, sizes)
    y_g.backward(grad)
    y_p.backward(grad)

    def same(a, b, what):
        if exact:
            assert torch.equal(a, b), what
        else:
            torch.testing.assert_close(a, b, **CLOSE[x.dtype], msg=what)

    same(y_g, y_p, "output")
    assert y_g.dtype == x.dtype and y_g.stride() == y_p.stride(), "output dtype and memory format"
    if x.is_contiguous() or x.is_contiguous(memory_format=CL):
        assert y_g.stride() == x.stride(), "the output keeps the input's memory format"
    if x_requires_grad:
        same(x_g.grad, x_p.grad, "input grad")
    for (name, a), (_, b) in zip(ghost.named_parameters(), plain.named_parameters(), strict=True):
        same(a.grad, b.grad, f"{name} grad")
    for (name, a), (_, b) in zip(ghost.named_buffers(), plain.named_buffers(), strict=True):
        if a.is_floating_point():
            same(a, b, name)
        else:
            assert torch.equal(a, b), name


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_matches_the_sequential_per_virtual_batch_behaviour(case, config, dtype):
    cls, shape, vbs, sizes, fmt, offset = CASES[case]
    ghost, plain = _layers(cls, shape[1], vbs, dtype, CONFIGS[config])
    for step in range(2):  # the running statistics and the counter carry over
        for p in (*ghost.parameters(), *plain.parameters()):
            p.grad = None
        x, grad = _input(shape, dtype, step, fmt, offset), _input(shape, dtype, step + 10, fmt)
        _assert_steps_equal(ghost, plain, x, sizes, grad, exact=case not in GROUPED)
    if ghost.track_running_stats:
        assert int(ghost.num_batches_tracked) == 2 * len(sizes)


@pytest.mark.parametrize("case", ["2d_remainder", "2d_channels_last", "1d_NC_single_merged", "1d_NCL"])
def test_last_batch_stats_are_the_whole_batch_in_float64(case):
    cls, shape, vbs, _, fmt, offset = CASES[case]
    ghost, _ = _layers(cls, shape[1], vbs, torch.float64, CONFIGS["default"])
    x = _input(shape, torch.float64, 3, fmt, offset)
    ghost(x)
    dims = (0, *range(2, x.dim()))
    stats = ghost.last_batch_stats
    torch.testing.assert_close(stats.mean, x.mean(dims), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(stats.var, x.var(dims, correction=0), atol=1e-12, rtol=1e-12)
    assert isinstance(stats.count, int) and stats.count == x.numel() // x.shape[1]


def test_input_without_grad_gives_the_same_parameter_grads():
    ghost, plain = _layers(B.GhostBatchNorm2d, C, 4, torch.float32, CONFIGS["default"])
    x, grad = _input((10, C, 8, 8), torch.float32, 0), _input((10, C, 8, 8), torch.float32, 1)
    _assert_steps_equal(ghost, plain, x, [4, 4, 2], grad, x_requires_grad=False)


def test_non_dense_input_takes_the_per_virtual_batch_path_with_the_same_results():
    ghost, plain = _layers(B.GhostBatchNorm2d, C, 4, torch.float32, CONFIGS["default"])
    x = _input((10, C, 8, 16), torch.float32, 0)[..., ::2]  # every other column: no dense layout
    grad = _input((10, C, 8, 8), torch.float32, 1)
    _assert_steps_equal(ghost, plain, x, [4, 4, 2], grad)


def test_bf16_autocast_matches_the_sequential_behaviour_under_the_same_autocast():
    ghost, plain = _layers(B.GhostBatchNorm2d, 8, 4, torch.float32, CONFIGS["default"])
    x, grad = _input((10, 8, 8, 8), torch.bfloat16, 0), _input((10, 8, 8, 8), torch.bfloat16, 1)
    x_g, x_p = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what a conv under autocast hands to BN
        y_g, y_p = ghost(x_g), _sequential(plain, x_p, [4, 4, 2])
    y_g.backward(grad)
    y_p.backward(grad)
    assert y_g.dtype == x_g.grad.dtype == torch.bfloat16 and ghost.running_mean.dtype == torch.float32
    assert torch.equal(y_g, y_p) and torch.equal(x_g.grad, x_p.grad)
    assert torch.equal(ghost.weight.grad, plain.weight.grad) and torch.equal(ghost.bias.grad, plain.bias.grad)
    assert torch.equal(ghost.running_mean, plain.running_mean) and torch.equal(ghost.running_var, plain.running_var)


def _tiny(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(7, 3, 2, generator=g, dtype=torch.float64).requires_grad_()
    w = (torch.rand(3, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, generator=g, dtype=torch.float64).requires_grad_()
    return x, w, b


def _ghost_fn(x, w, b):
    return BF.ghost_batch_norm_with_stats(x, 3, None, None, w, b)[0]  # virtual batches of 3, 3 and 1 samples


def test_gradcheck_and_gradgradcheck_float64():
    inputs = _tiny()
    assert torch.autograd.gradcheck(_ghost_fn, inputs)
    assert torch.autograd.gradgradcheck(_ghost_fn, inputs)  # double backward: the composite backward


def test_batched_grads_match_one_gradient_at_a_time():
    x, w, b = _tiny()
    y = _ghost_fn(x, w, b)
    grads = torch.randn(2, *y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(5))
    batched = torch.autograd.grad(y, (x, w, b), grads, is_grads_batched=True, retain_graph=True)
    for i in range(2):
        single = torch.autograd.grad(y, (x, w, b), grads[i], retain_graph=True)
        for got, want in zip(batched, single, strict=True):
            torch.testing.assert_close(got[i], want, atol=1e-12, rtol=1e-12)


def test_forward_ad_matches_the_sequential_behaviour():
    ghost, plain = _layers(B.GhostBatchNorm1d, 3, 3, torch.float64, CONFIGS["default"])
    x, _, _ = _tiny()
    tangent = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(9))
    with fwAD.dual_level():
        y_g = fwAD.unpack_dual(ghost(fwAD.make_dual(x.detach(), tangent)))
        y_p = fwAD.unpack_dual(_sequential(plain, fwAD.make_dual(x.detach(), tangent), [3, 3, 1]))
    torch.testing.assert_close(y_g.primal, y_p.primal, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(y_g.tangent, y_p.tangent, atol=1e-12, rtol=1e-12)
    assert torch.equal(ghost.running_mean, plain.running_mean) and ghost.last_batch_stats is not None


def test_functional_matches_batch_norm_with_stats_per_virtual_batch():
    x, w, b = (t.detach() for t in _tiny(1))
    x = x[..., 0].contiguous()  # (7, 3): the last sample alone would hold one value per channel
    rm, rv, nbt = torch.zeros(3, dtype=x.dtype), torch.ones(3, dtype=x.dtype), torch.tensor(0)
    ref_rm, ref_rv, ref_nbt = rm.clone(), rv.clone(), nbt.clone()
    y, stats = BF.ghost_batch_norm_with_stats(x, 2, rm, rv, w, b, None, 1e-3, nbt)  # sizes 2, 2, 3 (1 merged)
    ref = [BF.batch_norm(c, ref_rm, ref_rv, w, b, True, None, 1e-3, ref_nbt) for c in x.split([2, 2, 3])]
    assert torch.equal(y, torch.cat(ref))
    assert torch.equal(rm, ref_rm) and torch.equal(rv, ref_rv) and int(nbt) == int(ref_nbt) == 3
    torch.testing.assert_close(stats.mean, x.mean(0), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(stats.var, x.var(0, correction=0), atol=1e-12, rtol=1e-12)
    assert stats.count == 7


@pytest.mark.parametrize("case", list(CASES))
def test_the_grouped_kernels_serve_exactly_the_grouped_cases(case, monkeypatch):
    import bn_lightning.functional.ghost as ghost_module

    calls = []
    real = ghost_module.grouped_affine
    monkeypatch.setattr(ghost_module, "grouped_affine", lambda *a: calls.append(a[0].shape) or real(*a))
    cls, shape, vbs, _, fmt, offset = CASES[case]
    ghost, _ = _layers(cls, shape[1], vbs, torch.float32, CONFIGS["default"])
    ghost(_input(shape, torch.float32, 0, fmt, offset))
    assert bool(calls) == (case in GROUPED)  # 2d_offset_pass: a mean of 1e4 needs the per-batch offset pass


def _float64_ghost(x, sizes, weight, bias, grad, eps=1e-5):
    """Ghost BN in float64 math: each virtual batch normalised with its own mean and biased variance."""
    x64 = x.double().requires_grad_()
    w64, b64 = weight.double().requires_grad_(), bias.double().requires_grad_()
    outs = []
    dims, view = (0, *range(2, x.dim())), (1, -1) + (1,) * (x.dim() - 2)
    for chunk in x64.split(sizes):
        mean = chunk.mean(dims, keepdim=True)
        var = chunk.var(dims, correction=0, keepdim=True)
        outs.append((chunk - mean) / torch.sqrt(var + eps) * w64.view(view) + b64.view(view))
    y = torch.cat(outs)
    y.backward(grad.double())
    return y, x64.grad, w64.grad, b64.grad


@pytest.mark.parametrize("case", sorted(GROUPED))
def test_grouped_kernels_match_float64_math(case):
    cls, shape, vbs, sizes, fmt, offset = CASES[case]
    ghost, _ = _layers(cls, shape[1], vbs, torch.float32, CONFIGS["default"])
    x = _input(shape, torch.float32, 5, fmt, offset).requires_grad_()
    grad = _input(shape, torch.float32, 6, fmt)
    y = ghost(x)
    y.backward(grad)
    y64, dx64, dw64, db64 = _float64_ghost(x.detach(), sizes, ghost.weight.detach(), ghost.bias.detach(), grad)
    # float32 BN of one batch against float64 math: outputs within ~1e-6 of |y| <= 10 (the second pass and the
    # uncentred way lose at most 5e-7 std, see stats_kernels), gradients likewise relative to their largest value
    torch.testing.assert_close(y.double(), y64, atol=1e-5, rtol=1e-5)
    scale = dx64.abs().max()
    torch.testing.assert_close(x.grad.double() / scale, dx64 / scale, atol=1e-5, rtol=0)
    torch.testing.assert_close(ghost.weight.grad.double(), dw64, atol=1e-5 * dw64.abs().max(), rtol=1e-5)
    torch.testing.assert_close(ghost.bias.grad.double(), db64, atol=1e-5 * db64.abs().max(), rtol=1e-5)


def test_grouped_backward_with_a_non_contiguous_gradient_matches_the_contiguous_one():
    ghost, _ = _layers(B.GhostBatchNorm2d, C, 4, torch.float32, CONFIGS["default"])
    x = _input((16, C, 8, 8), torch.float32, 0)
    grad = _input((16, C, 8, 8), torch.float32, 1)
    grads = []
    for g in (grad, grad.contiguous(memory_format=CL)):  # the second takes the per-virtual-batch backward
        ghost.zero_grad()
        x_in = x.clone().requires_grad_()
        ghost(x_in).backward(g)
        grads.append((x_in.grad, ghost.weight.grad.clone(), ghost.bias.grad.clone()))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, **CLOSE[torch.float32])


def test_functional_rejects_bad_arguments():
    x = torch.randn(8, 3)
    for vbs in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="virtual_batch_size"):
            BF.ghost_batch_norm_with_stats(x, vbs, None, None)
    with pytest.raises(TypeError, match="floating-point"):
        BF.ghost_batch_norm_with_stats(torch.ones(8, 3, dtype=torch.long), 2, None, None)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BF.ghost_batch_norm_with_stats(torch.randn(1, 3), 2, None, None)


def test_virtual_batches_of_one_value_per_channel_raise_as_before():
    layer = B.GhostBatchNorm1d(C, virtual_batch_size=1)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(4, C))
    assert int(layer.num_batches_tracked) == 0  # the first virtual batch raised before any update
