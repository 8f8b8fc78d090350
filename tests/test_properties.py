"""Property-based tests of the pure tensor functions (hypothesis): for arbitrary shapes and
scores, ties included, every mask has exactly the promised zeros at the lowest scores; EC
never revives a pruned weight; SparseGPT with an identity Hessian and a given mask is
masking."""
from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zpruner.masks import Pattern
from zpruner.masks import keep_mask, n_pruned
from zpruner.sparsegpt import sparsegpt
from zpruner.updates import energy_compensate

PROPERTY = settings(max_examples=60, deadline=None)


@st.composite
def scores(draw, cols_multiple_of: int = 1):
    """[rows, cols] scores from few distinct values, so ties are common."""
    rows = draw(st.integers(1, 6))
    cols = cols_multiple_of * draw(st.integers(1, 12 // cols_multiple_of + 1))
    levels = draw(st.integers(1, 4))
    values = draw(st.lists(st.integers(0, levels), min_size=rows * cols, max_size=rows * cols))
    return torch.tensor(values, dtype=torch.float32).reshape(rows, cols)


def _lowest_were_dropped(score: torch.Tensor, keep: torch.Tensor) -> None:
    """Within each row of the view: no dropped score exceeds a kept one."""
    for s, k in zip(score, keep):
        if (~k).any() and k.any():
            assert s[~k].max() <= s[k].min()


@PROPERTY
@given(score=scores(), sparsity=st.floats(0.0, 0.99))
def test_row_masks_drop_exactly_the_lowest(score, sparsity):
    keep = keep_mask(score, sparsity, Pattern(), "row")
    assert ((~keep).sum(1) == n_pruned(sparsity, score.shape[1])).all()
    _lowest_were_dropped(score, keep)


@PROPERTY
@given(score=scores(), sparsity=st.floats(0.0, 0.99))
def test_layer_masks_drop_exactly_the_lowest(score, sparsity):
    keep = keep_mask(score, sparsity, Pattern(), "layer")
    assert int((~keep).sum()) == n_pruned(sparsity, score.numel())
    _lowest_were_dropped(score.reshape(1, -1), keep.reshape(1, -1))


@PROPERTY
@given(data=st.data(), m=st.integers(2, 8))
def test_nm_masks_have_n_zeros_in_every_group(data, m):
    n = data.draw(st.integers(1, m - 1))
    score = data.draw(scores(cols_multiple_of=m))
    keep = keep_mask(score, n / m, Pattern(n, m))
    groups_score, groups_keep = score.reshape(-1, m), keep.reshape(-1, m)
    assert ((~groups_keep).sum(1) == n).all()
    _lowest_were_dropped(groups_score, groups_keep)


@PROPERTY
@given(seed=st.integers(0, 10_000), shape=st.tuples(st.integers(1, 8), st.integers(1, 8)),
       keep_fraction=st.floats(0.0, 1.0), lo=st.floats(0.0, 1.0), hi=st.floats(1.0, 10.0),
       axes=st.sampled_from([("col",), ("row",), ("col", "row"), ("row", "col")]))
def test_energy_compensation_never_revives_a_pruned_weight(seed, shape, keep_fraction, lo, hi, axes):
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(shape, generator=g)
    keep = torch.rand(shape, generator=g) < keep_fraction
    out = energy_compensate(W0, W0, keep, axes, (lo, hi))
    assert (out[~keep] == 0).all()
    assert torch.isfinite(out).all()


@PROPERTY
@given(seed=st.integers(0, 10_000), rows=st.integers(1, 6), cols=st.integers(1, 20),
       scale=st.floats(0.01, 100.0), damp=st.floats(1e-4, 1.0), blocksize=st.integers(1, 8))
def test_sparsegpt_with_an_identity_hessian_and_a_given_mask_is_masking(seed, rows, cols, scale, damp, blocksize):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    keep = torch.rand(rows, cols, generator=g) < 0.5
    # H = c·I: the inputs are uncorrelated, so no kept weight can absorb a pruned one's error
    out, kept = sparsegpt(W, scale * torch.eye(cols), keep=keep, blocksize=blocksize, damp=damp)
    assert torch.equal(kept, keep)
    torch.testing.assert_close(out, W * keep, rtol=0, atol=1e-6 * math.sqrt(cols))
