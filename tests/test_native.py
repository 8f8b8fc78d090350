"""The compiled kernels' build: where it lands, that it is used when it builds, and that
zpruner keeps working (eager, quietly) when it cannot build."""
import copy
import logging
import shutil

import pytest
import torch

from conftest import build_tiny_model
from zpruner import PruneConfig, calibration_windows, load_texts, masks, prune, sparsegpt
from zpruner.kernels import (columns, energy, lapack, native, reductions, rowpass, score_passes, selection,
                             sparsegpt_columns)
from zpruner.pruning import pruned_weights
from zpruner.stats import ActivationStats

KERNELS = [sparsegpt_columns._KERNEL, lapack._MIRROR, score_passes._KERNEL, reductions._KERNEL, selection._KERNEL,
           columns._KERNEL]


@pytest.fixture
def fresh_loads():
    """Kernels are loaded once per process: start from nothing, and leave nothing behind
    for the tests after (they load again from the default cache)."""
    native._loaded.cache_clear()
    lapack._torch_routines.cache_clear()
    yield
    native._loaded.cache_clear()
    lapack._torch_routines.cache_clear()


def test_the_kernels_build_wherever_a_c_compiler_exists(fresh_loads, monkeypatch, tmp_path):
    if shutil.which(native._compiler()[0]) is None:
        pytest.skip(f"no C compiler here ({native._compiler()[0]}): zpruner runs its eager paths")
    monkeypatch.setenv("ZPRUNER_CACHE", str(tmp_path))
    monkeypatch.delenv("ZPRUNER_NATIVE", raising=False)
    for kernel in KERNELS:
        assert native.load(*kernel) is not None, f"{kernel[0]}.c did not build with {native._compiler()}"
    built = sorted((tmp_path / "native").iterdir())
    assert len(built) == len(KERNELS) and not any(p.name.startswith(".") for p in built)  # no partial file left
    stamps = [p.stat().st_mtime_ns for p in built]
    native._loaded.cache_clear()
    assert native.load(*KERNELS[0]) is not None
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "native").iterdir())] == stamps  # reused


@pytest.mark.parametrize("how", ["no compiler", "ZPRUNER_NATIVE=0"])
def test_without_kernels_every_method_runs_eager_with_no_warning(fresh_loads, monkeypatch, tmp_path, caplog, how):
    monkeypatch.setenv("ZPRUNER_CACHE", str(tmp_path))
    if how == "no compiler":
        monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    else:
        monkeypatch.setenv("ZPRUNER_NATIVE", "0")
    monkeypatch.setattr(rowpass, "CHUNK_ELEMENTS", 100)  # large enough for the kernel, were it there
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(30, 20, generator=g)
    keep = torch.rand(30, 20, generator=g) > 0.5
    X = torch.randn(50, 20, generator=g)
    with caplog.at_level(logging.INFO, logger="zpruner"):
        assert not lapack.available(X.t() @ X)  # SparseGPT's factor through torch.linalg
        ec = energy.energy_compensate_(W0, None, keep, ("col", "row"), (0.8, 1.25))
        solved = sparsegpt.sparsegpt(W0, X.t() @ X, sparsity=0.5, blocksize=8)
        stats = ActivationStats(20)
        stats.add(X)
        assert score_passes._score_kernel(W0, W0, torch.ones(30, 1), torch.ones(1, 20)) is None
        assert torch.isfinite(score_passes.zpruner(W0, stats)).all()
        flat = torch.randn(100_000, generator=g)
        assert selection._select_kernel(flat) is None
        assert int((~masks.drop_lowest(flat[None, :], 500)).sum()) == 500
        assert torch.equal(columns.column_variance(W0), W0.var(dim=0, unbiased=False))
    assert torch.isfinite(ec).all()
    eager = sparsegpt.sparsegpt(W0, X.t() @ X, sparsity=0.5, blocksize=8, fused=False)
    assert torch.equal(solved[0], eager[0]) and torch.equal(solved[1], eager[1])
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    notes = [r.getMessage() for r in caplog.records if "eager torch path" in r.getMessage()]
    assert len(notes) == len(KERNELS)  # once per kernel, not once per call
    assert all(("unavailable" if how == "no compiler" else "ZPRUNER_NATIVE=0") in note for note in notes)
    assert not any(tmp_path.rglob("*.so"))  # nothing half-built left in the cache


def test_sparsegpt_runs_its_kernel_on_the_cpu_unless_told_not_to():
    if native.load(*sparsegpt_columns._KERNEL) is None:
        pytest.skip("the native SparseGPT kernel could not be built here")
    W, U, keep = torch.zeros(4, 4), torch.zeros(4, 4), torch.ones(4, 4, dtype=torch.bool)
    assert sparsegpt_columns.load(W, U, keep, None) is not None
    assert sparsegpt_columns.load(W, U, keep, False) is None
    assert sparsegpt_columns.load(W, U, keep, None, groups_chosen=True) is None  # N:M chosen in the loop: torch's
    assert sparsegpt_columns.load(W, U, keep, True, groups_chosen=True) is not None
    assert sparsegpt_columns.load(W.double(), U.double(), keep, None) is None


def test_zpruner_takes_its_kernel_above_a_chunk_with_the_eager_bits(monkeypatch):
    """The compiled score pass has no sum: the same bits as the eager one, which SmolLM2's
    layers (one chunk each) keep running."""
    if native.load(*score_passes._KERNEL) is None:
        pytest.skip("the native Z-Pruner kernel could not be built here")
    g = torch.Generator().manual_seed(5)
    W = torch.randn(40, 30, generator=g)
    W[3] = 0.0
    W[:, 4] = 0.0
    stats = ActivationStats(30)
    stats.add(torch.randn(64, 30, generator=g) * torch.exp(torch.randn(30, generator=g)))
    operands = (W, torch.empty_like(W), torch.ones(40, 1), torch.ones(1, 30))
    assert score_passes._score_kernel(*operands) is None
    eager = score_passes.zpruner(W, stats)
    monkeypatch.setattr(rowpass, "CHUNK_ELEMENTS", 100)
    assert score_passes._score_kernel(*operands) is not None
    assert score_passes._score_kernel(W.double(), *operands[1:]) is None
    assert score_passes._score_kernel(W.t(), *operands[1:]) is None  # not row-major: eager
    assert torch.equal(score_passes.zpruner(W, stats).view(torch.int32), eager.view(torch.int32))


@pytest.mark.parametrize("scores", ["normal", "coarse (tied)", "NaN and inf"])
@pytest.mark.parametrize("ties_by_index", [False, True])
@pytest.mark.parametrize("k", [1, 40_000, 99_999])
def test_compiled_selection_passes_give_the_torch_passes_mask(monkeypatch, scores, ties_by_index, k):
    """The threshold selection's count, gather and mask as C loops over ranges (here of
    777 scores, so that tied scores straddle the ranges' edges): the same keep as the torch
    passes, or the same refusal (None) when a tie at the cut is left to top-k."""
    if native.load(*selection._KERNEL) is None:
        pytest.skip("the native selection kernel could not be built here")
    monkeypatch.setattr(selection, "_RANGE", 777)
    g = torch.Generator().manual_seed(k)
    flat = torch.randn(100_000, generator=g)
    if scores == "coarse (tied)":
        flat = (flat * 8).round()
    elif scores == "NaN and inf":
        flat[::13] = float("nan")
        flat[5::17] = float("inf")
        flat[7::19] = -float("inf")
    assert selection._select_kernel(flat) is not None
    compiled = selection._drop_lowest_flat(flat, k, ties_by_index)
    monkeypatch.setattr(selection, "_select_kernel", lambda flat: None)
    expected = selection._drop_lowest_flat(flat, k, ties_by_index)
    assert (compiled is None) == (expected is None)
    if expected is not None:
        assert torch.equal(compiled, expected) and int((~compiled).sum()) == k
    if scores == "coarse (tied)" and ties_by_index:
        assert compiled is not None  # the tie at the cut was broken by index order, not refused


def test_selection_kernel_only_for_contiguous_float32_cpu_scores():
    if native.load(*selection._KERNEL) is None:
        pytest.skip("the native selection kernel could not be built here")
    assert selection._select_kernel(torch.zeros(10)) is not None
    assert selection._select_kernel(torch.zeros(10, dtype=torch.float64)) is None
    assert selection._select_kernel(torch.zeros(10, 2)[:, 0]) is None


def test_kernels_take_only_tensors_laid_out_as_their_pointer_arithmetic_assumes():
    W = torch.zeros(6, 8)
    assert native.fits(W) and native.fits(W, W[2:4]) and native.fits(W[1], layout="rows")
    assert not native.fits(W[:, :4]) and native.fits(W[:, :4], layout="rows")  # rows 8 apart
    assert not native.fits(W.t(), layout="rows") and native.fits(W.t(), layout="any")
    assert not native.fits(W, W.double()) and native.fits(W.double(), dtype=torch.float64)
    assert not native.fits(W.bool()) and native.fits(W.bool(), dtype=torch.bool)
    assert not native.fits(torch.zeros(6, 8, device="meta"), layout="any")
    with pytest.raises(ValueError, match="layout 'strided'"):
        native.fits(W, layout="strided")


def test_wanda_ec_gives_the_same_weights_with_and_without_native_code(fresh_loads, monkeypatch):
    """The same command must give the same weights on a machine with a C compiler and one
    without (or ZPRUNER_NATIVE=0): here on a LLaMA-7B down_proj shape, 43 chunks, where
    EC's column sums run across chunks (a float64 EC kernel changed these bits)."""
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(4096, 11008, generator=g) * 0.02
    stats = ActivationStats(11008)
    stats.add(torch.randn(64, 11008, generator=g) * torch.rand(11008, generator=g) * 3)
    results = []
    for setting in ("1", "0"):
        monkeypatch.setenv("ZPRUNER_NATIVE", setting)
        native._loaded.cache_clear()
        results.append(pruned_weights(W0, stats, PruneConfig("wanda", update="ec")))
    (W_native, keep_native), (W_eager, keep_eager) = results
    assert torch.equal(keep_native, keep_eager)
    assert torch.equal(W_native.view(torch.int32), W_eager.view(torch.int32))  # -0.0 included


def test_a_run_records_the_kernels_it_used(fresh_loads, monkeypatch):
    """``native.used()`` (for a run's results) names the kernels a prune ran, from the last
    ``reset_used()`` on, and none with ZPRUNER_NATIVE=0."""
    if None in (native.load(*columns._KERNEL), native.load(*sparsegpt_columns._KERNEL)):
        pytest.skip("the native kernels could not be built here")
    samples = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    native.reset_used()
    assert native.used() == []
    prune(build_tiny_model("llama", vocab_size=300), PruneConfig("cvr", nsamples=4, seqlen=32), samples,
          progress=False)
    assert native.used() == ["columns_kernel"]  # CVR's column variances
    native.reset_used()
    prune(build_tiny_model("llama", vocab_size=300), PruneConfig("sparsegpt", nsamples=4, seqlen=32), samples,
          progress=False)
    assert {"sparsegpt_kernel", "triangle_kernel"} <= set(native.used())  # the column loop; the factor's LAPACK
    assert "columns_kernel" not in native.used()
    native._loaded.cache_clear()
    native.reset_used()
    monkeypatch.setenv("ZPRUNER_NATIVE", "0")
    prune(build_tiny_model("llama", vocab_size=300), PruneConfig("sparsegpt", nsamples=4, seqlen=32), samples,
          progress=False)
    assert native.used() == []


@pytest.mark.parametrize("method, update, pattern, kernels", [
    ("magnitude", "ec", "unstructured", {"select_kernel"}),
    ("ria", "none", "unstructured", {"select_kernel"}),
    ("cvr", "ec", "unstructured", {"columns_kernel"}),
    ("zpruner", "ec", "4:8", {"zpruner_kernel", "reductions_kernel"}),
    ("sparsegpt", "ec", "unstructured", {"sparsegpt_kernel", "triangle_kernel", "select_kernel"}),
])
def test_every_kernel_a_method_runs_keeps_the_eager_bits(fresh_loads, monkeypatch, method, update, pattern, kernels):
    """The same layer pruned with the compiled kernels and with ZPRUNER_NATIVE=0, on a
    layer above a chunk (so that every kernel applies): the same bits."""
    g = torch.Generator().manual_seed(1)
    W0 = torch.randn(1100, 1024, generator=g) * 0.02
    stats = ActivationStats(1024, hessian=method == "sparsegpt")
    for x in torch.randn(512, 1024, generator=g).mul_(torch.rand(1024, generator=g) * 3).split(128):
        stats.add(x)
    config = PruneConfig(method, update=update, pattern=pattern)
    results = []
    for setting in ("1", "0"):
        monkeypatch.setenv("ZPRUNER_NATIVE", setting)
        native._loaded.cache_clear()
        lapack._torch_routines.cache_clear()
        native.reset_used()
        results.append(pruned_weights(W0, stats, config))
        if setting == "1" and not kernels <= set(native.used()):
            pytest.skip(f"kernels {sorted(kernels - set(native.used()))} could not be built here")
    assert native.used() == []
    (W_native, keep_native), (W_eager, keep_eager) = results
    assert torch.equal(keep_native, keep_eager)
    assert torch.equal(W_native.view(torch.int32), W_eager.view(torch.int32))


@pytest.mark.real_model
def test_wanda_ec_on_smollm2_gives_the_same_weights_with_and_without_native_code(fresh_loads, monkeypatch, smollm2,
                                                                                  shared_data):
    """``zpruner prune --method wanda --update ec`` on the real model, as saved: the same
    bits (every tensor, pruned or not) with the compiled kernels and without."""
    model, tokenizer = smollm2
    samples = calibration_windows(tokenizer, load_texts("c4", shared_data), nsamples=4, seqlen=128, seed=0)
    weights = []
    for setting in ("1", "0"):
        monkeypatch.setenv("ZPRUNER_NATIVE", setting)
        native._loaded.cache_clear()
        pruned = copy.deepcopy(model)
        prune(pruned, PruneConfig("wanda", update="ec", nsamples=4, seqlen=128), samples, progress=False)
        weights.append(pruned.state_dict())
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k].view(torch.uint8), weights[1][k].view(torch.uint8)) for k in weights[0])
