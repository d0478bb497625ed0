"""``torch.compile`` over bn_lightning's layers: one graph (``fullgraph=True``) in training and eval, forward and
backward, the eager numbers, the running statistics updated by the same rule, no recompiles beyond torch's own.

Most tests compile with the ``"aot_eager"`` backend: it runs everything ``torch.compile`` does to a model except code
generation (Dynamo's trace, AOTAutograd's joint forward/backward graph, the functionalised in-place buffer updates),
in a second instead of tens. Two ``slow`` tests run the whole Inductor pipeline: a compiled model, and the opt-in
compiled kernel of eager layers across batch sizes and memory formats.

Tolerances: the compiled graph computes the batch statistics with plain two-pass sums, the eager kernels with their
own reduction orders (row sums combined in float64, ...); both are float32 reductions over at most 100 values per
channel, whose rounding is ~1e-7 relative. ``rtol = atol = 1e-5`` (~100 float32 ulps at the O(1) values compared) is
far below what a wrong formula gives: the biased against the unbiased variance alone differs by ``1 / n >= 1e-2``.
Parameter gradients are sums over the batch (``sum(dy * x_hat)``: 100-150 terms up to ~10 in size, after up to ten
layers' backward): their float32 rounding is ~1e-7 of the ~1e3 sum of magnitudes, so they get ``1e-4``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import bn_lightning as B
from bn_lightning import functional as BF
from bn_lightning.functional import compiled as kernels
from tests.helpers.ddp import run_distributed
from tests.helpers.tiny import TinyBNNet

TOL = {"rtol": 1e-5, "atol": 1e-5}
GRAD_TOL = {"rtol": 1e-4, "atol": 1e-4}  # parameter gradients: sums over the batch


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _randomise(module: nn.Module) -> None:
    """Weights, biases and running statistics drawn away from 1 and 0, so that no term of the math vanishes."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=g) + 0.5)


class Zoo(nn.Module):
    """Every layer kind on one small 5D input ``(N, 4, 2, 3, 3)``: the 3d layers, then 2d on ``(N, 4, 2, 9)``, then
    1d on ``(N, 4, 18)`` and ``(N, 4)``. The ghost layers split N in virtual batches of 4."""

    def __init__(self) -> None:
        super().__init__()
        self.bn3d = B.BatchNorm3d(4)
        self.frozen3d = B.FrozenBatchNorm3d(4)
        self.bn2d = B.BatchNorm2d(4)
        self.ghost2d = B.GhostBatchNorm2d(4, virtual_batch_size=4)
        self.renorm2d = B.BatchRenorm2d(4, r_max=1.5, d_max=0.5, warmup_steps=2)  # bounds ramp: tensors in the graph
        self.frozen2d = B.FrozenBatchNorm2d(4)
        self.sync = B.SyncBatchNorm(4)  # no process group: local BN
        self.bn1d = B.BatchNorm1d(4, momentum=None)  # cumulative average: 1 / num_batches_tracked
        self.renorm1d = B.BatchRenorm1d(4)
        self.ghost1d = B.GhostBatchNorm1d(4, virtual_batch_size=4)
        self.plain1d = B.BatchNorm1d(4, affine=False, track_running_stats=False)
        self.frozen1d = B.FrozenBatchNorm1d(4)
        _randomise(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.frozen3d(self.bn3d(x)).flatten(3)
        x = torch.tanh(self.renorm2d(self.ghost2d(self.bn2d(x))))
        x = self.sync(self.frozen2d(x)).flatten(2)
        x = torch.tanh(self.ghost1d(self.renorm1d(self.bn1d(x))))
        return self.frozen1d(self.plain1d(x.mean(2)))


def _batch(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 2, 3, 3, generator=g) * 2 + 3  # means far from 0: the eager kernels' centred way


def _step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    x = x.clone().requires_grad_()
    y = model(x)
    w = torch.linspace(-1, 1, y.numel()).view_as(y)
    (y.square().sum() + (y * w).sum()).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return y.detach(), x.grad, grads


def _tracked_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Layers whose buffers one training forward updates once (ghost layers update once per virtual batch)."""
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        and m.track_running_stats
        and not isinstance(m, B.GhostBatchNorm1d | B.GhostBatchNorm2d)
    }


def test_fullgraph_training_matches_eager_and_updates_running_stats_by_the_same_rule():
    eager = Zoo()
    model = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    for step, n in enumerate([6, 7, 8]):  # two virtual batches of the ghost layers each time
        x = _batch(n, step)
        before = {name: (m.running_mean.clone(), m.running_var.clone()) for name, m in _tracked_layers(model).items()}
        y, gx, grads = _step(compiled, x)
        y_ref, gx_ref, grads_ref = _step(eager, x)
        torch.testing.assert_close(y, y_ref, **TOL)
        torch.testing.assert_close(gx, gx_ref, **TOL)
        for g, g_ref in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(g, g_ref, **GRAD_TOL)
        state, state_ref = model.state_dict(), eager.state_dict()
        for key, value in state.items():
            if value.is_floating_point():
                torch.testing.assert_close(value, state_ref[key], **TOL)
            else:  # num_batches_tracked: every layer counted this step (ghost layers: their virtual batches)
                assert torch.equal(value, state_ref[key]), key
        # the compiled graph updated each buffer exactly as update_running_stats does with the layer's own statistics
        for name, layer in _tracked_layers(model).items():
            rm, rv = before[name]
            stats = layer.last_batch_stats
            assert stats is not None and stats.count == 18 * n  # every layer sees N * 18 values per channel
            nbt = layer.num_batches_tracked.clone() - 1
            BF.update_running_stats(rm, rv, stats, layer.momentum, nbt)
            assert torch.equal(layer.running_mean, rm) and torch.equal(layer.running_var, rv), name
    # torch's automatic dynamic shapes: the second batch size recompiles once with a symbolic batch, the third reuses
    # that graph (torch.nn's own layers do exactly the same: test_batch_size_changes_recompile_as_torch_layers_do)
    assert counter.frame_count == 2


@pytest.mark.parametrize("make", [lambda: nn.BatchNorm2d(3), lambda: B.BatchNorm2d(3), lambda: B.BatchRenorm2d(3)])
def test_batch_size_changes_recompile_as_torch_layers_do(make):
    """With ``dynamic=None``: one compile for the first batch size, one (symbolic batch) for the second, none after."""
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(make(), fullgraph=True, backend=counter)
    for n in (4, 6, 8, 11):
        compiled(torch.randn(n, 3, 2, 2, requires_grad=True)).sum().backward()
    assert counter.frame_count == 2


def test_opt_in_compiled_kernel_steps_aside_inside_a_compiled_model(monkeypatch):
    """``BN_LIGHTNING_KERNEL=compiled`` chooses a kernel for eager layers; inside a compiled model the graph is it."""
    calls = []
    run = kernels._run_compiled
    monkeypatch.setattr(kernels, "_run_compiled", lambda i, *a: calls.append(i) or run(i, *a))
    eager = nn.Sequential(B.BatchNorm2d(3), nn.Tanh(), B.BatchNorm2d(3))
    model = copy.deepcopy(eager)
    x = torch.randn(4, 3, 2, 2) + 1
    monkeypatch.setattr(kernels, "_chosen", "eager")
    expected = [eager.train(mode)(x) for mode in (True, False)]
    monkeypatch.setattr(kernels, "_chosen", None)
    monkeypatch.setenv("BN_LIGHTNING_KERNEL", "compiled")
    assert BF.get_kernel() == "compiled"
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for mode, ref in zip((True, False), expected, strict=True):
        model.train(mode)
        torch.testing.assert_close(compiled(x), ref, **TOL)
    assert calls == []


def test_monitoring_statistics_of_a_compiled_model_equal_the_uncompiled_runs():
    records = []
    for compile_it in (False, True):
        torch.manual_seed(0)
        net = TinyBNNet(B.BatchNorm2d, B.BatchNorm1d, activation=nn.SiLU)
        model = torch.compile(net, backend="aot_eager") if compile_it else net
        with B.BatchNormRecorder(net, every_n_steps=2) as rec:
            steps = []
            for step in range(3):
                x = torch.randn(8 + step, 3, 4, 4, generator=torch.Generator().manual_seed(step))
                model(x).square().mean().backward()
                steps.append(rec.step())
        records.append(steps)
    eager_steps, compiled_steps = records
    assert [bool(s) for s in eager_steps] == [True, False, True]  # steps 1 and 3 record
    for got, ref in zip(compiled_steps, eager_steps, strict=True):
        assert got.keys() == ref.keys()
        for key in ref:
            torch.testing.assert_close(torch.as_tensor(got[key]), torch.as_tensor(ref[key]), **TOL, msg=key)


@pytest.mark.slow
def test_inductor_fullgraph_training_and_eval_match_eager():
    """The whole pipeline, code generation included: the fused kernels give the eager numbers (one layer of each
    mechanism: plain, virtual batches, renorm with its clamps acting, frozen)."""
    eager = nn.Sequential(
        B.BatchNorm2d(4),
        B.GhostBatchNorm2d(4, virtual_batch_size=4),
        nn.Tanh(),
        B.BatchRenorm2d(4, r_max=1.1, d_max=0.1),
        B.FrozenBatchNorm2d(4),
    )
    _randomise(eager)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True)
    x = _batch(8, 0).flatten(3)
    for mode in (True, False):
        model.train(mode), eager.train(mode)
        y, gx, grads = _step(compiled, x)
        y_ref, gx_ref, grads_ref = _step(eager, x)
        torch.testing.assert_close(y, y_ref, **TOL)
        torch.testing.assert_close(gx, gx_ref, **TOL)
        for g, g_ref in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(g, g_ref, **GRAD_TOL)
        for (key, value), ref in zip(model.state_dict().items(), eager.state_dict().values(), strict=True):
            if value.is_floating_point():
                torch.testing.assert_close(value, ref, **TOL)
            else:
                assert torch.equal(value, ref), key


# ---------------------------------------------------------------- the opt-in compiled kernel


def _kernel_graphs() -> list[int]:
    """How many graphs Dynamo holds for each compiled kernel: training forward, training backward, eval."""
    entries = torch._dynamo.eval_frame._debug_get_cache_entry_list
    fns = (kernels._fused_forward, kernels._fused_backward, kernels._fused_affine)
    return [len(entries(fn.__code__)) for fn in fns]


def _float64_bn(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> dict[str, torch.Tensor]:
    """Training BN (biased batch variance) in float64 autograd ops, and the eval transform with ``layer``'s buffers."""
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, layer.weight, layer.bias))
    view = (1, -1, 1, 1)
    mean = x64.mean((0, 2, 3), keepdim=True)
    var = ((x64 - mean) ** 2).mean((0, 2, 3), keepdim=True)
    y = (x64 - mean) / torch.sqrt(var + layer.eps) * w64.view(view) + b64.view(view)
    y.backward(dy.double())
    rm, rv = (t.double().view(view) for t in (layer.running_mean, layer.running_var))
    y_eval = (x.double() - rm) / torch.sqrt(rv + layer.eps) * w64.detach().view(view) + b64.detach().view(view)
    return {"y": y.detach(), "dx": x64.grad, "dw": w64.grad, "db": b64.grad, "y_eval": y_eval}


@pytest.mark.slow
def test_compiled_kernel_compiles_once_for_every_batch_size_and_shape(monkeypatch):
    """One graph per kernel for every batch size and layer shape (symbolic sizes from the first call); a size of 1 and
    each memory format get a graph of their own; outputs and gradients equal float64 math in every case."""
    monkeypatch.setattr(kernels, "_compiled_broken", False)
    monkeypatch.setattr(kernels, "_chosen", "compiled")
    g = torch.Generator().manual_seed(5)
    layers = {c: B.BatchNorm2d(c) for c in (5, 3)}
    with torch.no_grad():
        for layer in layers.values():
            layer.weight.uniform_(0.5, 1.5, generator=g)
            layer.bias.uniform_(-0.5, 0.5, generator=g)
    nchw, cl = torch.contiguous_format, torch.channels_last
    cases = [  # (input shape, memory format, graphs per kernel after the case)
        *[((n, 5, 4, 3), nchw, 1) for n in (8, 12, 16, 40, 2)],
        ((8, 3, 7, 2), nchw, 1),  # another channel count and feature map: the same graphs
        ((8, 5, 4, 3), cl, 2),  # strides are part of a graph: one more per memory format
        ((40, 3, 7, 2), cl, 2),
        ((1, 5, 4, 3), nchw, 3),  # Dynamo specialises sizes 0 and 1: a graph of their own
        ((3, 5, 4, 3), nchw, 3),
    ]
    for shape, fmt, graphs in cases:
        layer = layers[shape[1]]
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 50).float().contiguous(memory_format=fmt)
        dy = (torch.randn(x.shape, generator=g) + 0.3).contiguous(memory_format=fmt)  # a gradient with a mean
        layer.train().zero_grad()
        xg = x.clone().requires_grad_()
        y = layer(xg)
        y.backward(dy)
        y_eval = layer.eval()(x)
        ref = _float64_bn(layer, x, dy)
        got = {"y": y, "dx": xg.grad, "dw": layer.weight.grad, "db": layer.bias.grad, "y_eval": y_eval}
        for key, value in got.items():
            tol = {
                "y": {"rtol": 0, "atol": 1e-5},
                "dx": {"rtol": 0, "atol": 1e-5},
                "y_eval": {"rtol": 1e-6, "atol": 1e-5},  # (x - running_mean) * invstd: values up to ~60 here
            }.get(key, GRAD_TOL)  # dw, db: float32 sums of up to 480 products of size ~3
            where = f"{key}, {shape}, {fmt}"
            torch.testing.assert_close(value.double(), ref[key], **tol, msg=lambda m, where=where: f"{where}: {m}")
        assert y.is_contiguous(memory_format=fmt) and xg.grad.is_contiguous(memory_format=fmt)
        assert _kernel_graphs() == [graphs] * 3, (shape, fmt, _kernel_graphs())
    assert not hasattr(x, "_dynamo_weak_dynamic_indices")  # the symbolic-size mark stays off the caller's tensor


# ---------------------------------------------------------------- SyncBatchNorm, 2 gloo processes


def _sync_worker(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), B.SyncBatchNorm(4), nn.SiLU(), nn.Conv2d(4, 4, 1), B.BatchRenorm2d(4, sync=True)
    )
    eager = copy.deepcopy(net)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(net, backend="aot_eager")
    out = {"y": [], "gx": [], "ref_y": [], "ref_gx": []}
    for step in range(2):  # the second step with other batch sizes: the recompile with a symbolic batch
        x = torch.randn(3 + rank + step, 3, 5, 5, generator=torch.Generator().manual_seed(10 * rank + step))
        for model, prefix in ((compiled, ""), (eager, "ref_")):
            xg = x.clone().requires_grad_()
            y = model(xg)
            y.square().sum().backward()
            out[prefix + "y"].append(y.detach())
            out[prefix + "gx"].append(xg.grad)
    breaks = torch._dynamo.utils.counters["graph_break"]
    out["sync_breaks"] = sum(v for k, v in breaks.items() if "synchronising BN layer" in k)
    out["other_breaks"] = sum(v for k, v in breaks.items() if "synchronising BN layer" not in k)
    out["state"], out["ref_state"] = net.state_dict(), eager.state_dict()
    net.eval()
    eval_model = torch.compile(net, fullgraph=True, backend="aot_eager")  # eval: no collective, one graph
    out["eval"] = eval_model(x).detach()
    out["ref_eval"] = eager.eval()(x).detach()
    return out


@pytest.mark.ddp
def test_sync_batchnorm_compiles_with_one_graph_break_per_layer_and_eager_numbers():
    results = run_distributed(_sync_worker, 2)
    for r in results:
        assert r["sync_breaks"] > 0 and r["other_breaks"] == 0
        for key in ("y", "gx"):
            for got, ref in zip(r[key], r["ref_" + key], strict=True):
                torch.testing.assert_close(got, ref, **TOL)
        torch.testing.assert_close(r["eval"], r["ref_eval"], **TOL)
        for key, value in r["state"].items():
            if value.is_floating_point():
                torch.testing.assert_close(value, r["ref_state"][key], **TOL)
            else:
                assert torch.equal(value, r["ref_state"][key]), key
    for key, value in results[0]["state"].items():
        if "running" in key or "num_batches" in key:
            assert torch.equal(value, results[1]["state"][key]), key  # synchronised: identical on both ranks
