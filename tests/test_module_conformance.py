"""torch.nn's own ModuleInfo tests (``torch.testing._internal.common_modules``) run against our BN layers.

For every BatchNorm1d/2d/3d entry of ``module_db`` and each of its inputs: forward parity with torch's layer (outputs
and every buffer), its error inputs, gradcheck and gradgradcheck with batched gradients (``vmap`` over the backward),
channels_last, pickle/deepcopy/state_dict, factory kwargs; then double backward against torch's second derivatives,
forward-mode AD, ``torch.func`` transforms, validation before any buffer is touched, and ``torch.jit``.
"""

from __future__ import annotations

import copy
import io
import re

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.testing._internal.common_modules import module_db
from torch.testing._internal.common_utils import gradcheck, gradgradcheck

import bn_lightning as bl
from bn_lightning import functional as BF

OURS = {
    torch.nn.BatchNorm1d: bl.BatchNorm1d,
    torch.nn.BatchNorm2d: bl.BatchNorm2d,
    torch.nn.BatchNorm3d: bl.BatchNorm3d,
}
INFOS = [info for info in module_db if info.module_cls in OURS]


def _cases(dtype: torch.dtype = torch.float64, requires_grad: bool = False, sync: bool = False):
    """``(id, ours_cls, torch_cls, module_input, training)`` over every BN ModuleInfo input (SyncBatchNorm: 2d)."""
    out = []
    for info in INFOS:
        if sync and info.module_cls is not torch.nn.BatchNorm2d:
            continue
        ours = bl.SyncBatchNorm if sync else OURS[info.module_cls]
        for training in (True, False):
            inputs = info.module_inputs_func(
                info, device="cpu", dtype=dtype, requires_grad=requires_grad, training=training
            )
            for mi in inputs:
                name = f"{ours.__name__}-{mi.desc or 'default'}-{'train' if training else 'eval'}"
                out.append(pytest.param(ours, info.module_cls, mi, training, id=name))
    return out


def _pair(ours_cls, torch_cls, mi, training, dtype=torch.float64):
    args, kwargs = mi.constructor_input.args, mi.constructor_input.kwargs
    ref = torch_cls(*args, **kwargs).to(dtype).train(training)
    ours = ours_cls(*args, **kwargs).to(dtype).train(training)
    with torch.no_grad():  # non-trivial parameters and running statistics, the same in both
        for m in (ref, ours):
            gen = torch.Generator().manual_seed(0)
            for t in [*m.parameters(), *(b for b in m.buffers() if b.is_floating_point())]:
                t.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype) + 0.5)
    return ours, ref


@pytest.mark.parametrize(("ours_cls", "torch_cls", "mi", "training"), _cases() + _cases(sync=True))
def test_forward_matches_torch(ours_cls, torch_cls, mi, training):
    ours, ref = _pair(ours_cls, torch_cls, mi, training)
    x = mi.forward_input.args[0]
    for _ in range(2):  # the second step sees updated running statistics
        torch.testing.assert_close(ours(x), ref(x))
    ours_state, ref_state = ours.state_dict(), ref.state_dict()
    assert list(ours_state) == list(ref_state)
    for key, value in ref_state.items():
        assert ours_state[key].dtype == value.dtype, key
        torch.testing.assert_close(ours_state[key], value, msg=key)


@pytest.mark.parametrize(("ours_cls", "torch_cls", "mi", "training"), _cases(requires_grad=True))
def test_gradcheck_and_gradgradcheck(ours_cls, torch_cls, mi, training):
    """torch's test_grad / test_gradgrad: float64, batched gradients (vmap over the backward) included."""
    ours, _ = _pair(ours_cls, torch_cls, mi, training)
    x = mi.forward_input.args[0]
    params = tuple(ours.parameters())

    def fn(*inputs):
        return ours(inputs[0])

    assert gradcheck(fn, (x, *params), check_batched_grad=True)
    assert gradgradcheck(fn, (x, *params), check_batched_grad=True)


@pytest.mark.parametrize("info", INFOS, ids=lambda i: i.name)
@pytest.mark.parametrize("training", [True, False])
def test_error_inputs_raise_like_torch(info, training):
    for err in info.module_error_inputs_func(
        info, device="cpu", dtype=torch.float32, requires_grad=False, training=training
    ):
        mi = err.module_error_input
        args, kwargs = mi.constructor_input.args, mi.constructor_input.kwargs
        ours, ref = OURS[info.module_cls](*args, **kwargs).train(training), info.module_cls(*args, **kwargs)
        ref.train(training)
        x = mi.forward_input.args[0]
        if training:
            with pytest.raises(err.error_type, match=err.error_regex):
                ref(x)
            before = copy.deepcopy(ours.state_dict())
            with pytest.raises(err.error_type, match=err.error_regex):
                ours(x)
            assert all(torch.equal(before[k], v) for k, v in ours.state_dict().items())
        else:  # eval: torch allows eps = 0 and rejects eps < 0
            try:
                expected = ref(x)
            except ValueError as exc:
                with pytest.raises(ValueError, match=re.escape(str(exc))):
                    ours(x)
            else:
                torch.testing.assert_close(ours(x), expected)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
@pytest.mark.parametrize("training", [True, False])
def test_integer_input_raises_before_touching_buffers(dtype, training):
    ours = bl.BatchNorm2d(3).train(training)
    ours(torch.randn(4, 3, 2, 2))
    before = copy.deepcopy(ours.state_dict())
    with pytest.raises(NotImplementedError):
        torch.nn.BatchNorm2d(3).train(training)(torch.ones(2, 3, 2, 2, dtype=dtype))
    with pytest.raises(TypeError, match="floating-point input"):
        ours(torch.ones(2, 3, 2, 2, dtype=dtype))
    assert all(torch.equal(before[k], v) for k, v in ours.state_dict().items())


@pytest.mark.parametrize(
    ("ours_cls", "torch_cls", "mi", "training"),
    [
        c
        for c in _cases(torch.float32) + _cases(torch.float32, sync=True)
        if c.values[2].forward_input.args[0].dim() == 4
    ],
)
def test_memory_format_like_torch(ours_cls, torch_cls, mi, training):
    x = mi.forward_input.args[0]
    ours, ref = _pair(ours_cls, torch_cls, mi, training, torch.float32)
    for fmt in (torch.channels_last, torch.contiguous_format):
        xf = x.detach().to(memory_format=fmt).requires_grad_()
        y, y_ref = ours(xf), ref(xf)
        assert y.stride() == y_ref.stride()
        torch.testing.assert_close(y, y_ref)
        (g,) = torch.autograd.grad(y.sum(), xf) if y.numel() else (None,)
        if g is not None:
            (g_ref,) = torch.autograd.grad(y_ref.sum(), xf)
            torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("ours_cls", "torch_cls", "mi", "training"), _cases(torch.float32))
def test_pickle_deepcopy_state_dict_round_trip(ours_cls, torch_cls, mi, training):
    ours, _ = _pair(ours_cls, torch_cls, mi, training, torch.float32)
    x = mi.forward_input.args[0]
    ours(x)
    buf = io.BytesIO()
    torch.save(ours, buf)
    buf.seek(0)
    clones = [torch.load(buf, weights_only=False), copy.deepcopy(ours)]
    fresh = ours_cls(*mi.constructor_input.args, **mi.constructor_input.kwargs).train(training)
    fresh.load_state_dict(ours.state_dict())
    for other in [*clones, fresh]:
        assert all(
            torch.equal(a, b) for a, b in zip(ours.state_dict().values(), other.state_dict().values(), strict=True)
        )
        assert torch.equal(copy.deepcopy(ours)(x), other(x))


@pytest.mark.parametrize("cls", [bl.BatchNorm1d, bl.BatchNorm2d, bl.BatchNorm3d, bl.SyncBatchNorm])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_factory_kwargs(cls, dtype):
    m = cls(4, device="cpu", dtype=dtype)
    assert all(p.dtype == dtype for p in m.parameters())
    assert all(b.dtype == dtype for b in m.buffers() if b.is_floating_point())
    assert m.num_batches_tracked.dtype == torch.long


# --- double backward: gradient penalties ------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_double_backward_matches_torch(training, channels_last):
    """A gradient penalty (WGAN-GP / R1): the second derivatives of ours equal torch.nn.BatchNorm2d's (float64)."""
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64) * 2 + 1
    if channels_last:
        x0 = x0.to(memory_format=torch.channels_last)
    results = []
    for cls in (bl.BatchNorm2d, torch.nn.BatchNorm2d):
        bn = cls(3, dtype=torch.float64).train(training)
        with torch.no_grad():
            bn.weight.copy_(torch.tensor([0.5, 1.5, -2.0]))
            bn.bias.copy_(torch.tensor([0.1, 0.2, 0.3]))
            bn.running_mean.fill_(0.3)
            bn.running_var.fill_(1.7)
        x = x0.clone().requires_grad_()
        out = (bn(x) ** 3).mean()
        (gx,) = torch.autograd.grad(out, x, create_graph=True)
        penalty = (gx.flatten(1).norm(dim=1) - 1).square().mean()
        grads = torch.autograd.grad(penalty, [x, bn.weight, bn.bias])
        results.append((gx.detach(), *grads, bn.running_mean.clone(), bn.running_var.clone()))
    for ours, ref in zip(*results, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-10)


def test_first_order_backward_takes_the_eager_path():
    """Without create_graph the hand-written backward runs: its gradient is not itself differentiable."""
    x = torch.randn(4, 3, 4, 4, requires_grad=True)
    (g,) = torch.autograd.grad(bl.BatchNorm2d(3)(x).pow(2).sum(), x)
    assert g.grad_fn is None
    (g2,) = torch.autograd.grad(bl.BatchNorm2d(3)(x).pow(2).sum(), x, create_graph=True)
    assert g2.grad_fn is not None
    torch.testing.assert_close(g, g2, rtol=1e-5, atol=1e-5)


class _EchoReducer:
    """A one-rank StatsReducer: the merged statistics are the local ones."""

    def reduce_stats(self, mean, var, count):
        return BF.BatchStats(mean, var, torch.tensor(float(count), dtype=torch.float64))

    def reduce_grads(self, sum_dy, sum_dy_xhat):
        return sum_dy, sum_dy_xhat


def test_synchronised_double_backward_raises_clearly():
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    y = BF.batch_norm(x, None, None, training=True, reducer=_EchoReducer())
    (g,) = torch.autograd.grad(y.pow(3).sum(), x)  # first order: fine
    assert g.shape == x.shape
    y = BF.batch_norm(x, None, None, training=True, reducer=_EchoReducer())
    with pytest.raises(NotImplementedError, match="SyncBatchNorm: double backward"):
        torch.autograd.grad(y.pow(3).sum(), x, create_graph=True)


# --- forward-mode AD and torch.func ---------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
def test_dual_tensors_match_torch(training):
    x, t = torch.randn(6, 3, 4, dtype=torch.float64), torch.randn(6, 3, 4, dtype=torch.float64)
    results = []
    for cls in (bl.BatchNorm1d, torch.nn.BatchNorm1d):
        bn = cls(3, dtype=torch.float64).train(training)
        with torch.no_grad():
            bn.running_var.fill_(2.0)
        with fwAD.dual_level():
            y = bn(fwAD.make_dual(x, t))
            primal, tangent = fwAD.unpack_dual(y)
        results.append((primal, tangent, bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked))
        assert fwAD.unpack_dual(bn.running_mean).tangent is None
    for ours, ref in zip(*results, strict=True):
        torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("track", [True, False])
def test_func_jvp_and_vmap_match_torch(track):
    """Eval mode, or no running statistics: jvp and vmap agree with torch's; training with buffers fails like it."""
    x = torch.randn(5, 6, 3, 4, 4, dtype=torch.float64)
    t = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    outs = []
    for cls in (bl.BatchNorm2d, torch.nn.BatchNorm2d):
        bn = cls(3, track_running_stats=track, dtype=torch.float64)
        bn.eval()
        jvp = torch.func.jvp(bn, (x[0],), (t,))
        batched = torch.func.vmap(bn)(x)
        bn.train()
        if track:
            with pytest.raises(RuntimeError):
                torch.func.vmap(bn)(x)
            with pytest.raises(RuntimeError):
                torch.func.jvp(bn, (x[0],), (t,))
            outs.append((*jvp, batched, bn.running_mean.clone(), bn.num_batches_tracked.clone()))
        else:
            outs.append((*jvp, batched, torch.func.vmap(bn)(x), *torch.func.jvp(bn, (x[0],), (t,))))
        assert bn.last_batch_stats is None if isinstance(bn, bl.BatchNorm2d) else True
    for ours, ref in zip(*outs, strict=True):
        torch.testing.assert_close(ours, ref)


def test_func_jacrev_and_hessian_through_functional_call():
    bn = bl.BatchNorm1d(2, track_running_stats=False, dtype=torch.float64)
    ref = torch.nn.BatchNorm1d(2, track_running_stats=False, dtype=torch.float64)
    x = torch.randn(5, 2, dtype=torch.float64)
    for m in (bn, ref):
        params = dict(m.named_parameters())
        buffers = {k: v.clone() for k, v in m.named_buffers()}

        def f(p, m=m, buffers=buffers):
            return torch.func.functional_call(m, (p, buffers), (x,)).pow(3).sum()

        m.hess = torch.func.hessian(f)(params)["weight"]["weight"]
    torch.testing.assert_close(bn.hess, ref.hess)


# --- composite path, empty batches, TorchScript -----------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.1, None])
def test_composite_path_matches_eager(momentum):
    x = (torch.randn(8, 4, 5, 5) * 3 + 2).to(memory_format=torch.channels_last)
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    bufs = [(torch.zeros(4), torch.ones(4), torch.tensor(0)) for _ in range(2)]
    y_e, s_e = BF.batch_norm_with_stats(x, *bufs[0][:2], w, b, True, momentum, 1e-5, bufs[0][2])
    y_c, s_c = BF.batch_norm_composite(x, *bufs[1][:2], w, b, True, momentum, 1e-5, bufs[1][2])
    assert y_c.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
    for a, c in zip(bufs[0], bufs[1], strict=True):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)
    assert s_c.count == s_e.count == 200
    with pytest.raises(NotImplementedError, match="no composite form"):
        BF.batch_norm_composite(x, None, None, training=True, reducer=_EchoReducer())


@pytest.mark.parametrize("training", [True, False])
def test_empty_channels_last_batch_keeps_memory_format(training):
    x = torch.randn(0, 5, 2, 2).to(memory_format=torch.channels_last)
    for cls in (bl.BatchNorm2d, bl.SyncBatchNorm):
        y = cls(5).train(training)(x)
        assert y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last)


def test_torch_jit_script_raises_a_clear_error_and_trace_works():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), bl.BatchNorm2d(4)).eval()
    with pytest.raises(RuntimeError, match=r"BatchNorm2d \(bn_lightning\) cannot be compiled by torch.jit.script.*"):
        torch.jit.script(model)
    x = torch.randn(2, 3, 4, 4)
    traced = torch.jit.trace(model, (x,), check_trace=False)
    torch.testing.assert_close(traced(x), model(x))
