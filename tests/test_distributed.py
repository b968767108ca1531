"""The loss's all-gather keeps the gradient of the local slice: two CPU processes (gloo), each with half
of a batch, get together the gradient that one process computes on the whole batch."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from diffusionret_nb.losses import gather_with_grad, symmetric_infonce


def _loss(x, y, rank, world):
    gx, gy = gather_with_grad(x, rank, world), gather_with_grad(y, rank, world)
    sim = torch.nn.functional.normalize(gx, dim=-1) @ torch.nn.functional.normalize(gy, dim=-1).T
    return symmetric_infonce(sim, torch.tensor(2.0))


def _worker(rank, world, port, X, Y, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    n = X.shape[0] // world
    x = X[rank * n:(rank + 1) * n].clone().requires_grad_(True)
    y = Y[rank * n:(rank + 1) * n].clone().requires_grad_(True)
    _loss(x, y, rank, world).backward()
    out[rank] = (x.grad.clone(), y.grad.clone())
    dist.destroy_process_group()


def test_gather_with_grad_matches_single_process():
    torch.manual_seed(0)
    X, Y = torch.randn(8, 5), torch.randn(8, 5)
    xs, ys = X.clone().requires_grad_(True), Y.clone().requires_grad_(True)
    _loss(xs, ys, 0, 1).backward()
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(2, port, X, Y, out), nprocs=2, join=True)
    gx = torch.cat([out[0][0], out[1][0]]); gy = torch.cat([out[0][1], out[1][1]])
    # every rank computes the loss of the whole global batch but keeps the graph of its own slice only,
    # so the local gradients side by side are the single-process gradient (DDP then averages parameter
    # gradients over ranks: the full gradient divided by the world size, as in the reference)
    torch.testing.assert_close(gx, xs.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gy, ys.grad, rtol=1e-5, atol=1e-6)
