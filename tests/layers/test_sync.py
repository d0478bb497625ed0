"""SyncBatchNorm on CPU/gloo against ONE process running the concatenated batch (the independent reference).

Each worker below runs in spawned gloo processes (tests/helpers/ddp.py) and returns tensors that the test compares
with torch.nn computed here, in the parent, on the whole batch.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import bn_lightning as B
from tests.helpers.ddp import run_distributed
from tests.helpers.runif import run_if
from tests.helpers.tiny import TinyBNNet

pytestmark = pytest.mark.ddp


def _global_batches(steps: int, sizes: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    total = sum(sizes)
    return [
        (torch.randn(total, 3, 6, 6, generator=g), torch.randint(0, 5, (total,), generator=g)) for _ in range(steps)
    ]


def _chunk(t: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
    start = sum(sizes[:rank])
    return t[start : start + sizes[rank]]


def _reference_net() -> nn.Module:
    torch.manual_seed(0)
    # smooth (SiLU): 5 float32 SGD steps of two processes and of one then differ by rounding only, never by a ReLU gate
    # within rounding of zero that one CPU flips and another does not
    return TinyBNNet(nn.BatchNorm2d, nn.BatchNorm1d, activation=nn.SiLU)


# ---------------------------------------------------------------- DDP training parity (5 SGD steps)


def _ddp_train_worker(rank, world, sizes, steps):
    net = B.convert_sync_batchnorm(_reference_net())
    model = DistributedDataParallel(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    total = sum(sizes)
    outputs, grads = [], []
    for x, y in _global_batches(steps, sizes):
        xb, yb = _chunk(x, sizes, rank), _chunk(y, sizes, rank)
        opt.zero_grad()
        out = model(xb)
        # local sum scaled so that DDP's gradient AVERAGE equals the gradient of the global mean loss
        loss = nn.functional.cross_entropy(out, yb, reduction="sum") * world / total
        loss.backward()
        outputs.append(out.detach())
        grads.append({k: p.grad.clone() for k, p in net.named_parameters()})
        opt.step()
    layers = [m for m in net.modules() if isinstance(m, B.SyncBatchNorm)]
    # the last_batch_stats protocol: detached, so that keeping them holds no graph (and the layer deep-copies)
    leaks = [
        type(t).__name__ for m in layers for t in m.last_batch_stats if isinstance(t, torch.Tensor) and t.requires_grad
    ]
    copy.deepcopy(net)
    return {
        "outputs": outputs,
        "grads": grads,
        "state": copy.deepcopy(net.state_dict()),
        "leaks": leaks,
        "n": len(layers),
    }


@pytest.mark.parametrize("sizes", [[4, 4], [5, 2]], ids=["even", "uneven"])
def test_ddp_training_matches_one_process_on_concatenated_batch(sizes):
    steps = 5
    results = run_distributed(_ddp_train_worker, 2, sizes, steps)
    assert [(r["n"], r["leaks"]) for r in results] == [(3, [])] * 2  # TinyBNNet: 3 BN layers
    ref = _reference_net()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for step, (x, y) in enumerate(_global_batches(steps, sizes)):
        opt.zero_grad()
        out = ref(x)
        nn.functional.cross_entropy(out, y).backward()
        got = torch.cat([r["outputs"][step] for r in results])
        torch.testing.assert_close(got, out.detach(), atol=1e-5, rtol=1e-4, msg=f"outputs, step {step}")
        for name, p in ref.named_parameters():
            for r in results:  # DDP has averaged: every rank holds the global gradient
                torch.testing.assert_close(r["grads"][step][name], p.grad, atol=1e-5, rtol=1e-4, msg=f"{name} {step}")
        opt.step()
    for r in results:
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(r["state"][k], v, atol=1e-5, rtol=1e-4, msg=k)


# ---------------------------------------------------------------- layer level: uneven, empty, large mean, subgroups


def _layer_worker(rank, world, sizes, dtype, mean_shift, group_ranks, device="cpu", hw=3):
    group = None
    if group_ranks is not None:  # every rank creates every group, in the same order
        groups = [dist.new_group(r) for r in group_ranks]
        group = next(g for g, r in zip(groups, group_ranks, strict=True) if rank in r)
        members = next(r for r in group_ranks if rank in r)
        sizes_in_group, pos = [sizes[r] for r in members], members.index(rank)
    else:
        sizes_in_group, pos, members = sizes, rank, list(range(world))
    g = torch.Generator().manual_seed(7 + members[0])
    x_all = (torch.randn(sum(sizes_in_group), 4, hw, hw, generator=g, dtype=torch.float64) + mean_shift).to(dtype)
    dy_all = torch.randn(sum(sizes_in_group), 4, hw, hw, generator=g, dtype=torch.float64).to(dtype)
    layer = B.SyncBatchNorm(4, momentum=0.3, process_group=group, dtype=dtype, device=device)
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 1.5, 4))
        layer.bias.copy_(torch.linspace(-0.2, 0.2, 4))
    x = _chunk(x_all, sizes_in_group, pos).to(device).requires_grad_()
    y = layer(x)
    y.backward(_chunk(dy_all, sizes_in_group, pos).to(device))
    dist.all_reduce(layer.weight.grad, group=group)
    dist.all_reduce(layer.bias.grad, group=group)
    out = {"y": y.detach(), "dx": x.grad, "dw": layer.weight.grad, "db": layer.bias.grad}
    out.update(rm=layer.running_mean, rv=layer.running_var)
    out = {k: v.cpu() for k, v in out.items()}
    return {**out, "x_all": x_all, "dy_all": dy_all, "members": members}


def _reference_layer(x_all, dy_all, dtype):
    ref = nn.BatchNorm2d(4, momentum=0.3, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(torch.linspace(0.5, 1.5, 4))
        ref.bias.copy_(torch.linspace(-0.2, 0.2, 4))
    x = x_all.double().requires_grad_()
    y = ref(x)
    y.backward(dy_all.double())
    return y.detach(), x.grad, ref


@pytest.mark.parametrize(
    "sizes,dtype,shift,tol",
    [
        ([3, 5], torch.float64, 0.0, 1e-10),
        ([6, 0], torch.float64, 0.0, 1e-10),  # rank 1 has an EMPTY batch
        ([1, 4], torch.float32, 1e4, 1e-4),  # float32, mean 1e4, against float64 math
    ],
    ids=["uneven-f64", "empty-rank", "large-mean-f32"],
)
def test_uneven_and_empty_batches_equal_the_concatenated_batch(sizes, dtype, shift, tol):
    _check_layer_results(run_distributed(_layer_worker, 2, sizes, dtype, shift, None), dtype, tol)


@pytest.mark.parametrize("shift", [0.3, 3.0], ids=["uncentred", "centred"])
def test_float32_rows_fast_paths_equal_the_concatenated_batch(shift):
    # 8x8 planes: each rank takes the CPU statistics fast path that its own batch allows (see _centered_stats)
    results = run_distributed(_layer_worker, 2, [3, 5], torch.float32, shift, None, "cpu", 8)
    _check_layer_results(results, torch.float32, 1e-5)


@pytest.mark.gpu
@run_if(min_cuda_gpus=2)
@pytest.mark.parametrize("sizes", [[3, 5], [6, 0]], ids=["uneven", "empty-rank"])
def test_nccl_two_gpus_equal_the_concatenated_batch(sizes):
    results = run_distributed(_layer_worker, 2, sizes, torch.float32, 0.0, None, "cuda", backend="nccl")
    _check_layer_results(results, torch.float32, 1e-5)


def _check_layer_results(results, dtype, tol):
    y_ref, dx_ref, ref = _reference_layer(results[0]["x_all"], results[0]["dy_all"], dtype)
    torch.testing.assert_close(torch.cat([r["y"] for r in results]).double(), y_ref, atol=tol, rtol=0)
    torch.testing.assert_close(torch.cat([r["dx"] for r in results]).double(), dx_ref, atol=tol, rtol=0)
    for r in results:
        torch.testing.assert_close(r["dw"].double(), ref.weight.grad, atol=tol * 10, rtol=tol)
        torch.testing.assert_close(r["db"].double(), ref.bias.grad, atol=tol * 10, rtol=tol)
        torch.testing.assert_close(r["rm"].double(), ref.running_mean, atol=tol, rtol=tol)
        torch.testing.assert_close(r["rv"].double(), ref.running_var, atol=tol, rtol=tol)


def test_four_ranks_in_two_subgroups_sync_only_inside_their_group():
    sizes = [2, 3, 4, 1]
    results = run_distributed(_layer_worker, 4, sizes, torch.float64, 0.0, [[0, 1], [2, 3]])
    for members in ([0, 1], [2, 3]):
        group = [results[r] for r in members]
        y_ref, dx_ref, ref = _reference_layer(group[0]["x_all"], group[0]["dy_all"], torch.float64)
        torch.testing.assert_close(torch.cat([r["y"] for r in group]), y_ref)
        torch.testing.assert_close(torch.cat([r["dx"] for r in group]), dx_ref)
        assert torch.equal(group[0]["rm"], group[1]["rm"]) and torch.equal(group[0]["rv"], group[1]["rv"])
        torch.testing.assert_close(group[0]["rm"], ref.running_mean)
    assert not torch.allclose(results[0]["rm"], results[2]["rm"])  # the groups really are separate


# ---------------------------------------------------------------- collectives: exactly one forward, one backward


def _count_worker(rank, world):
    from torch.profiler import profile

    torch.manual_seed(0)
    net = B.convert_sync_batchnorm(TinyBNNet(nn.BatchNorm2d, nn.BatchNorm1d))
    n_bn = sum(isinstance(m, B.SyncBatchNorm) for m in net.modules())
    x = torch.randn(4, 3, 6, 6)

    def gloo_events(fn):
        with profile() as prof:
            fn()
        return sorted(e.name for e in prof.events() if e.name.startswith("gloo:"))

    train_step = gloo_events(lambda: net(x).sum().backward())
    net.eval()
    eval_step = gloo_events(lambda: net(x))
    no_track = B.SyncBatchNorm(3, track_running_stats=False).eval()
    no_track_events = gloo_events(lambda: no_track(torch.randn(4, 3, 2, 2)))
    solo_groups = [dist.new_group([r]) for r in range(world)]
    solo = B.SyncBatchNorm(3, process_group=solo_groups[rank])
    solo_events = gloo_events(lambda: solo(torch.randn(4, 3, 2, 2)).sum().backward())
    return {"n_bn": n_bn, "train": train_step, "eval": eval_step, "no_track": no_track_events, "solo": solo_events}


def test_exactly_two_collectives_per_layer_per_training_step_and_none_in_eval():
    for r in run_distributed(_count_worker, 2):
        assert r["n_bn"] == 3
        assert len(r["train"]) == 2 * r["n_bn"], r["train"]
        assert sum("all_reduce" in e for e in r["train"]) == r["n_bn"]  # backward: one all-reduce per layer
        assert r["eval"] == [] and r["no_track"] == [] and r["solo"] == []


# ---------------------------------------------------------------- errors


def _single_value_worker(rank, world):
    layer = B.SyncBatchNorm(2)
    x = torch.randn(1, 2, 1, 1) if rank == 0 else torch.randn(0, 2, 1, 1)
    try:
        layer(x)
    except ValueError as e:
        return str(e)
    return None


def test_single_value_per_channel_across_the_group_raises_on_every_rank():
    for msg in run_distributed(_single_value_worker, 2):
        assert msg is not None and "more than 1 value per channel" in msg and "SyncBatchNorm(2)" in msg


def test_channel_mismatch_is_a_clear_value_error():
    with pytest.raises(ValueError, match=r"SyncBatchNorm\(4\) expects 4 channels"):
        B.SyncBatchNorm(4)(torch.randn(2, 3, 2))
    with pytest.raises(ValueError, match=r"\(N, C, \*\)"):
        B.SyncBatchNorm(4)(torch.randn(4))


def test_without_process_group_falls_back_to_local_bn():
    assert not dist.is_initialized()
    ours, ref = B.SyncBatchNorm(3), nn.BatchNorm2d(3)
    x = torch.randn(5, 3, 4, 4)
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_var, ref.running_var)
