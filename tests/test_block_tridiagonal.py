"""Block cyclic reduction against a dense solve, and its positive-definiteness test."""

import pytest
import torch

from pullback_manifold.block_tridiagonal import solve_block_tridiagonal

F64 = torch.float64


def _random_system(n, m, d, shift, seed=0):
    """Blocks of a symmetric block-tridiagonal matrix ``B B^T * mask + shift I``, and it dense."""
    gen = torch.Generator().manual_seed(seed)
    B = torch.randn(n, m * d, m * d, generator=gen, dtype=F64)
    i = torch.arange(m)
    band = (i[:, None] - i[None, :]).abs() <= 1
    band = band.repeat_interleave(d, 0).repeat_interleave(d, 1)
    A = (B @ B.mT) * band + shift * torch.eye(m * d, dtype=F64)
    blocks = A.reshape(n, m, d, m, d).permute(0, 1, 3, 2, 4)
    return blocks[:, i, i], blocks[:, i[:-1], i[1:]], A


@pytest.mark.parametrize("m", [1, 2, 3, 4, 7, 8, 31, 100, 511])
@pytest.mark.parametrize("d", [1, 2, 3])
def test_matches_dense_solve(m, d):
    diagonal, upper, A = _random_system(3, m, d, shift=m * d)
    rhs = torch.randn(3, m, d, dtype=F64, generator=torch.Generator().manual_seed(1))
    x, positive = solve_block_tridiagonal(diagonal, upper, rhs)
    expected = torch.linalg.solve(A, rhs.reshape(3, -1)).reshape(3, m, d)
    assert positive.all()
    torch.testing.assert_close(x, expected, rtol=1e-10, atol=1e-12)


def test_indefinite_rows_are_reported_and_do_not_spoil_the_others():
    diagonal, upper, A = _random_system(4, 9, 2, shift=20.0)
    # Row 1: an indefinite matrix whose diagonal blocks are all positive definite
    # (the test must look at the Schur complements, not only the blocks).
    diagonal[1] = torch.eye(2, dtype=F64)
    upper[1] = 0.9 * torch.eye(2, dtype=F64)
    A1 = torch.zeros(18, 18, dtype=F64)
    for k in range(9):
        A1[2 * k : 2 * k + 2, 2 * k : 2 * k + 2] = diagonal[1, k]
    for k in range(8):
        A1[2 * k : 2 * k + 2, 2 * k + 2 : 2 * k + 4] = upper[1, k]
        A1[2 * k + 2 : 2 * k + 4, 2 * k : 2 * k + 2] = upper[1, k].T
    assert torch.linalg.eigvalsh(A1).min() < 0
    rhs = torch.randn(4, 9, 2, dtype=F64)
    x, positive = solve_block_tridiagonal(diagonal, upper, rhs)
    assert positive.tolist() == [True, False, True, True]
    for row in (0, 2, 3):
        torch.testing.assert_close(x[row].reshape(-1), torch.linalg.solve(A[row], rhs[row].reshape(-1)))


def test_shape_errors_say_what_was_expected():
    with pytest.raises(ValueError, match=r"upper .* \(n, m - 1, d, d\)"):
        solve_block_tridiagonal(torch.eye(2).expand(1, 3, 2, 2), torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2))


@pytest.mark.parametrize("d", [2, 3])
def test_ill_conditioned_energy_hessians_are_solved_backward_stably(d):
    """The Newton matrix of a 512-segment polygon's energy, ``N [2 G, -G]`` with an anisotropic
    metric ``G`` (condition 1e4): condition ~1e9, yet the residual must be at rounding level
    relative to ``|A| |x|`` (the written-out 2 x 2 factorization must be as stable as LAPACK's)."""
    m = 511
    gen = torch.Generator().manual_seed(2)
    Q = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))[0]
    # A metric varying slowly along the polygon, like a geodesic's.
    scales = torch.logspace(0, 4, d, dtype=F64) * (1 + 0.5 * torch.linspace(0, 1, m, dtype=F64))[:, None]
    G = Q @ torch.diag_embed(scales) @ Q.mT
    diagonal = 512 * 2 * G
    upper = -512 * 0.5 * (G[:-1] + G[1:])
    A = torch.zeros(m * d, m * d, dtype=F64)
    for k in range(m):
        A[k * d : (k + 1) * d, k * d : (k + 1) * d] = diagonal[k]
    for k in range(m - 1):
        A[k * d : (k + 1) * d, (k + 1) * d : (k + 2) * d] = upper[k]
        A[(k + 1) * d : (k + 2) * d, k * d : (k + 1) * d] = upper[k].T
    assert torch.linalg.cond(A) > 1e8
    rhs = torch.randn(1, m, d, generator=gen, dtype=F64)
    x, positive = solve_block_tridiagonal(diagonal[None], upper[None], rhs)
    assert positive.all()
    residual = (A @ x.reshape(-1) - rhs.reshape(-1)).norm()
    # Measured 4e-17 (Cholesky, LAPACK's or the 2 x 2 one written out); Cramer's rule gave 3e-14.
    assert residual <= 1e-15 * torch.linalg.matrix_norm(A, 2) * x.norm()
