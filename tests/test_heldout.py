"""Held-out selection of a reconstruction (``--select heldout``, zpruner.heldout)."""
import json

import pytest
import torch

from conftest import build_tiny_model, build_tiny_moe
from test_offload import assert_same_weights, quick
from zpruner import PruneConfig, prune
from zpruner.admm import admm
from zpruner.cli import main
from zpruner.errors import ZprunerError
from zpruner.experts import use_eager_experts
from zpruner.heldout import (Candidate, Split, choose, generated_text, generated_windows, output_error, ridge_factors,
                             select, shrink_factor, split_batches)
from zpruner.layers import find_blocks, find_matrices, iter_matrices
from zpruner.masks import Pattern, keep_mask
from zpruner.scores import wanda
from zpruner.stats import ActivationStats

VOCAB = 300


def inputs(tokens: int, d: int, seed: int, mix: float) -> torch.Tensor:
    """[tokens, d] with scales per input and neighbouring inputs correlated by ``mix``."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, d, generator=g) * (0.2 + 2 * torch.rand(d, generator=torch.Generator().manual_seed(99)))
    X[:, 1:] += mix * X[:, :-1]
    return X


def stats_of(X: torch.Tensor) -> ActivationStats:
    s = ActivationStats(X.shape[1], hessian=True)
    for part in X.split(256):
        s.add(part)
    return s


def admm_reconstruct(W0, keep, base_damp=0.1):
    def reconstruct(stats, factor):
        return admm(W0, stats.xtx, keep=keep, damp=base_damp * factor)[0], keep
    return reconstruct


def layer(out=32, d=64, seed=0):
    return torch.randn(out, d, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- pure functions


def test_output_error_is_the_summed_squared_output_error():
    W0, W = layer(), layer(seed=1)
    X = inputs(200, 64, 2, 0.5)
    assert output_error(W0, W, X.t() @ X) == pytest.approx(float((X @ (W - W0).t()).square().sum()), rel=1e-4)


def test_shrink_factor_minimises_the_error_over_the_segment():
    W0 = layer()
    X = inputs(300, 64, 3, 0.6)
    H = X.t() @ X
    keep = torch.rand(W0.shape, generator=torch.Generator().manual_seed(4)) > 0.5
    masked = W0 * keep
    for W in (admm(W0, H, keep=keep)[0], masked + 0.3 * torch.randn(W0.shape) * keep):
        alpha = shrink_factor(W0, masked, W, H)
        best = output_error(W0, torch.lerp(masked, W, alpha), H)
        for a in torch.linspace(0, 1, 21).tolist():
            assert best <= output_error(W0, torch.lerp(masked, W, a), H) * (1 + 1e-5)
    assert shrink_factor(W0, masked, masked, H) == 1.0  # nothing to shrink


def test_choose_takes_the_lowest_error_and_the_conservative_one_of_a_tie():
    c = [Candidate("configured", None, 0.0, 10.0), Candidate("configured", 100.0, 1.0, 9.0),
         Candidate("configured", 1.0, 1.0, 9.0)]
    assert choose(c).factor == 100.0
    assert choose(c[:1] + [Candidate("configured", 1.0, 0.5, 12.0)]).factor is None
    assert ridge_factors(1.0, 100.0, 3) == pytest.approx([100.0, 10.0, 1.0])
    assert ridge_factors(2.0, 50.0, 1) == [2.0]


def test_batches_split_one_in_every_n_and_never_leave_a_part_empty():
    assert split_batches(8, 4) == ([0, 1, 2, 4, 5, 6], [3, 7])
    assert split_batches(3, 4) == ([0, 1], [2])
    with pytest.raises(ZprunerError, match="at least 2 calibration batches"):
        split_batches(1, 4)

    def batch(nsamples, seqlen):
        return PruneConfig(method="admm", select="heldout", heldout_texts=0, nsamples=nsamples,
                           seqlen=seqlen).calib_batch_size

    assert batch(64, 512) == 8  # the usual 4096 tokens a batch: 8 batches
    assert batch(16, 256) == 2  # not one batch of 16: 8 batches, 2 held out
    assert batch(4, 32) == 1


# ---------------------------------------------------------------- the selection on a random layer


@pytest.mark.parametrize("shrink", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_shifted_heldout_data_choose_no_worse_than_the_mask_or_the_full_reconstruction(seed, shrink):
    """Fitted on inputs whose neighbours are strongly correlated (0.9), held out on inputs
    that are less so (0.3): the full reconstruction leans on a correlation the held-out data
    lack. The chosen weights' held-out error is at most the mask alone's and the full
    reconstruction's."""
    W0 = layer(seed=seed)
    fit, held = inputs(512, 64, 10 + seed, 0.9), inputs(512, 64, 20 + seed, 0.3)
    split = Split(stats_of(fit), stats_of(held))
    keep = keep_mask(wanda(W0, split.fit), 0.5, Pattern(), "row")
    H = split.heldout.xtx
    full = admm(W0, split.fit.xtx, keep=keep, damp=0.1)[0]
    W, k, record = select(W0, split, {"configured": admm_reconstruct(W0, keep)}, factors=[100.0, 10.0, 1.0], shrink=shrink,
                          refit=False)
    assert torch.equal(k, keep) and torch.equal(W == 0, ~keep | (W0 == 0))
    chosen = output_error(W0, W, H)
    assert chosen <= output_error(W0, W0 * keep, H) * (1 + 1e-6)
    assert chosen <= output_error(W0, full, H) * (1 + 1e-6)
    assert record["errors"][0][1] is None and len(record["errors"]) == 4
    # and on these data the choice matters: neither end of the path is the best
    assert chosen < 0.99 * min(output_error(W0, W0 * keep, H), output_error(W0, full, H))


def test_identical_distributions_recover_the_full_reconstruction():
    """Fit and held-out windows from one distribution, many tokens per input: the configured
    reconstruction wins unshrunk, and fitted again on every window it is the reconstruction
    of all the calibration data."""
    W0 = layer(seed=5)
    X = inputs(4096, 64, 30, 0.8)
    fit, held = X[:3072], X[3072:]
    split = Split(stats_of(fit), stats_of(held))
    keep = keep_mask(wanda(W0, split.full), 0.5, Pattern(), "row")
    W, k, record = select(W0, split, {"configured": admm_reconstruct(W0, keep)}, factors=[100.0, 10.0, 1.0], shrink=True,
                          refit=True)
    assert record["factor"] == 1.0 and record["alpha"] > 0.97
    plain = admm(W0, stats_of(X).xtx, keep=keep, damp=0.1)[0]
    assert (W - plain).norm() <= 0.03 * (plain - W0 * keep).norm()
    without_shrink = select(W0, split, {"configured": admm_reconstruct(W0, keep)}, factors=[100.0, 10.0, 1.0], shrink=False,
                            refit=True)[0]
    torch.testing.assert_close(without_shrink, plain, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- in a model


def samples(n=16, length=32, seed=0):
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("options", [dict(method="admm"), dict(method="wanda", update="admm"),
                                     dict(method="sparsegpt"), dict(method="wanda", update="sparsegpt")])
def test_every_reconstruction_is_selected_per_matrix(options):
    model = build_tiny_model("llama", vocab_size=VOCAB)
    report = prune(model, PruneConfig(**options, select="heldout", nsamples=16, seqlen=32), samples(),
                   progress=False)
    names = [name for name, _ in iter_matrices(model)]
    assert sorted(report.selection) == sorted(names)
    for name, matrix in iter_matrices(model):
        W = matrix.weight
        assert int((W == 0).sum()) >= W.numel() // 2 - W.shape[0]  # 50 %: per row or per layer
        r = report.selection[name]
        assert r["factor"] in (None, 100.0, 10.0, 1.0) and 0 <= r["alpha"] <= 1


def test_nm_stays_exact_and_owl_keeps_each_blocks_share():
    model = build_tiny_model("llama", vocab_size=VOCAB)
    prune(model, PruneConfig(method="admm", pattern="2:4", select="heldout", nsamples=16, seqlen=32), samples(),
          progress=False)
    for name, matrix in iter_matrices(model):
        assert ((matrix.weight == 0).reshape(-1, 4).sum(dim=1) == 2).all(), name
    model = build_tiny_model("llama", vocab_size=VOCAB)
    config = PruneConfig(method="wanda", update="admm", select="heldout", sparsity=0.6, allocation="owl",
                         owl_lambda=0.1, nsamples=16, seqlen=32)
    report = prune(model, config, samples(), progress=False)
    assert len(set(report.block_sparsity)) > 1
    for block, target in zip(find_blocks(model), report.block_sparsity):
        for matrix in find_matrices(block).values():
            assert ((matrix.weight == 0).sum(dim=1) == int(target * matrix.weight.shape[1] + 1e-9)).all()


def test_mixture_of_experts_slices_are_selected_on_their_own_tokens():
    model = build_tiny_moe("qwen3_moe", VOCAB)
    use_eager_experts(model)
    report = prune(model, PruneConfig(method="admm", select="heldout", nsamples=16, seqlen=32), samples(),
                   progress=False)
    experts = [name for name in report.selection if ".experts." in name]
    assert experts and len(report.selection) == len(list(iter_matrices(model)))
    for name, matrix in iter_matrices(model):
        W = matrix.weight
        assert int((W == 0).sum()) == int(0.5 * W.numel()), name  # the ADMM solver: per layer, exact


def test_disk_offload_gives_the_same_weights_and_the_results_record_the_choice(tmp_path, tiny_model_dir,
                                                                               tiny_data_dir, capsys):
    """Calibration windows held out (--heldout-texts 0): the statistics passes are the
    engine's, streamed or not. Generated held-out text needs the model in memory: refused
    under --offload disk with the option that works."""
    results = {}
    for mode in ("none", "disk"):
        out, save = tmp_path / f"{mode}.json", tmp_path / mode
        assert main(quick(tiny_model_dir("llama"), tiny_data_dir, "--method", "wanda", "--update", "admm",
                          "--select", "heldout", "--heldout-texts", "0", "--nsamples", "8", "--offload", mode,
                          "--output-json", str(out), "--save", str(save))) == 0
        results[mode] = json.loads(out.read_text())
    assert_same_weights(tmp_path / "none", tmp_path / "disk")
    assert results["none"]["selection"] == results["disk"]["selection"]
    assert results["none"]["config"]["prune"]["select"] == "heldout"
    capsys.readouterr()
    assert main(quick(tiny_model_dir("llama"), tiny_data_dir, "--method", "admm", "--select", "heldout",
                      "--offload", "disk")) == 2
    assert "use --heldout-texts 0" in capsys.readouterr().err


def test_generated_heldout_text_is_the_models_own_seeded_and_never_fitted():
    """--heldout-texts N: the dense model's own samples, the same for the same seed; the
    reconstructions are fitted on every calibration window (no refit with the held-out
    text), so with the configured reconstruction chosen unshrunk the result is the plain
    reconstruction's."""
    model = build_tiny_model("llama", vocab_size=VOCAB)
    a, b = generated_text(model, 3, 20, 0, 1), generated_text(model, 3, 20, 0, 1)
    assert a.shape == (3, 20) and torch.equal(a, b) and not torch.equal(a, generated_text(model, 3, 20, 1, 1))
    fit, held = stats_of(inputs(512, 64, 1, 0.5)), stats_of(inputs(256, 64, 2, 0.5))
    split = Split(fit, held, calibration=False)
    assert split.full is fit
    W0 = layer(seed=7)
    keep = keep_mask(wanda(W0, fit), 0.5, Pattern(), "row")
    calls = []

    def reconstruct(stats, factor):
        calls.append(stats)
        return admm(W0, stats.xtx, keep=keep)[0], keep

    W, _, record = select(W0, split, {"configured": reconstruct}, factors=[1.0], shrink=False, refit=True)
    assert calls == [fit] and record["factor"] == 1.0
    torch.testing.assert_close(W, admm(W0, fit.xtx, keep=keep)[0])


def test_generated_documents_are_packed_into_windows_as_long_as_the_calibrations():
    """--heldout-length L < --seqlen: documents of L tokens (the start token, then L - 1
    sampled ones, generated in one batch: L - 1 steps), packed end to end into windows of
    --seqlen, the last document cut; L 0 or >= --seqlen: one sampled sequence per window."""
    model = build_tiny_model("llama", vocab_size=VOCAB)
    start = 1
    packed = generated_windows(model, 2, 20, 8, 0, start)
    docs = torch.cat([torch.full((6, 1), start), generated_text(model, 6, 7, 0, start)], dim=1)
    assert packed.shape == (2, 20)
    assert torch.equal(packed, docs.reshape(2, 24)[:, :20])
    assert (packed[:, [0, 8, 16]] == start).all()
    assert torch.equal(packed, generated_windows(model, 2, 20, 8, 0, start))
    for whole in (0, 20, 64):
        assert torch.equal(generated_windows(model, 2, 20, whole, 0, start), generated_text(model, 2, 20, 0, start))
    with pytest.raises(ZprunerError, match="heldout_length 1: a generated document is its start token"):
        PruneConfig(method="admm", select="heldout", heldout_length=1)


def test_selection_needs_a_reconstruction_and_leaves_other_configurations_alone():
    with pytest.raises(ZprunerError, match="chooses how strongly a reconstruction"):
        PruneConfig(method="wanda", select="heldout")
    with pytest.raises(ZprunerError, match="chooses how strongly a reconstruction"):
        PruneConfig(method="wanda", update="ec", select="heldout")
    plain = PruneConfig(method="admm", nsamples=16, seqlen=256)
    assert plain.calib_batch_size == 16 and "select" not in plain.identity()
    assert "heldout_every" not in plain.identity()
    chosen = PruneConfig(method="admm", select="heldout", heldout_texts=0, nsamples=16, seqlen=256)
    assert chosen.calib_batch_size == 2 and chosen.identity()["select"] == "heldout"
    assert chosen.identity()["heldout_every"] == 4
    # generated held-out text comes in batches of its own: the calibration batches stay as they are
    assert PruneConfig(method="admm", select="heldout", nsamples=16, seqlen=256).calib_batch_size == 16
