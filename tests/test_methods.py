"""RIA, Z-Pruner, CVR, energy compensation and SparseGPT against hand-computed matrices,
their invariants, and every method x pattern x update on a tiny model."""
import logging
import math

import pytest
import torch

from conftest import build_tiny_model
from zpruner import PruneConfig, prune
from zpruner.masks import Pattern
from zpruner.errors import ZprunerError
from zpruner.layers import iter_matrices
from zpruner.masks import drop_lowest, keep_mask, n_pruned
from zpruner.reallocation import best_permutation, heuristic_permutation, nm_retained
from zpruner.scores import cvr, ria, zpruner
from zpruner.sparsegpt import inverse_hessian_factor, sparsegpt
from zpruner.stats import ActivationStats
from zpruner.updates import energy_compensate, energy_scale

W = torch.tensor([[1.0, -4.0, 2.0, 0.5],
                  [-3.0, 0.25, -1.0, 6.0]])
# two tokens: ‖x_j‖₂ = (5, 0, 1, 2), Var(x_j) = (0.25, 0, 0.25, 1)
X = torch.tensor([[3.0, 0.0, 1.0, 0.0],
                  [4.0, 0.0, 0.0, -2.0]])


def stats_of(x: torch.Tensor, hessian: bool = False) -> ActivationStats:
    s = ActivationStats(x.shape[-1], hessian=hessian)
    s.add(x)
    return s


def test_ria_score_hand_computed():
    # column sums of |W|: 4, 4.25, 3, 6.5; row sums: 7.5, 10.25; ‖x‖^0.5 = (√5, 0, 1, √2)
    expected = torch.tensor([
        [(1 / 4 + 1 / 7.5) * 5 ** 0.5, 0.0, 2 / 3 + 2 / 7.5, (0.5 / 6.5 + 0.5 / 7.5) * 2 ** 0.5],
        [(3 / 4 + 3 / 10.25) * 5 ** 0.5, 0.0, 1 / 3 + 1 / 10.25, (6 / 6.5 + 6 / 10.25) * 2 ** 0.5],
    ])
    assert torch.allclose(ria(W, stats_of(X), a=0.5), expected)
    # a = 1 weights the activation norm linearly
    assert torch.allclose(ria(W, stats_of(X), a=1.0)[0, 0], torch.tensor((1 / 4 + 1 / 7.5) * 5))


def test_cvr_score_hand_computed():
    # Var(x)^(1/4) = (√0.5, 0, √0.5, 1); population variance of W's columns: 4, 4.515625, 2.25, 7.5625
    a = torch.tensor([0.5 ** 0.5, 0.0, 0.5 ** 0.5, 1.0])
    col_var = torch.tensor([4.0, 4.515625, 2.25, 7.5625])
    assert torch.allclose(cvr(W, stats_of(X), alpha=1.0, eps=0.0), W.abs() * a / col_var.sqrt())
    assert torch.allclose(cvr(W, stats_of(X), alpha=0.5, eps=0.4375), W.abs() * a / (col_var + 0.4375) ** 0.25)
    # alpha = 0: the weight variance plays no part
    assert torch.allclose(cvr(W, stats_of(X), alpha=0.0, eps=1e-6), W.abs() * a)


def test_zpruner_score_hand_computed():
    W2 = torch.tensor([[3.0, 4.0], [0.0, 5.0]])
    x = torch.tensor([[2.0, 1.0], [0.0, 0.0]])  # ‖x‖ = (2, 1)
    # row-normalised: .6 .8 / 0 1 -> deviations from .6: 0 .2 -.6 .4, unbiased std sqrt(.56/3)
    z_row = torch.tensor([[0.0, 0.2], [-0.6, 0.4]]) / (0.56 / 3) ** 0.5
    # column-normalised: 1 4/√41 / 0 5/√41
    col = torch.tensor([[1.0, 4 / 41 ** 0.5], [0.0, 5 / 41 ** 0.5]])
    z_col = (col - col.mean()) / col.std()
    alpha = 0.7 * (1 - 0.3 * 0.25)  # one of four |W| (the 0) is below 0.1·mean|W| = 0.3
    expected = (alpha * z_row.abs() ** 3 + (1 - alpha) * z_col.abs() ** 3) * torch.tensor([2.0, 1.0]) ** 1.5
    assert torch.allclose(zpruner(W2, stats_of(x)), expected, atol=1e-6)


def test_scores_survive_all_zero_rows_and_columns():
    Z = torch.zeros(3, 4)
    Z[1, 2] = 1.0
    s = stats_of(torch.ones(2, 4))
    for score in (ria(Z, s, a=0.5), zpruner(Z, s), cvr(Z, s, alpha=0.5, eps=1e-6)):
        assert torch.isfinite(score).all()


def test_ec_column_hand_computed():
    W0 = torch.tensor([[3.0], [1.0], [-1.0], [1.0]])  # μ = 1, centred energy 4 + 0 + 4 + 0 = 8
    keep = torch.tensor([[True], [True], [False], [False]])  # kept centred energy 4 -> γ = √2
    out = energy_compensate(W0, W0 * keep, keep, ("col",))
    assert torch.allclose(out, torch.tensor([[1 + 2 * 2 ** 0.5], [1.0], [0.0], [0.0]]))
    clamped = energy_compensate(W0, W0 * keep, keep, ("col",), clamp=(0.5, 1.25))
    assert torch.allclose(clamped, torch.tensor([[1 + 2 * 1.25], [1.0], [0.0], [0.0]]))


def centred_energy(W0, W, keep, dim):
    mu = W0.mean(dim=dim, keepdim=True)
    return ((W - mu) * keep).square().sum(dim=dim), (W0 - mu).square().sum(dim=dim)


@pytest.mark.parametrize("mode,dim", [(("col",), 0), (("row",), 1), (("col", "row"), 1)])
def test_ec_matches_energy_keeps_zeros_and_sparsity(mode, dim):
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(24, 32, generator=g) + 0.3
    keep = keep_mask(W0.abs(), 0.5, Pattern(), "row")
    out = energy_compensate(W0, W0 * keep, keep, mode)
    assert torch.equal(out == 0, ~keep)
    got, want = centred_energy(W0, out, keep, dim)
    assert torch.allclose(got, want, rtol=1e-4)  # the last pass matches exactly


def test_ec_respects_the_clamp():
    g = torch.Generator().manual_seed(1)
    W0 = torch.randn(16, 16, generator=g)
    keep = keep_mask(W0.abs(), 0.7, Pattern(), "row")
    _, gamma = energy_scale(W0, W0 * keep, keep, 1)
    assert gamma.max() > 1.1  # so the clamp below binds
    out = energy_compensate(W0, W0 * keep, keep, ("row",), clamp=(1 / 1.1, 1.1))
    got, want = centred_energy(W0, out, keep, 1)
    ratio = (got / want).sqrt()  # how far each row got towards its target
    expected = (gamma.squeeze(1).clamp(1 / 1.1, 1.1) / gamma.squeeze(1))
    assert torch.allclose(ratio, expected, rtol=1e-4)
    assert torch.equal(out == 0, ~keep)


def correlated_layer(d_out=16, d_in=32, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, d_in, generator=g) @ torch.randn(d_in, d_in, generator=g)  # correlated inputs
    Wt = torch.randn(d_out, d_in, generator=g)
    return Wt, X


@pytest.mark.parametrize("pattern", [Pattern(), Pattern(2, 4)])
def test_sparsegpt_reconstructs_better_than_the_same_mask_alone(pattern):
    Wt, X = correlated_layer()
    keep = keep_mask(Wt.abs() * X.norm(dim=0), 0.5, pattern, "row")
    W_new, keep_out = sparsegpt(Wt, X.t() @ X, keep=keep, blocksize=8)
    assert torch.equal(keep_out, keep) and torch.equal(W_new == 0, ~keep)
    err_mask = ((Wt - Wt * keep) @ X.t()).norm()
    err_sparsegpt = ((Wt - W_new) @ X.t()).norm()
    assert err_sparsegpt < 0.95 * err_mask


def test_sparsegpt_at_zero_sparsity_returns_w_unchanged():
    Wt, X = correlated_layer()
    W_new, keep = sparsegpt(Wt, X.t() @ X, sparsity=0.0, blocksize=8)
    assert keep.all() and torch.equal(W_new, Wt)


def test_sparsegpt_identity_hessian_leaves_kept_weights_unchanged():
    Wt, _ = correlated_layer()
    keep = keep_mask(Wt.abs(), 0.5, Pattern(), "row")
    W_new, _ = sparsegpt(Wt, torch.eye(Wt.shape[1]), keep=keep, blocksize=8)
    assert torch.equal(W_new, Wt * keep)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.77])
def test_sparsegpt_own_mask_has_the_exact_layer_sparsity(sparsity):
    Wt, X = correlated_layer(d_out=10, d_in=36)
    W_new, keep = sparsegpt(Wt, X.t() @ X, sparsity=sparsity, blocksize=8)
    assert (~keep).sum().item() == math.floor(sparsity * keep.numel())
    assert torch.equal(W_new == 0, ~keep)


@pytest.mark.parametrize("n,m,blocksize", [(2, 4, 128), (4, 8, 12), (1, 4, 3)])
def test_sparsegpt_own_nm_mask_is_valid(n, m, blocksize):
    Wt, X = correlated_layer()
    W_new, keep = sparsegpt(Wt, X.t() @ X, pattern=Pattern(n, m), blocksize=blocksize)
    assert ((~keep).reshape(-1, m).sum(dim=1) == n).all()
    assert torch.equal(W_new == 0, ~keep)


def test_sparsegpt_raises_damping_with_a_warning(caplog):
    H = torch.tensor([[1.0, 1.02], [1.02, 1.0]])  # eigenvalue -0.02: 1 % damping is not enough
    with caplog.at_level(logging.WARNING, logger="zpruner"):
        U = inverse_hessian_factor(H, 0.01)
    assert torch.isfinite(U).all() and "retrying with 0.1" in caplog.text


def test_sparsegpt_gives_up_with_a_clear_error():
    with pytest.raises(ZprunerError, match="singular.*--nsamples"):
        inverse_hessian_factor(-torch.eye(3), 0.01)


def test_inverse_hessian_factor_is_the_cholesky_of_the_damped_inverse_bit_for_bit():
    """The factorisation works on one copy at a time (memory); its bits are those of the
    textbook expression chol((H + λI)⁻¹) with λ = damp · mean(diag H), dead inputs at 1."""
    _, X = correlated_layer()
    X[:, 3] = 0  # a dead input: its row and column of H are zeros, some of them -0.0
    X[:, 5] = -X[:, 5]
    H = X.t() @ X
    H[3, 5] = H[5, 3] = -0.0
    expected_H = H.clone()
    expected_H[3, 3] = 1.0
    damped = expected_H + 0.01 * expected_H.diagonal().mean() * torch.eye(len(H))
    expected = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    before = H.clone()
    U = inverse_hessian_factor(H, 0.01)
    assert U.numpy().tobytes() == expected.numpy().tobytes()
    assert H.numpy().tobytes() == before.numpy().tobytes()  # the caller's statistics are left as they were


def test_sparsegpt_dead_inputs_do_not_break_the_factorisation():
    Wt, X = correlated_layer()
    X[:, 3] = 0
    W_new, keep = sparsegpt(Wt, X.t() @ X, sparsity=0.5, blocksize=8)
    assert torch.isfinite(W_new).all()


@pytest.mark.parametrize("kwargs,message", [
    (dict(method="sparsegpt", update="sparsegpt"), "already reconstructs"),
    (dict(method="sparsegpt", group="row"), "--group does not apply"),
    (dict(update="ec2"), "update 'ec2' is unknown"),
    (dict(ec_clamp=(1.5, 2.0)), "must contain 1"),
    (dict(reallocate=True), "--reallocate needs an N:M"),
    (dict(method="sparsegpt", pattern="2:4", reallocate=True), "--reallocate needs"),
    (dict(damp=0.0), r"damp \(--damp\) must be a finite number > 0"),
])
def test_bad_method_combinations_are_refused(kwargs, message):
    with pytest.raises(ZprunerError, match=message):
        PruneConfig(**kwargs)


METHODS = ["magnitude", "wanda", "ria", "zpruner", "cvr", "sparsegpt"]


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_and_pattern_reaches_exact_sparsity(method, pattern):
    updates = ["none", "ec"] + (["sparsegpt"] if method == "wanda" else [])
    samples = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    for update in updates:
        model = build_tiny_model("llama", vocab_size=300)
        dense = {name: layer.weight.clone() for name, layer in iter_matrices(model)}
        config = PruneConfig(method=method, pattern=pattern, update=update, nsamples=4, seqlen=32)
        prune(model, config, samples, progress=False)
        for name, layer in iter_matrices(model):
            W = layer.weight
            assert torch.isfinite(W).all()
            if config.parsed_pattern.is_nm:
                n, m = config.parsed_pattern.n, config.parsed_pattern.m
                assert ((W == 0).reshape(-1, m).sum(dim=1) == n).all(), (method, update, name)
            elif config.group == "layer" or (config.group is None and method in ("magnitude", "ria", "sparsegpt")):
                assert (W == 0).sum().item() == W.numel() // 2, (method, update, name)
            else:
                assert ((W == 0).sum(dim=1) == W.shape[1] // 2).all(), (method, update, name)
            if update == "none" and method != "sparsegpt":
                kept = W != 0
                assert torch.equal(W[kept], dense[name][kept])  # a mask alone changes no kept weight


def test_sparsegpt_blocked_solver_equals_column_by_column_obs():
    """The blocked, lazily updated solver gives what optimal brain surgeon gives when each
    pruned weight is removed in turn, re-inverting the damped Hessian of the columns left."""
    Wt, X = correlated_layer(d_out=4, d_in=12, seed=3)
    keep = keep_mask(Wt.abs(), 0.5, Pattern(), "row")
    H = (X.t() @ X).double()
    H_damped = H + 0.01 * H.diagonal().mean() * torch.eye(12, dtype=torch.float64)
    expected = Wt.double().clone()
    for i in range(4):
        for j in range(12):
            if not keep[i, j]:
                rest = H_damped[j:, j:].inverse()[0]
                expected[i, j:] -= expected[i, j] / rest[0] * rest
    got, _ = sparsegpt(Wt, X.t() @ X, keep=keep, blocksize=5)
    assert torch.allclose(got.double(), expected, atol=1e-4)


def reference_layout_sparsegpt(W, H, keep, sparsity, pattern, blocksize):
    """The reference code's loop (IST-DASLab/sparsegpt, ``fasterprune``) as it is written,
    on column slices of W: the solver must give its bits, whatever layout it works in."""
    W = W.float().clone()
    d_out, d_in = W.shape
    U = inverse_hessian_factor(H, 0.01)
    choose = keep is None
    keep = torch.ones_like(W, dtype=torch.bool) if choose else keep.clone()
    for i1 in range(0, d_in, blocksize):
        i2 = min(i1 + blocksize, d_in)
        W1, U1, keep1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2], keep[:, i1:i2]
        if choose and not pattern.is_nm:
            saliency = (W1.square() / U1.diagonal().square()[None, :]).reshape(1, -1)
            k = n_pruned(sparsity, d_out * i2) - n_pruned(sparsity, d_out * i1)
            keep1[:] = drop_lowest(saliency, k).reshape(W1.shape)
        err1 = torch.zeros_like(W1)
        for j in range(i2 - i1):
            if choose and pattern.is_nm and j % pattern.m == 0:
                group = slice(j, j + pattern.m)
                keep1[:, group] = drop_lowest(W1[:, group].square() / U1.diagonal()[group].square(), pattern.n)
            w = W1[:, j]
            err = (w - w * keep1[:, j]) / U1[j, j]
            W1[:, j:] -= err[:, None] * U1[j, j:][None, :]
            err1[:, j] = err
        W[:, i1:i2] = W1 * keep1
        W[:, i2:] -= err1 @ U[i1:i2, i2:]
    return W * keep, keep


@pytest.mark.parametrize("pattern,given,shape", [
    ("unstructured", False, (96, 200)), ("2:4", False, (96, 200)), ("4:8", False, (96, 200)),
    ("unstructured", True, (96, 200)),
    # blocks of 1024 x 64 saliencies, enough for the threshold search; on a coarse grid of
    # weights they tie at the cut, and top-k's choice in the reference's order must decide
    ("unstructured", False, (1024, 136)), ("unstructured", False, (1024, 136, "grid")),
    # N:M groups of tied saliencies: top-k's choice within a group, whatever the layout
    ("2:4", False, (96, 200, "grid")), ("4:8", False, (96, 200, "grid")),
])
def test_sparsegpt_gives_the_reference_loops_bits(pattern, given, shape, fused):
    g = torch.Generator().manual_seed(7)
    Wt = torch.randn(*shape[:2], generator=g)
    if "grid" in shape:
        Wt = (Wt * 4).round() / 4
    X = torch.randn(300, shape[1], generator=g) * torch.exp(torch.randn(shape[1], generator=g))
    H = X.t() @ X
    if "grid" in shape:
        H = torch.eye(shape[1]) * 300  # one d for all columns: saliencies tie as the weights do
    pattern = Pattern.parse(pattern)
    keep = keep_mask(Wt.abs(), 0.5, pattern, "row") if given else None
    expected = reference_layout_sparsegpt(Wt, H, keep, 0.6, pattern, 64)
    got = sparsegpt(Wt, H, keep=keep, sparsity=0.6, pattern=pattern, blocksize=64, fused=fused)
    assert torch.equal(got[1], expected[1]) and torch.equal(got[0], expected[0])


def test_reallocation_spreads_strong_channels_across_groups():
    # plain 2:4 keeps 10 + 10 and 1 + 1 per row; reallocated, every group gets two 10s
    score = torch.tensor([[10.0, 10, 10, 10, 1, 1, 1, 1]] * 3)
    perm, plain, realloc = best_permutation(score, 2, 4)
    assert plain == 3 * 22 and realloc == 3 * 40
    assert sorted(perm.tolist()) == list(range(8))
    assert nm_retained(score[:, perm], 2, 4) == realloc


def test_reallocation_never_returns_a_worse_permutation():
    g = torch.Generator().manual_seed(0)
    for trial in range(5):
        score = torch.rand(8, 32, generator=g) * torch.rand(1, 32, generator=g) * 4
        perm, plain, realloc = best_permutation(score, 2, 4)
        if perm is None:
            assert realloc <= plain
        else:
            assert realloc > plain and nm_retained(score[:, perm], 2, 4) == pytest.approx(realloc)


def test_heuristic_permutation_deals_sorted_bands_alternately():
    score = torch.tensor([[8.0, 1.0, 7.0, 2.0, 6.0, 3.0, 5.0, 4.0]])  # ascending: cols 1 3 5 7 6 4 2 0
    assert heuristic_permutation(score, 2).tolist() == [1, 0, 3, 2, 5, 4, 7, 6]


@pytest.mark.parametrize("family,permutable", [("llama", "mlp.down_proj"), ("gpt2", "mlp.c_proj"), ("opt", "fc2")])
def test_reallocation_in_a_model_is_exact_and_truly_nm(family, permutable):
    samples = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    model = build_tiny_model(family, vocab_size=300)
    config = PruneConfig(method="ria", pattern="2:4", reallocate=True, nsamples=4, seqlen=32)
    report = prune(model, config, samples, progress=False)
    assert report.reallocated and all(name.endswith(permutable) for name in report.reallocated)
    for gain in report.reallocated.values():
        assert gain["retained_reallocated"] > gain["retained_plain"]
    for _name, layer in iter_matrices(model):  # N:M in the model's own column order
        assert ((layer.weight == 0).reshape(-1, 4).sum(dim=1) == 2).all()
