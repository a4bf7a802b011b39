"""
Each backend's error and time against its iterations
=====================================================

The product backends trade accuracy for matrix products: ``ns`` by its number of Newton–Schulz iterations,
``mtp_lya`` by the degree of its Taylor polynomial, ``mpa_lya`` by the degree of its Padé approximant.
Here each one's forward error :math:`\\|\\hat A^{1/2} - A^{1/2}\\|_F / \\|A^{1/2}\\|_F` against the float64
eigendecomposition, and the time of a forward and backward, for batches of 8 well-conditioned 64×64 float32
matrices (eigenvalues in [1, 4]) on this machine's CPU. ``eig`` (exact, one eigendecomposition) is the
reference line.
"""

import time

import matplotlib.pyplot as plt
import torch

import covpool
import covpool.testing as ct

a = ct.well_conditioned(8, 64, dtype=torch.float32)
exact = ct.exact_root(a)


def measure(backend, repeats=5):
    """Forward error, and the median time of a forward and backward (ms)."""
    error = ct.rel(covpool.sqrtm(a, backend=backend), exact)  # also the warm-up of the timed calls
    times = []
    for _ in range(repeats):
        x = a.clone().requires_grad_()
        start = time.perf_counter()
        covpool.sqrtm(x, backend=backend).sum().backward()
        times.append(time.perf_counter() - start)
    return error, 1e3 * sorted(times)[len(times) // 2]


sweeps = {
    "ns (num_iters)": [({"name": "ns", "num_iters": k}, k) for k in (1, 2, 3, 5, 8, 12)],
    "mtp_lya (degree)": [({"name": "mtp_lya", "degree": k}, k) for k in (2, 4, 6, 10, 16, 24)],
    "mpa_lya (degree k, [k/k])": [({"name": "mpa_lya", "degree": (k, k)}, k) for k in (1, 2, 3, 5, 8)],
}
results = {label: [(k, *measure(spec)) for spec, k in sweep] for label, sweep in sweeps.items()}
eig_error, eig_ms = measure("eig")

fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8))
for label, rows in results.items():
    ks, errors, ms = zip(*rows)
    left.semilogy(ks, errors, marker="o", label=label)
    right.semilogy(ms, errors, marker="o", label=label)
left.axhline(eig_error, color="k", linestyle=":", label="eig")
right.plot([eig_ms], [eig_error], "k*", markersize=10, label="eig")
left.set_xlabel("iterations / degree")
left.set_ylabel("forward relative error")
right.set_xlabel("forward + backward time (ms, this CPU)")
right.set_ylabel("forward relative error")
left.legend(fontsize=8)
fig.suptitle("8 well-conditioned 64×64 matrices, float32")
fig.tight_layout()

# %%
# The numbers behind the figure:
for label, rows in results.items():
    print(label)
    for k, error, ms in rows:
        print(f"  {k:>3}  error {error:9.3g}  {ms:7.2f} ms")
print(f"eig      error {eig_error:9.3g}  {eig_ms:7.2f} ms")
