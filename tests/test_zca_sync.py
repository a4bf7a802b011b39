"""Synchronised ZCA batch norm: two gloo processes on CPU against one process on the concatenated batch.

The file is also the worker script: the test starts ``python tests/test_zca_sync.py RANK STORE OUT`` twice,
which avoids pickling test functions into spawned interpreters.
"""
import os
import subprocess
import sys
from pathlib import Path

import torch

from covpool.layers import ZCABatchNorm2d, convert_sync_zca

WORLD_SIZE = 2
CHANNELS, GROUP = 8, 4
CASES = {"unequal": (5, 3), "equal": (4, 4)}  # per-rank batch sizes
# Float64 everywhere: the only differences are the summation orders of the all-reduces.
RTOL, ATOL = 1e-9, 1e-11


def make_inputs(sizes):
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(CHANNELS, CHANNELS, generator=g, dtype=torch.float64)
    z = torch.randn(sum(sizes), CHANNELS, 3, 3, generator=g, dtype=torch.float64)
    # Correlated channels with a large offset, so centring and whitening both matter.
    x = torch.einsum("dc,bchw->bdhw", mix, z) + 3.0
    probe = torch.randn(x.shape, generator=g, dtype=torch.float64)
    return x, probe


def make_layer():
    layer = ZCABatchNorm2d(CHANNELS, group_size=GROUP, backend="eig", dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.weight.copy_(0.5 + torch.rand(CHANNELS, generator=g, dtype=torch.float64))
        layer.bias.copy_(torch.randn(CHANNELS, generator=g, dtype=torch.float64))
    return layer


def step(layer, x, probe):
    """One training forward/backward with a fixed linear loss; everything the test compares."""
    x = x.clone().requires_grad_()
    out = layer(x)
    (out * probe).sum().backward()
    return {
        "out": out.detach(),
        "x_grad": x.grad,
        "weight_grad": layer.weight.grad,
        "bias_grad": layer.bias.grad,
        "running_mean": layer.running_mean.clone(),
        "running_cov": layer.running_cov.clone(),
    }


def worker(rank, store, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD_SIZE)
    try:
        results = {}
        for name, sizes in CASES.items():
            x, probe = make_inputs(sizes)
            start = sum(sizes[:rank])
            part = slice(start, start + sizes[rank])
            layer = convert_sync_zca(make_layer())
            results[name] = step(layer, x[part], probe[part])
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_whiten_and_backpropagate_as_one(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    store = tmp_path / "store"
    procs = [
        subprocess.Popen([sys.executable, __file__, str(rank), str(store), str(tmp_path)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in range(WORLD_SIZE)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=120)[0])
    finally:
        for proc in procs:
            proc.kill()
    assert [p.returncode for p in procs] == [0] * WORLD_SIZE, "\n".join(logs)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]

    for name, sizes in CASES.items():
        x, probe = make_inputs(sizes)
        ref = step(make_layer(), x, probe)
        parts = [r[name] for r in ranks]
        for key in ("out", "x_grad"):
            torch.testing.assert_close(torch.cat([p[key] for p in parts]), ref[key], rtol=RTOL, atol=ATOL,
                                       msg=lambda m, key=key: f"{name}: {key}: {m}")
        # Each rank holds the gradient of its own samples' loss; DDP would average these over ranks.
        for key in ("weight_grad", "bias_grad"):
            torch.testing.assert_close(sum(p[key] for p in parts), ref[key], rtol=RTOL, atol=ATOL,
                                       msg=lambda m, key=key: f"{name}: {key}: {m}")
        for key in ("running_mean", "running_cov"):
            for p in parts:
                torch.testing.assert_close(p[key], ref[key], rtol=RTOL, atol=ATOL,
                                           msg=lambda m, key=key: f"{name}: {key}: {m}")
        # Sanity: the local statistics of one rank would have given a different output.
        local = step(make_layer(), x[:sizes[0]], probe[:sizes[0]])["out"]
        assert (local - parts[0]["out"]).abs().max() > 1e-2


if __name__ == "__main__":
    worker(int(sys.argv[1]), sys.argv[2], sys.argv[3])
