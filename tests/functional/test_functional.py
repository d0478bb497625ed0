"""bn_lightning.functional against float64 math written independently in the test."""

from __future__ import annotations

import pytest
import torch

from bn_lightning import functional as BF
from bn_lightning.functional import stats_kernels
from bn_lightning.functional.channels import _block_size


def _ref_stats(x64: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [0, *range(2, x64.dim())]
    mean = x64.mean(dims)
    var = ((x64 - mean.view(1, -1, *[1] * (x64.dim() - 2))) ** 2).mean(dims)
    return mean, var


def test_batch_stats_stable_for_large_mean_float32():
    g = torch.Generator().manual_seed(0)
    x = (1e4 + torch.randn(64, 8, 16, 16, generator=g, dtype=torch.float64)).float()
    mean, var, count = BF.batch_stats(x)
    mean_ref, var_ref = _ref_stats(x.double())  # float64 math on the very same float32 values
    assert count == 64 * 16 * 16
    torch.testing.assert_close(mean.double(), mean_ref, atol=1e-3, rtol=1e-7)
    torch.testing.assert_close(var.double(), var_ref, atol=0, rtol=1e-4)  # E[x^2]-E[x]^2 would be off by ~100%


def test_training_output_and_grads_stable_for_large_mean():
    g = torch.Generator().manual_seed(1)
    x = (1e4 + torch.randn(32, 4, 8, 8, generator=g, dtype=torch.float64)).float().requires_grad_()
    dy = torch.randn(32, 4, 8, 8, generator=g)
    y = BF.batch_norm(x, None, None, training=True)
    y.backward(dy)
    x64 = x.detach().double().requires_grad_()
    mean, var = _ref_stats(x64)
    y64 = (x64 - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + 1e-5)
    y64.backward(dy.double())
    torch.testing.assert_close(y.double(), y64.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-5, rtol=0)


# mean/std ratios on both sides of every switch in _centered_stats: uncentred (mean^2 <= var), a second pass for the
# variance (mean^2 <= 64 var), centred with the offset pass; the shape has rows of 256 values, so the CPU fast paths
# apply
@pytest.mark.parametrize(
    "ratio,path", [(0.0, "uncentred"), (0.9, "uncentred"), (1.1, "second pass"), (3.9, "second pass"),
                   (4.1, "second pass"), (7.9, "second pass"), (8.1, "offset"), (50.0, "offset"), (1e4, "offset")]
)  # fmt: skip
@pytest.mark.parametrize(
    "shape,layout",
    [((16, 5, 16, 16), "nchw"), ((28, 5, 64, 80), "nchw"), ((16, 9, 16, 16), "channels_last"),
     ((28, 9, 40, 40), "channels_last")],
    ids=["one-block", "blocked", "channels-last-one-block", "channels-last-blocked"],
)  # fmt: skip
def test_every_statistics_path_matches_float64_math(ratio, path, shape, layout, monkeypatch):
    channel_sum = stats_kernels._channel_sum
    g = torch.Generator().manual_seed(7)
    c = shape[1]
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    if layout == "nchw":  # the larger shape is cut into cache-sized blocks of the batch (10, 10 and 8 samples)
        assert len(torch.empty(shape).split(_block_size(torch.empty(shape)))) == (1 if shape[0] == 16 else 3)
    else:  # channels-last: (N*H*W, C) rows, cut into blocks of <= 4096 rows (1 block, or 11)
        step = stats_kernels._channels_last_block_rows(torch.empty(shape).contiguous(memory_format=fmt))
        assert -(-shape[0] * shape[2] * shape[3] // step) == (1 if shape[0] == 16 else 11)
    # per channel exactly `ratio` standard deviations from zero, in float64 before rounding to float32
    z = torch.randn(shape, generator=g, dtype=torch.float64)
    z = (z - z.mean((0, 2, 3), keepdim=True)) / z.std((0, 2, 3), correction=0, keepdim=True)
    signs = torch.tensor([(-1.0) ** i for i in range(c)], dtype=torch.float64).view(1, -1, 1, 1)
    x = (z + ratio * signs).float().contiguous(memory_format=fmt)
    dy = (torch.randn(shape, generator=g) + 0.5).contiguous(memory_format=fmt)  # a mean of its own: no cancelling
    w = torch.rand(c, generator=g) + 0.5
    b = torch.randn(c, generator=g)

    calls, second = [], []  # on the NCHW layout _channel_sum runs only for the offset pass
    sumsq_about = stats_kernels._sumsq_about
    monkeypatch.setattr(stats_kernels, "_channel_sum", lambda *a, **k: calls.append(1) or channel_sum(*a, **k))
    monkeypatch.setattr(stats_kernels, "_sumsq_about", lambda *a: second.append(1) or sumsq_about(*a))
    centered = stats_kernels._centered_stats(x)[4]
    monkeypatch.undo()
    if centered is x:
        taken = "second pass" if second else "uncentred"
    else:
        taken = "offset" if calls or layout == "channels_last" else "centred"  # CL's centred way sums in one pass
    assert taken == path

    xl, wl, bl = (t.clone().requires_grad_() for t in (x, w, b))
    y = BF.batch_norm(xl, None, None, wl, bl, training=True)
    y.backward(dy)
    x64, w64, b64 = (t.double().requires_grad_() for t in (x, w, b))
    mean, var = _ref_stats(x64)
    y64 = (x64 - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + 1e-5) * w64.view(1, -1, 1, 1)
    (y64 + b64.view(1, -1, 1, 1)).backward(dy.double())
    stats = BF.batch_stats(x)
    torch.testing.assert_close(stats.mean.double(), mean.detach(), atol=2e-6 * max(ratio, 1), rtol=0)
    torch.testing.assert_close(stats.var.double(), var.detach(), atol=0, rtol=2e-6 if ratio < 100 else 1e-4)
    torch.testing.assert_close(y.double(), (y64 + b64.view(1, -1, 1, 1)).detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(xl.grad.double(), x64.grad, atol=1e-5, rtol=0)
    # gamma/beta grads are float32 sums of n products: within twice torch's own error (plus a sqrt(n) floor)
    xt, wt, bt = (t.clone().requires_grad_() for t in (x, w, b))
    torch.nn.functional.batch_norm(xt, None, None, wt, bt, training=True).backward(dy)
    floor = 3e-6 * (x.numel() // x.shape[1]) ** 0.5
    for ours, native, exact in ((wl.grad, wt.grad, w64.grad), (bl.grad, bt.grad, b64.grad)):
        ours_err, native_err = ((t.double() - exact).abs().max() for t in (ours, native))
        assert ours_err <= 2 * native_err + floor, (ours_err, native_err)


@pytest.mark.parametrize("shape", [(12, 3), (4, 3, 5), (2, 3, 4, 4)])
def test_grad_reductions_and_grad_input_match_float64_autograd(shape):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    view = (1, -1, *[1] * (len(shape) - 2))
    mean, var = _ref_stats(x)
    xhat = (x - mean.view(view)) / torch.sqrt(var.view(view) + 1e-5)
    (xhat * w.view(view)).backward(dy)
    dims = [0, *range(2, len(shape))]
    with torch.no_grad():
        m, v, n = BF.batch_stats(x)
        invstd = torch.rsqrt(v + 1e-5)
        centered = x - m.view(view)
        sum_dy, sum_dy_xhat = BF.grad_reductions(dy, centered, invstd)
        torch.testing.assert_close(sum_dy, dy.sum(dims))
        torch.testing.assert_close(sum_dy_xhat, (dy * xhat).sum(dims))
        dx = BF.grad_input(dy, centered, invstd, w, sum_dy, sum_dy_xhat, n)
    torch.testing.assert_close(dx, x.grad, atol=1e-10, rtol=1e-10)


def test_grad_input_with_offset_equals_centering_on_the_mean():
    # SyncBatchNorm centres on the local mean and normalises with the global one: offset = global - local
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 3, dtype=torch.float64, generator=g)
    dy = torch.randn(10, 3, dtype=torch.float64, generator=g)
    w = torch.rand(3, dtype=torch.float64, generator=g) + 0.5
    mean, var, n = BF.batch_stats(x)
    invstd = torch.rsqrt(var + 1e-5)
    c = mean + torch.randn(3, dtype=torch.float64, generator=g)  # some other centre
    direct = BF.grad_reductions(dy, x - mean, invstd)
    shifted = BF.grad_reductions(dy, x - c, invstd, offset=mean - c)
    torch.testing.assert_close(direct, shifted)
    dx = BF.grad_input(dy, x - mean, invstd, w, *direct, n)
    dx_shifted = BF.grad_input(dy, x - c, invstd, w, *shifted, n, offset=mean - c)
    torch.testing.assert_close(dx, dx_shifted)


def test_merge_stats_equals_stats_of_concatenation_and_ignores_empty_chunks():
    g = torch.Generator().manual_seed(4)
    chunks = [1e3 + torch.randn(n, 5, generator=g, dtype=torch.float64) for n in (7, 1, 12)]
    means = torch.stack([c.mean(0) for c in chunks] + [torch.full((5,), float("nan"), dtype=torch.float64)])
    vars_ = torch.stack(
        [c.var(0, unbiased=False) for c in chunks] + [torch.full((5,), float("nan"), dtype=torch.float64)]
    )
    counts = torch.tensor([7, 1, 12, 0])
    merged = BF.merge_stats(means, vars_, counts)
    allx = torch.cat(chunks)
    torch.testing.assert_close(merged.mean, allx.mean(0))
    torch.testing.assert_close(merged.var, allx.var(0, unbiased=False))
    assert int(merged.count) == 20


def test_merge_stats_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"shape \(k, C\)"):
        BF.merge_stats(torch.zeros(3), torch.zeros(3), torch.ones(3))


@pytest.mark.parametrize("momentum", [0.3, None])
def test_update_running_stats_matches_the_definition(momentum):
    g = torch.Generator().manual_seed(5)
    rm, rv, nbt = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64), torch.tensor(0)
    ref_m, ref_v = rm.clone(), rv.clone()
    batches = [torch.randn(6, 4, generator=g, dtype=torch.float64) * 2 + 1 for _ in range(5)]
    for k, xb in enumerate(batches, start=1):
        BF.update_running_stats(rm, rv, BF.batch_stats(xb), momentum, nbt)
        f = 1.0 / k if momentum is None else momentum
        ref_m = (1 - f) * ref_m + f * xb.mean(0)
        ref_v = (1 - f) * ref_v + f * xb.var(0, unbiased=True)  # unbiased, as torch
    torch.testing.assert_close(rm, ref_m)
    torch.testing.assert_close(rv, ref_v)
    assert int(nbt) == 5
    if momentum is None:  # cumulative average = plain mean of the batch means
        torch.testing.assert_close(rm, torch.stack([xb.mean(0) for xb in batches]).mean(0))


def test_update_running_stats_with_merged_tensor_count_skips_empty():
    rm, rv = torch.zeros(2), torch.ones(2)
    empty = BF.BatchStats(torch.zeros(2), torch.zeros(2), torch.tensor(0))
    BF.update_running_stats(rm, rv, empty, 0.5)
    assert torch.equal(rm, torch.zeros(2)) and torch.equal(rv, torch.ones(2))
    full = BF.BatchStats(torch.tensor([2.0, 4.0]), torch.tensor([1.0, 1.0]), torch.tensor(2))
    BF.update_running_stats(rm, rv, full, 0.5)
    torch.testing.assert_close(rm, torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(rv, torch.tensor([1.5, 1.5]))  # 0.5 * 1 + 0.5 * (1 * 2 / 1)


def test_normalize_matches_eval_formula_and_keeps_channels_last():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 4, 4, generator=g).contiguous(memory_format=torch.channels_last)
    m, v = torch.randn(3, generator=g), torch.rand(3, generator=g) + 0.5
    w, b = torch.randn(3, generator=g), torch.randn(3, generator=g)
    y = BF.normalize(x, m, v, w, b, eps=1e-3)
    ref = (x.double() - m.double().view(1, -1, 1, 1)) / torch.sqrt(v.double().view(1, -1, 1, 1) + 1e-3)
    ref = ref * w.double().view(1, -1, 1, 1) + b.double().view(1, -1, 1, 1)
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_batch_norm_training_without_buffers_uses_batch_stats_and_raises_on_single_value():
    x = torch.randn(5, 2)
    y = BF.batch_norm(x, None, None, training=False)  # no buffers: batch statistics, as torch
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, training=True), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BF.batch_norm(torch.randn(1, 2), None, None, training=True)


def test_half_precision_stats_are_float32():
    x = torch.randn(8, 3, 4, 4).to(torch.bfloat16)
    stats = BF.batch_stats(x)
    assert stats.mean.dtype == stats.var.dtype == torch.float32
    mean_ref, var_ref = _ref_stats(x.double())
    torch.testing.assert_close(stats.var.double(), var_ref, atol=1e-5, rtol=1e-5)
