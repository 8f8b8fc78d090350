"""ADMM (update and solver) and OWL's per-block allocation."""
import json

import pytest
import torch

from conftest import build_tiny_model
from test_offload import assert_same_weights, quick
from zpruner import PruneConfig, prune
from zpruner.admm import admm, cubic_sparsity, gradual_keep
from zpruner.allocation import centred_in_range, nm_sparsities, outlier_fraction, owl_sparsities, round_to_zero_sum
from zpruner.cli import main
from zpruner.errors import ZprunerError
from zpruner.layers import find_blocks, find_matrices, iter_matrices
from zpruner.masks import Pattern
from zpruner.sparsegpt import sparsegpt
from zpruner.stats import ActivationStats


def layer_problem(out=48, d=96, tokens=768, seed=0, correlated=True):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, d, generator=g)
    X = torch.randn(tokens, d, generator=g) * (0.2 + 2 * torch.rand(d, generator=g))
    if correlated:
        X[:, 1:] += 0.6 * X[:, :-1]
    return W, X


def output_error(W, Wp, X) -> float:
    return float((X @ (W - Wp).t()).square().sum())


def least_squares_optimum(W, X, keep):
    """Per row: the kept weights minimising ‖X(w − ŵ)‖ (torch.linalg.lstsq)."""
    opt = torch.zeros_like(W, dtype=torch.float64)
    Xd = X.double()
    for r in range(W.shape[0]):
        K = keep[r]
        opt[r, K] = torch.linalg.lstsq(Xd[:, K], (Xd @ W[r].double())[:, None]).solution[:, 0]
    return opt.float()


# ---------------------------------------------------------------- ADMM


def test_admm_identity_like_hessian_keeps_the_kept_weights():
    """H = c·I: the outputs' error is c·Σ dropped w², whatever the kept weights do, so the
    optimum leaves them as they are; ADMM must land there (lstsq says the same)."""
    W, _ = layer_problem()
    H = 7.0 * torch.eye(W.shape[1])
    keep = torch.rand(W.shape, generator=torch.Generator().manual_seed(1)) > 0.5
    Wp, k = admm(W, H, keep=keep, iters=20)
    assert torch.equal(k, keep)
    assert torch.equal(Wp == 0, ~keep | (W == 0))
    torch.testing.assert_close(Wp[keep], W[keep], rtol=1e-5, atol=1e-6)
    X = torch.eye(W.shape[1]) * 7.0 ** 0.5  # XᵀX = H
    torch.testing.assert_close(Wp, least_squares_optimum(W, X, keep), rtol=1e-4, atol=1e-5)


def test_admm_converges_to_the_least_squares_optimum_of_a_fixed_mask():
    W, X = layer_problem()
    keep = torch.rand(W.shape, generator=torch.Generator().manual_seed(2)) > 0.5
    opt = least_squares_optimum(W, X, keep)
    Wp, _ = admm(W, X.t() @ X, keep=keep, iters=300, damp=0.0)
    assert (Wp[~keep] == 0).all()
    assert output_error(W, Wp, X) == pytest.approx(output_error(W, opt, X), rel=1e-3)
    # the default 20 iterations already get within 2 % of the optimum's error
    Wp20, _ = admm(W, X.t() @ X, keep=keep, damp=0.0)
    assert output_error(W, Wp20, X) <= 1.02 * output_error(W, opt, X)


@pytest.mark.parametrize("pattern", [Pattern(), Pattern(2, 4), Pattern(4, 8)])
def test_admm_reconstructs_at_least_as_well_as_sparsegpt_for_the_same_mask(pattern):
    W, X = layer_problem(seed=3)
    H = X.t() @ X
    _, keep = sparsegpt(W, H, sparsity=0.5, pattern=pattern)
    errors = {name: output_error(W, Wp, X) for name, Wp in [
        ("masked", W * keep),
        ("sparsegpt", sparsegpt(W, H, keep=keep)[0]),
        ("admm", admm(W, H, keep=keep)[0]),
    ]}
    assert errors["admm"] <= errors["sparsegpt"] < errors["masked"], errors


@pytest.mark.parametrize("pattern,sparsity", [(Pattern(), 0.5), (Pattern(), 0.7), (Pattern(2, 4), 0.5),
                                              (Pattern(4, 8), 0.5), (Pattern(1, 3), 1 / 3)])
def test_admm_solver_reaches_the_exact_pattern_and_beats_sparsegpt(pattern, sparsity):
    W, X = layer_problem(seed=4)
    H = X.t() @ X
    Wp, keep = admm(W, H, sparsity=sparsity, pattern=pattern)
    assert torch.equal(Wp != 0, keep)
    if pattern.is_nm:
        assert ((~keep).reshape(-1, pattern.m).sum(dim=1) == pattern.n).all()
    else:
        assert int((~keep).sum()) == int(sparsity * W.numel() + 1e-9)
    assert output_error(W, Wp, X) < output_error(W, sparsegpt(W, H, sparsity=sparsity, pattern=pattern)[0], X)


def test_cubic_schedule_and_gradual_masks():
    assert [round(cubic_sparsity(0.5, i, 4), 6) for i in range(4)] == [0.289062, 0.4375, 0.492188, 0.5]
    V = torch.tensor([[4.0, 3.0, 2.0, 1.0, -8.0, 0.5, 0.25, 7.0]])
    # 2:4 on the way: each group's two largest stay, then the largest of the rest
    assert gradual_keep(V, 0.25, 0.5, Pattern(2, 4)).tolist() == [[True, True, True, True, True, False, False, True]]
    assert gradual_keep(V, 0.5, 0.5, Pattern(2, 4)).tolist() == [[True, True, False, False, True, False, False, True]]
    assert gradual_keep(V, 0.5, 0.5, Pattern()).tolist() == [[True, True, False, False, True, False, False, True]]


def test_admm_dead_inputs_stay_finite():
    W, X = layer_problem()
    X[:, :5] = 0
    Wp, keep = admm(W, X.t() @ X, sparsity=0.5)
    assert torch.isfinite(Wp).all()
    assert int((~keep).sum()) == W.numel() // 2


def test_admm_update_keeps_another_methods_mask_in_a_model():
    samples = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    model = build_tiny_model("llama", vocab_size=300)
    masked = build_tiny_model("llama", vocab_size=300)
    prune(model, PruneConfig(method="wanda", update="admm", nsamples=4, seqlen=32), samples, progress=False)
    prune(masked, PruneConfig(method="wanda", nsamples=4, seqlen=32), samples, progress=False)
    for (name, a), (_, b) in zip(iter_matrices(model), iter_matrices(masked)):
        if ".layers.0." in name:  # the first block sees the same inputs in both runs: the same mask
            assert torch.equal(a.weight == 0, b.weight == 0), name
        assert not torch.equal(a.weight, b.weight), name  # other kept values
        assert ((a.weight == 0).sum(dim=1) == a.weight.shape[1] // 2).all(), name


@pytest.mark.parametrize("kwargs,message", [
    (dict(method="admm", update="sparsegpt"), "already reconstructs"),
    (dict(method="admm", update="admm"), "already reconstructs"),
    (dict(admm_rho=0.0), "admm_rho"),
    (dict(admm_iters=-1), "admm_iters"),
    (dict(allocation="random"), "allocation 'random' is unknown"),
    (dict(owl_lambda=-0.1), "owl_lambda"),
])
def test_bad_admm_and_owl_options_are_refused(kwargs, message):
    with pytest.raises(ZprunerError, match=message):
        PruneConfig(**kwargs)


# ---------------------------------------------------------------- OWL


def test_outlier_fraction_counts_against_the_block_mean():
    weights = {"a": torch.tensor([[1.0, 1.0], [1.0, 10.0]]), "b": torch.tensor([[1.0, 1.0]])}
    stats = {name: ActivationStats(2) for name in weights}
    for s in stats.values():
        s.add(torch.ones(1, 2))  # ‖x‖ = 1: the score is |W|
    # block mean 15/6 = 2.5: only the 10 exceeds 2 × 2.5; 1 × 2.5 the same
    assert outlier_fraction(weights, stats, 2.0) == pytest.approx(1 / 6)
    assert outlier_fraction(weights, stats, 0.3) == pytest.approx(6 / 6)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("lam", [0.02, 0.08, 0.2])
def test_owl_sparsities_average_exactly_and_stay_within_lambda(seed, lam):
    g = torch.Generator().manual_seed(seed)
    ratios = (torch.rand(30, generator=g) ** 4).tolist()  # skewed: the raw formula would leave ±λ
    sizes = [1000] * 30
    s = owl_sparsities(ratios, sizes, 0.7, lam)
    assert sum(s) / len(s) == pytest.approx(0.7, abs=1e-12)
    assert all(0.7 - lam - 1e-12 <= x <= 0.7 + lam + 1e-12 for x in s)
    order = sorted(range(30), key=lambda i: ratios[i])
    assert all(s[a] >= s[b] - 1e-12 for a, b in zip(order, order[1:]))  # more outliers, fewer zeros


def test_owl_sparsities_weight_blocks_by_size_and_handle_degenerate_inputs():
    s = owl_sparsities([0.01, 0.02, 0.05], [100, 300, 600], 0.5, 0.1)
    assert (s[0] * 100 + s[1] * 300 + s[2] * 600) / 1000 == pytest.approx(0.5, abs=1e-12)
    assert owl_sparsities([0.03, 0.03], [1, 1], 0.6, 0.08) == [0.6, 0.6]
    assert owl_sparsities([0.01, 0.09], [1, 1], 0.6, 0.0) == [0.6, 0.6]
    low = owl_sparsities([0.0, 0.1, 0.2], [1, 1, 1], 0.05, 0.08)  # a target below λ: never negative
    assert min(low) >= 0 and sum(low) / 3 == pytest.approx(0.05, abs=1e-12)


def test_centred_in_range_and_rounding():
    out = centred_in_range([0.0, 0.5, 2.0], [1, 1, 1], 0.5, 0.2, 0.8)
    assert sum(out) / 3 == pytest.approx(0.5, abs=1e-12) and all(0.2 <= x <= 0.8 for x in out)
    assert round_to_zero_sum([0.6, -0.3, -0.3]) == [0, 0, 0]  # floors [0, -1, -1], the two largest remainders up
    assert round_to_zero_sum([1.2, -0.9, -0.3]) == [1, -1, 0]
    assert sum(round_to_zero_sum([0.45, 0.45, -0.2, -0.7])) == 0
    nm = nm_sparsities([0.5 + 0.07, 0.5 - 0.07, 0.5 + 0.01, 0.5 - 0.01], Pattern(4, 8))
    assert nm == [5 / 8, 3 / 8, 4 / 8, 4 / 8]


def test_owl_prunes_blocks_unevenly_with_the_exact_overall_sparsity():
    samples = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    model = build_tiny_model("llama", vocab_size=300)
    config = PruneConfig(method="wanda", sparsity=0.6, allocation="owl", owl_lambda=0.1, nsamples=4, seqlen=32)
    report = prune(model, config, samples, progress=False)
    assert len(report.block_sparsity) == len(find_blocks(model))
    assert len(set(report.block_sparsity)) > 1
    zeros = total = 0
    for block, target in zip(find_blocks(model), report.block_sparsity):
        for layer in find_matrices(block).values():
            W = layer.weight
            assert ((W == 0).sum(dim=1) == int(target * W.shape[1] + 1e-9)).all()  # wanda: per row
            zeros, total = zeros + int((W == 0).sum()), total + W.numel()
    assert zeros / total == pytest.approx(0.6, abs=2 / 64)  # per-row floors of 64-wide rows


def test_owl_nm_gives_each_block_a_valid_pattern():
    samples = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    model = build_tiny_model("llama", vocab_size=300)
    config = PruneConfig(method="sparsegpt", pattern="4:8", allocation="owl", owl_lambda=0.2, nsamples=4, seqlen=32)
    report = prune(model, config, samples, progress=False)
    assert sum(report.block_sparsity) / len(report.block_sparsity) == pytest.approx(0.5)
    assert set(report.block_sparsity) <= {k / 8 for k in range(1, 8)}
    for block, target in zip(find_blocks(model), report.block_sparsity):
        for layer in find_matrices(block).values():
            W = layer.weight
            assert ((W == 0).reshape(-1, 8).sum(dim=1) == round(target * 8)).all()


def test_owl_and_admm_through_the_cli_and_disk(capsys, tmp_path, tiny_model_dir, tiny_data_dir):
    """--allocation owl with --method admm: the results JSON lists the blocks' sparsities, and
    a streamed run (--offload disk) gives the same weights."""
    results = {}
    for mode in ("none", "disk"):
        out, save = tmp_path / f"{mode}.json", tmp_path / mode
        assert main(quick(tiny_model_dir("llama"), tiny_data_dir, "--method", "admm", "--allocation", "owl",
                          "--owl-lambda", "0.1", "--sparsity", "0.6", "--offload", mode, "--output-json", str(out),
                          "--save", str(save))) == 0
        results[mode] = json.loads(out.read_text())
        assert "allocation  owl: block sparsity " in capsys.readouterr().out
    assert_same_weights(tmp_path / "none", tmp_path / "disk")
    blocks = results["none"]["block_sparsity"]
    assert blocks == results["disk"]["block_sparsity"] and len(set(blocks)) > 1
    assert sum(blocks) / len(blocks) == pytest.approx(0.6, abs=1e-12)
    assert results["none"]["config"]["prune"]["allocation"] == "owl"
    assert results["none"]["sparsity"]["overall"] == pytest.approx(0.6, abs=1e-3)


def test_admm_solver_compares_within_rows_with_group_row():
    """--group row: the gradual mask keeps the same count in every row (Wanda's comparison
    group), still exact and still a better fit than that of the mask alone."""
    W, X = layer_problem(seed=6)
    H = X.t() @ X
    Wp, keep = admm(W, H, sparsity=0.5, group="row")
    assert torch.equal(Wp != 0, keep)
    assert ((~keep).sum(dim=1) == W.shape[1] // 2).all()
    assert output_error(W, Wp, X) < output_error(W, W * keep, X)
    assert not torch.equal(keep, admm(W, H, sparsity=0.5)[1])  # the layer's comparison chooses otherwise
    assert PruneConfig(method="admm", group="row").group == "row"
    with pytest.raises(ZprunerError, match="--group does not apply to method sparsegpt"):
        PruneConfig(method="sparsegpt", group="row")
