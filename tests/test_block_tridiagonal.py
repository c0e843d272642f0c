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
