"""
The spectrum of a covariance before and after each normalisation
=================================================================

A second-order head pools a backbone's features into a covariance
:math:`\\Sigma = \\frac{1}{N} X_c X_c^\\top` of :math:`N` positions and :math:`d` channels, then normalises it.
With :math:`N < d` the covariance has rank :math:`N - 1` and its eigenvalues spread over orders of magnitude;
the normalisations differ in how much they compress that spread:

- the matrix square root :math:`\\Sigma^{1/2}` (exact: ``eig``) halves the spread on a log scale;
- the matrix power :math:`\\Sigma^{\\alpha}` (MPN-COV, :func:`covpool.matrix_power`) with :math:`\\alpha < 1/2`
  compresses it more;
- Newton–Schulz (``ns``, iSQRT-COV) is a polynomial of :math:`\\Sigma` that is nearly linear at small
  eigenvalues until it has converged there: with 2 iterations the spectrum keeps almost Σ's spread, with 5
  it is halfway to the square root's;
- the Padé approximant of ``mpa_lya`` is not 0 at a zero eigenvalue: it lifts the smallest eigenvalues to a
  floor.

Here: 4 images of 64 channels at 7×7 positions (:math:`N = 49 < d = 64`), float64.
"""

import matplotlib.pyplot as plt
import torch

import covpool

torch.manual_seed(0)
x = torch.randn(4, 64, 49, dtype=torch.float64)
x = x * torch.logspace(0, -1.5, 64, dtype=torch.float64)[:, None]  # channels of decreasing energy
cov = covpool.covariance(x)

normalised = {
    "none (Σ)": cov,
    "eig: Σ^½ exact": covpool.sqrtm(cov, backend="eig"),
    "ns, 5 iterations": covpool.sqrtm(cov, backend="ns", num_iters=5),
    "ns, 2 iterations": covpool.sqrtm(cov, backend="ns", num_iters=2),
    "mpa_lya": covpool.sqrtm(cov, backend="mpa_lya"),
    "matrix power α = 0.25": covpool.matrix_power(cov, 0.25),
}

fig, ax = plt.subplots(figsize=(7, 4.2))
for label, matrix in normalised.items():
    eigenvalues = torch.linalg.eigvalsh(matrix[0]).flip(0).clamp_min(1e-12)
    ax.semilogy(eigenvalues[:48] / eigenvalues[0], marker=".", label=label)
ax.set_xlabel("eigenvalue index (largest first; the first 48 of rank 48)")
ax.set_ylabel("eigenvalue / largest")
ax.set_title("Spectrum of one covariance, 64 channels at 7×7")
ax.legend(fontsize=8)
fig.tight_layout()

# %%
# The exact square root halves the log-spread; each backend's relative error against it:
exact = normalised["eig: Σ^½ exact"]
for label in ("ns, 5 iterations", "ns, 2 iterations", "mpa_lya"):
    error = (normalised[label] - exact).norm() / exact.norm()
    print(f"{label:<18} relative error {error:.3g}")
