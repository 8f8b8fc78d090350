"""zpruner.kernels.lapack: torch's own LAPACK routines called directly for SparseGPT's factor,
bit for bit what torch.linalg's functions give, and its triangle copy."""
from unittest import mock

import pytest
import torch

from zpruner import sparsegpt
from zpruner.kernels import lapack, native


def direct_or_skip(H: torch.Tensor) -> None:
    if not lapack.available(H):
        pytest.skip("no C compiler here, or no spotrf_ in torch's library: SparseGPT keeps torch.linalg "
                    f"(compiler: {native._compiler()[0]})")


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    """LAPACK's rounding depends on its thread count: each must match torch's on both."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def hessian(d: int, seed: int = 0) -> torch.Tensor:
    """XᵀX of activations with outlier channels, fewer tokens than inputs above 16 (so only
    the damping makes it definite), a dead input with -0.0 in its row and column."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(max(16, d // 2), d, generator=g) * torch.exp(torch.randn(d, generator=g))
    if d > 3:
        X[:, 2] = 0
        X[:, 3] = -X[:, 3]
    H = X.t() @ X
    if d > 3:
        H[2, 3] = H[3, 2] = -0.0
    return H


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().numpy().tobytes()


@pytest.mark.parametrize("d", [1, 2, 7, 64, 65, 200, 700])
def test_direct_factor_is_torch_linalg_bit_for_bit(d, threads):
    H = hessian(d)
    direct_or_skip(H)
    before = bits(H)
    U = sparsegpt.inverse_hessian_factor(H, 0.01)
    with mock.patch.object(lapack, "available", lambda A: False):
        expected = sparsegpt.inverse_hessian_factor(H, 0.01)
    assert bits(U) == bits(expected)
    assert U.stride() == expected.stride() == (1, d)  # column-major, as torch returns it
    assert torch.equal(U, U.triu())
    assert bits(H) == before  # the caller's statistics are left as they were


def test_direct_factor_reads_only_the_lower_triangle_as_torch_does():
    H = hessian(100)
    direct_or_skip(H)
    skewed = H.clone()
    skewed.triu_(1).mul_(3.0).add_(H.tril())  # another upper triangle: torch ignores it, so must this
    B = skewed.clone()
    B.diagonal().add_(1.0)
    expected = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(B)), upper=True)
    U = lapack.inverse_cholesky_upper_(B.t().contiguous())
    assert bits(U) == bits(expected)


def test_not_positive_definite_gives_none_then_sparsegpt_raises_damping(caplog):
    A = -torch.eye(5)
    direct_or_skip(A)
    assert lapack.inverse_cholesky_upper_(A.t().contiguous()) is None
    with pytest.raises(ValueError, match="contiguous"):
        lapack.inverse_cholesky_upper_(torch.eye(6).t())
    H = torch.tensor([[1.0, 1.02], [1.02, 1.0]])  # eigenvalue -0.02: 1 % damping is not enough
    with mock.patch.object(lapack, "available", lambda A: False):
        expected = sparsegpt.inverse_hessian_factor(H, 0.01)
    assert bits(sparsegpt.inverse_hessian_factor(H, 0.01)) == bits(expected)
    assert caplog.text.count("retrying with 0.1") == 2  # once per path


@pytest.mark.parametrize("A", [torch.eye(4, dtype=torch.float64), torch.ones(3, 4), torch.ones(2, 2, 2),
                               torch.empty(0, 0)], ids=["float64", "not square", "batched", "empty"])
def test_other_matrices_keep_torch_linalg(A):
    assert not lapack.available(A)


@pytest.mark.parametrize("n", [1, 2, 63, 64, 65, 130])
def test_mirror_copies_the_upper_triangle_as_bit_patterns(n):
    mirror = native.load(*lapack._MIRROR)
    if mirror is None:
        pytest.skip(f"no C compiler here ({native._compiler()[0]})")
    g = torch.Generator().manual_seed(n)
    full = torch.randn(n, n + 3, generator=g)
    R = full[:, :n]  # a row stride larger than n
    R[0, -1] = -0.0
    R.view(torch.int32)[0, 0] = 0x7FC00123  # a NaN with a payload
    if n > 2:
        R.view(torch.int32)[1, 2] = 0x7F800001
    expected = torch.where(torch.ones(n, n, dtype=torch.bool).triu(), R, R.t()).view(torch.int32).clone()
    untouched = full[:, n:].clone()
    mirror.mirror_upper_to_lower(R.data_ptr(), n, R.stride(0))
    assert torch.equal(R.view(torch.int32), expected)
    assert torch.equal(full[:, n:], untouched)
