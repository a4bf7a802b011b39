"""Time and accuracy of every square-root backend against the exact root.

For a batch of covariance matrices like those covariance pooling produces (features of n channels over
m positions, plus a small ridge), each backend's ``covpool.sqrtm`` is timed (forward, and forward +
backward) and its relative error measured against the float64 eigendecomposition root.

    python examples/compare_backends.py             # 64 matrices of 256x256
    python examples/compare_backends.py --small
"""
from __future__ import annotations

import argparse
import time

import torch

import covpool


def exact_sqrtm(a: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(a.double())
    return (vecs * vals.clamp_min(0).sqrt().unsqueeze(-2)) @ vecs.mT


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="tiny sizes: runs in seconds on a CPU")
    args = parser.parse_args(argv)
    batch, dim, repeats = (4, 16, 1) if args.small else (args.batch, args.dim, args.repeats)

    torch.manual_seed(0)
    feats = torch.randn(batch, dim, 2 * dim)
    cov = covpool.covariance(feats) + 1e-3 * torch.eye(dim)
    reference = exact_sqrtm(cov)
    print(f"{batch} covariance matrices of {dim}x{dim}, float32; error = ||S - S_exact||_F / ||S_exact||_F")
    print(f"{'backend':<12}{'forward ms':>12}{'fwd+bwd ms':>12}{'rel. error':>12}")
    results = {}
    for name in covpool.list_backends():
        out = covpool.sqrtm(cov, backend=name)
        error = ((out.double() - reference).norm(dim=(-2, -1)) / reference.norm(dim=(-2, -1))).max().item()
        leaf = cov.clone().requires_grad_(True)
        fwd = timed(lambda: covpool.sqrtm(cov, backend=name), repeats)
        both = timed(lambda: covpool.sqrtm(leaf, backend=name).sum().backward(), repeats)
        results[name] = {"forward_s": fwd, "forward_backward_s": both, "rel_error": error}
        print(f"{name:<12}{1e3 * fwd:>12.2f}{1e3 * both:>12.2f}{error:>12.2e}")
    return results


if __name__ == "__main__":
    main()
