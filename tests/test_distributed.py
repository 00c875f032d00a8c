"""DistributedDataParallel on the CPU (gloo): two processes, each on its half of a global batch, train
a small SNN student (Linear -> LIFNode -> Linear, cpp backend) for 3 SGD steps with per_timestep_kl
(reduction "batchmean") + cross-entropy against a fixed random teacher. With "batchmean" over the
local batch (losses.py) and DDP averaging the gradients, the result must be the single-process run on
the whole global batch: parameters and the rank-averaged loss equal within 1e-5 (same init, same data).
"""
import os
import time
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F

import snnkd_fast
from snnkd_fast import nn as snn
from snnkd_fast.losses import per_timestep_kl

WORLD_SIZE, STEPS = 2, 3
T, GLOBAL_BATCH, D_IN, HIDDEN, CLASSES = 4, 8, 12, 48, 10
TOLERANCE = 1e-5
JOIN_TIMEOUT_S = 240


def _skip_reason():
    import torch.distributed as dist

    if not dist.is_available():
        return "torch.distributed is not available in this torch build"
    if not dist.is_gloo_available():
        return "the gloo backend of torch.distributed is not available"
    for family in ("lif", "kd"):
        status = snnkd_fast.backends(family)["cpp"]
        if not status:
            return f"backend 'cpp' unavailable: {status.reason}"
    return None


def _model():
    torch.manual_seed(0)  # same init in every process
    return torch.nn.Sequential(torch.nn.Linear(D_IN, HIDDEN), snn.LIFNode(tau=2.0, step_mode="m", backend="cpp"),
                               torch.nn.Linear(HIDDEN, CLASSES))


def _data():
    """Per step: inputs [T, GLOBAL_BATCH, D_IN], labels [GLOBAL_BATCH], the fixed teacher's logits."""
    g = torch.Generator().manual_seed(42)
    teacher = torch.nn.Linear(D_IN, CLASSES)
    with torch.no_grad():
        teacher.weight.copy_(torch.randn(CLASSES, D_IN, generator=g))
        teacher.bias.copy_(torch.randn(CLASSES, generator=g))
        batches = []
        for _ in range(STEPS):
            x = torch.randn(T, GLOBAL_BATCH, D_IN, generator=g) * 2.0
            y = torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=g)
            batches.append((x, y, teacher(x.mean(0))))
    return batches


def _loss(model, node, x, y, teacher_logits):
    node.reset()  # the membrane must not carry over from the previous step (or batch size)
    out = model(x)
    return per_timestep_kl(out, teacher_logits, temperature=4.0, reduction="batchmean", backend="cpp") + \
        F.cross_entropy(out.mean(0), y)


def _train(model, node, batches, rows, step_hook=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for x, y, teacher_logits in batches:
        loss = _loss(model, node, x[:, rows], y[rows], teacher_logits[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(step_hook(loss.detach()) if step_hook else loss.detach())
    return losses


def _worker(rank, world_size, init_file, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    if os.path.exists("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # no dependence on the host name resolving
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        model = _model()
        ddp = DistributedDataParallel(model)
        local = GLOBAL_BATCH // world_size
        rows = slice(rank * local, (rank + 1) * local)

        def averaged(loss):
            loss = loss.clone()
            dist.all_reduce(loss)
            return loss / world_size

        losses = _train(ddp, model[1], _data(), rows, step_hook=averaged)
        torch.save({"params": [p.detach() for p in model.parameters()], "losses": losses},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_match_single_process(tmp_path):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    import torch.multiprocessing as mp

    context = mp.spawn(_worker, args=(WORLD_SIZE, str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD_SIZE,
                       join=False)
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while not context.join(timeout=5):  # raises if a worker failed (and terminates the others)
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the DDP workers did not finish within {JOIN_TIMEOUT_S} s")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _model()
        single_losses = _train(model, model[1], _data(), slice(None))
    finally:
        torch.set_num_threads(threads)
    single_params = [p.detach() for p in model.parameters()]

    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    initial = [p.detach() for p in _model().parameters()]
    for name, ddp_value, value in zip(("w1", "b1", "w2", "b2"), ranks[0]["params"], single_params):
        torch.testing.assert_close(ddp_value, value, rtol=TOLERANCE, atol=TOLERANCE, msg=lambda m: f"{name}: {m}")
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(a, b), "the ranks' replicas diverged"
    assert any(not torch.equal(p, q) for p, q in zip(single_params, initial)), "the parameters did not move"
    for step, (ddp_loss, loss) in enumerate(zip(ranks[0]["losses"], single_losses)):
        torch.testing.assert_close(ddp_loss, loss, rtol=TOLERANCE, atol=TOLERANCE, msg=lambda m: f"step {step}: {m}")
        assert torch.equal(ranks[1]["losses"][step], ddp_loss)
