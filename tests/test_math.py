"""Scores, masks and statistics against hand-computed small matrices."""
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from zpruner.masks import Pattern
from zpruner.errors import ZprunerError
from zpruner.masks import keep_mask
from zpruner.scores import get_score, magnitude, wanda
from zpruner.layers import Matrix
from zpruner.stats import ActivationStats, record_inputs

W = torch.tensor([[1.0, -4.0, 2.0, 0.5],
                  [-3.0, 0.25, -1.0, 6.0]])
# two tokens of a 4-input layer: ‖x_j‖₂ = (5, 0, 1, 2)
X = torch.tensor([[3.0, 0.0, 1.0, 0.0],
                  [4.0, 0.0, 0.0, -2.0]])


def stats_of(x: torch.Tensor) -> ActivationStats:
    s = ActivationStats(x.shape[-1])
    s.add(x)
    return s


def test_stats_sums_mean_and_variance():
    s = ActivationStats(4)
    s.add(X[:1])
    s.add(X[1:].reshape(1, 1, 4))  # [batch, seq, d_in] is flattened to tokens
    assert s.count == 2
    assert torch.equal(s.l2, torch.tensor([5.0, 0.0, 1.0, 2.0]))
    assert torch.equal(s.mean, torch.tensor([3.5, 0.0, 0.5, -1.0]))
    assert torch.allclose(s.var, torch.tensor([0.25, 0.0, 0.25, 1.0]))


def test_stats_hessian_is_xtx_and_float32():
    s = ActivationStats(4, hessian=True)
    s.add(X.half())
    assert s.xtx.dtype == torch.float32
    assert torch.equal(s.xtx, X.t() @ X)


def test_magnitude_score():
    assert torch.equal(magnitude(W), W.abs())


def test_wanda_score_hand_computed():
    expected = torch.tensor([[5.0, 0.0, 2.0, 1.0],
                             [15.0, 0.0, 1.0, 12.0]])
    assert torch.equal(wanda(W, stats_of(X)), expected)


def test_unknown_method_names_the_choices():
    with pytest.raises(ZprunerError, match="unknown.*magnitude, wanda"):
        get_score("obs")


def test_row_mask_hand_computed():
    keep = keep_mask(wanda(W, stats_of(X)), 0.5, Pattern(), "row")
    assert keep.tolist() == [[True, False, True, False], [True, False, False, True]]


def test_layer_mask_hand_computed():
    # |W| sorted: 0.25, 0.5, 1, 1, 2, 3, 4, 6 -> the 2 lowest at 25 %, both in different rows
    keep = keep_mask(W.abs(), 0.25, Pattern(), "layer")
    assert keep.tolist() == [[True, True, True, False], [True, False, True, True]]
    # 50 % per layer removes 0.25, 0.5 and both 1s
    keep = keep_mask(W.abs(), 0.5, Pattern(), "layer")
    assert keep.tolist() == [[False, True, True, False], [True, False, False, True]]


def test_nm_mask_hand_computed():
    score = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.5, 0.6, 0.7, 0.1]])
    keep = keep_mask(score, 0.0, Pattern(2, 4))
    assert keep.tolist() == [[True, False, True, False, False, True, True, False]]
    keep = keep_mask(score, 0.0, Pattern(1, 4))
    assert keep.tolist() == [[True, False, True, True, True, True, True, False]]


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99])
@pytest.mark.parametrize("group", ["row", "layer"])
def test_unstructured_sparsity_is_exact(sparsity, group):
    score = torch.randn(37, 120, generator=torch.Generator().manual_seed(0))
    keep = keep_mask(score, sparsity, Pattern(), group)
    if group == "row":
        assert ((~keep).sum(dim=1) == int(sparsity * 120 + 1e-9)).all()
    else:
        assert int((~keep).sum()) == int(sparsity * 37 * 120 + 1e-9)
    # the pruned weights are the lowest-scoring ones of their comparison group
    view = score if group == "row" else score.reshape(1, -1)
    kview = keep if group == "row" else keep.reshape(1, -1)
    for r in range(view.shape[0]):
        pruned, kept = view[r][~kview[r]], view[r][kview[r]]
        if len(pruned) and len(kept):
            assert pruned.max() <= kept.min()


def test_exact_sparsity_with_tied_scores():
    keep = keep_mask(torch.ones(4, 8), 0.5, Pattern(), "row")
    assert ((~keep).sum(dim=1) == 4).all()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 2), (3, 8), (1, 16)])
def test_every_nm_group_has_exactly_n_zeros(n, m):
    score = torch.randn(24, 64, generator=torch.Generator().manual_seed(n * 10 + m))
    keep = keep_mask(score, n / m, Pattern(n, m))
    groups = keep.reshape(24, 64 // m, m)
    assert ((~groups).sum(dim=-1) == n).all()


def test_nm_rejects_indivisible_input():
    with pytest.raises(ZprunerError, match="divisible by 5"):
        keep_mask(torch.randn(4, 64), 0.4, Pattern(2, 5))


@pytest.mark.parametrize("text,expected", [("unstructured", Pattern()), ("2:4", Pattern(2, 4)), ("4:8", Pattern(4, 8))])
def test_pattern_parse(text, expected):
    assert Pattern.parse(text) == expected


@pytest.mark.parametrize("text", ["3:2", "4:4", "0:4", "2-4", "a:b", "structured"])
def test_pattern_parse_rejects(text):
    with pytest.raises(ZprunerError):
        Pattern.parse(text)


def test_record_inputs_handles_linear_and_conv1d():
    torch.manual_seed(0)
    linear, conv = nn.Linear(4, 3), Conv1D(3, 4)  # Conv1D(nf=out, nx=in)
    x = torch.randn(2, 5, 4)
    with record_inputs({"lin": Matrix.of(linear), "conv": Matrix.of(conv)}) as stats:
        linear(x)
        conv(x)
    for name in ("lin", "conv"):
        assert stats[name].count == 10
        assert torch.allclose(stats[name].sumsq, x.reshape(-1, 4).square().sum(0))
    assert not linear._forward_hooks and not conv._forward_hooks  # hooks removed


def test_record_inputs_shares_one_computation_between_layers_fed_the_same_tensor():
    """q/k/v (and gate/up) see the very same tensor: its sums are computed once, merged into
    separate accumulators, and a different tensor with the same values is not mistaken for it."""
    torch.manual_seed(0)
    q, k, other = nn.Linear(4, 3), nn.Linear(4, 2), nn.Linear(4, 3)
    x, y = torch.randn(2, 5, 4), torch.randn(3, 4)
    with record_inputs({"q": Matrix.of(q), "k": Matrix.of(k), "other": Matrix.of(other)}, hessian=True) as stats:
        q(x)
        k(x)
        other(x.clone())
        q(y)
    flat = x.reshape(-1, 4)
    for name in ("k", "other"):
        assert stats[name].count == 10
        assert torch.allclose(stats[name].xtx, flat.t() @ flat, atol=1e-5)
    assert stats["q"].count == 13
    assert torch.allclose(stats["q"].xtx, flat.t() @ flat + y.t() @ y, atol=1e-5)
    assert stats["q"].xtx is not stats["k"].xtx and stats["q"].sum is not stats["k"].sum


def test_hessian_is_accumulated_inside_the_product_and_shared_bit_for_bit():
    """XᵀX += xᵀx is rounded as addmm_ rounds it (``xtx += xᵀ @ x`` is not the same float32
    sum and moved verified SparseGPT results), for every layer fed the same tensors, whether
    a layer computes its own product or copies another's."""
    torch.manual_seed(1)
    q, k, v, o = (nn.Linear(96, 8) for _ in range(4))
    xs = [torch.randn(2, 300, 96) * torch.rand(96) * 3 for _ in range(5)]
    with record_inputs({n: Matrix.of(m) for n, m in {"q": q, "k": k, "v": v, "o": o}.items()}, hessian=True) as stats:
        for i, x in enumerate(xs):
            q(x), k(x), v(x)
            o(x if i % 2 else x.clone())  # the same values, not always the same tensor
    expected = torch.zeros(96, 96)
    for x in xs:
        expected.addmm_(x.reshape(-1, 96).t(), x.reshape(-1, 96))
    for name in "qkvo":
        assert torch.equal(stats[name].xtx, expected), name
    assert len({id(stats[name].xtx) for name in "qkvo"}) == 4  # separate accumulators
    alone = ActivationStats(96, hessian=True)
    for x in xs:
        alone.add(x)
    assert torch.equal(alone.xtx, expected)
