"""The fast implementations (chunked scores and EC, threshold selection, row-parallel
SparseGPT) against the textbook formulas of the method modules (scores, masks, updates,
sparsegpt)."""
import pytest
import torch

from zpruner import scores
from zpruner.kernels import reductions, rowpass, score_passes, selection
from zpruner.kernels.columns import column_norm, column_variance
from zpruner.kernels.energy import energy_compensate_
from zpruner.kernels.score_passes import cvr, ria, zpruner
from zpruner.masks import Pattern
from zpruner.masks import drop_lowest, drop_lowest_by_topk, keep_mask
from zpruner.registry import SCORES
from zpruner.sparsegpt import sparsegpt
from zpruner.stats import ActivationStats
from zpruner.updates import energy_compensate


# --- helpers --------------------------------------------------------------------------------


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def small_chunks(request, monkeypatch):
    """Chunks of a few rows, so every pass has many chunks (and, on 2 threads, runs them on
    the worker pool): the chunk seams are what the fast paths can get wrong."""
    monkeypatch.setattr(rowpass, "CHUNK_ELEMENTS", 1000)
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield
    torch.set_num_threads(before)


def layer(d_out, d_in, seed, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g) / d_in**0.5 + offset
    stats = ActivationStats(d_in)
    stats.add(torch.randn(64, d_in, generator=g) * torch.exp(torch.randn(d_in, generator=g)) + 0.5)
    keep = torch.rand(d_out, d_in, generator=g) > 0.5
    return W, stats, keep


def assert_close_relative(actual, expected, rtol):
    """Elementwise within rtol of the largest magnitude (float32 reassociation)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


# --- EC --------------------------------------------------------------------------------------


@pytest.mark.parametrize("axes", [("col", "row"), ("col",), ("row",), ("row", "col"), ("col", "col"), ()])
@pytest.mark.parametrize("clamp", [(0.0, float("inf")), (0.8, 1.25)])
@pytest.mark.parametrize("offset", [0.0, 0.3])
@pytest.mark.parametrize("chunks", ["one chunk", "many chunks"])
def test_ec_equals_the_reference_formula(monkeypatch, axes, clamp, offset, chunks):
    """Bit for bit when the matrix is one chunk (every SmolLM2 layer: its verified +EC
    cells stay unchanged); across chunks the column sums are float32-reassociated, within
    1e-6."""
    if chunks == "many chunks":
        monkeypatch.setattr(rowpass, "CHUNK_ELEMENTS", 1000)
    W0, _, keep = layer(37, 53, seed=1, offset=offset)
    expected = energy_compensate(W0, W0 * keep, keep, axes, clamp)
    # in place on a masked copy, and from W0 alone (masked inside a pass)
    results = [energy_compensate_(W0, W0 * keep, keep, axes, clamp),
               energy_compensate_(W0, None, keep, axes, clamp)]
    for result in results:
        if chunks == "one chunk" or "col" not in axes:
            assert torch.equal(result, expected)
        else:
            assert_close_relative(result, expected, 1e-6)
            assert torch.equal(result, results[0])
        assert torch.equal(result == 0, ~keep | (expected == 0))


def test_ec_of_a_reconstructed_layer_equals_the_reference(small_chunks):
    """W need not be W0 masked (SparseGPT's output): EC must use W, not W0, for the energies."""
    W0, _, keep = layer(40, 48, seed=2)
    W = (W0 + 0.1 * torch.randn_like(W0)) * keep
    expected = energy_compensate(W0, W, keep)
    assert_close_relative(energy_compensate_(W0, W.clone(), keep), expected, 1e-6)
    assert not torch.allclose(energy_compensate_(W0, None, keep), expected, rtol=1e-3)


def test_ec_rejects_an_unknown_axis():
    W0, _, keep = layer(4, 4, seed=0)
    with pytest.raises(Exception, match="axis"):
        energy_compensate(W0, W0 * keep, keep, ("diag",))


# --- scores ------------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [0.0, 0.05])
def test_scores_equal_the_reference_formulas(small_chunks, offset):
    W, stats, _ = layer(45, 61, seed=3, offset=offset)
    assert torch.equal(ria(W, stats, a=0.5), scores.ria(W, stats, a=0.5))
    assert torch.equal(zpruner(W, stats), scores.zpruner(W, stats))
    assert torch.equal(cvr(W, stats, alpha=1.0, eps=1e-6), scores.cvr(W, stats, alpha=1.0, eps=1e-6))
    assert torch.equal(scores.wanda(W, stats), W.abs() * stats.l2[None, :])


def test_a_fast_version_runs_where_it_applies_and_the_formula_elsewhere():
    with SCORES.registered("toy", lambda W, stats=None: W.abs(), default_group="row"):
        SCORES.accelerate("toy", applies=lambda W, stats=None: W.shape[0] > 2)(lambda W, stats=None: -W.abs())
        small, large = torch.ones(2, 3), torch.ones(3, 3)
        assert torch.equal(SCORES["toy"](small, None, constants={}), small)
        assert torch.equal(SCORES["toy"](large, None, constants={}), -large)
        with pytest.raises(ValueError, match="already has a fast version"):
            SCORES.accelerate("toy")(lambda W, stats=None: W)
    with pytest.raises(ValueError, match="not registered"):
        SCORES.accelerate("toy")(lambda W, stats=None: W)


@pytest.mark.parametrize("name", ["ria", "zpruner", "cvr"])
def test_registered_scores_run_their_fast_versions(name):
    W, stats, _ = layer(45, 61, seed=3)
    assert scores.get_score(name).implementation(W, stats) is getattr(score_passes, name)


@pytest.mark.parametrize("shape", [(1, 7), (45, 61), (300, 2), (1536, 576), (576, 1536), (768, 2304)])
@pytest.mark.parametrize("offset", [0.0, 0.05, 30.0])
@pytest.mark.parametrize("layout", ["[out, in]", "transposed (GPT-2 Conv1D)"])
def test_column_variance_is_torchs_bit_for_bit(small_chunks, shape, offset, layout):
    """CVR's c_j: verified results (the SmolLM2 CVR cells) need torch's exact bits, also
    with a mean far from zero (offset 30: variance 1e5 times smaller than the mean's
    square), constant and zero columns, one row and two columns."""
    W, _, _ = layer(*shape, seed=sum(shape), offset=offset)
    W[:, 0] = 0.0
    W[:, -1] = 0.3
    if layout != "[out, in]":
        W = W.t().contiguous().t()
    assert torch.equal(column_variance(W), W.var(dim=0, unbiased=False))


@pytest.mark.parametrize("shape", [(1, 7), (45, 61), (300, 2), (1536, 576), (700, 1536)])
@pytest.mark.parametrize("layout", ["[out, in]", "transposed (GPT-2 Conv1D)"])
def test_column_norm_is_torchs_bit_for_bit(shape, layout):
    """Z-Pruner's column norms: verified results need torch's exact bits, also for zero
    columns, squares that overflow to inf, and more rows than one step sums."""
    W, _, _ = layer(*shape, seed=sum(shape))
    W[:, 0] = 0.0
    W[0, -1] = 3e20
    if layout != "[out, in]":
        W = W.t().contiguous().t()
    expected = W.norm(dim=0)
    assert expected[0] == 0 and (torch.isinf(expected[-1]) or shape[0] == 1)
    assert torch.equal(column_norm(W), expected)


def test_column_norm_probe_rejects_a_fused_multiply_add(monkeypatch):
    """A build of torch whose column sum fuses x·x + acc must get torch's own kernel: the
    probe tells the two sums apart."""
    from zpruner.kernels import columns

    def fused(W):
        total = torch.zeros(W.shape[1], dtype=torch.float64)
        for row in W.double():
            total = (total + row * row).float().double()  # one rounding per step, as an FMA
        return total.sqrt().float()

    assert columns._sequential_column_sum_is_torchs.__wrapped__()
    monkeypatch.setattr(columns, "_sequential_column_norm", fused)
    assert not columns._sequential_column_sum_is_torchs.__wrapped__()


@pytest.mark.parametrize("case", ["float64", "one column", "one tiny row"])
def test_column_norm_elsewhere_is_torchs_own(case):
    W = layer(300, 20, seed=6)[0]
    W = {"float64": W.double(), "one column": W[:, :1].contiguous(), "one tiny row": W[:1] * 1e-30}[case]
    assert torch.equal(column_norm(W), W.norm(dim=0))


@pytest.mark.parametrize("case", ["float64", "one column"])
def test_column_variance_elsewhere_is_torchs_own(case):
    W = layer(300, 20, seed=5)[0]
    W[:, 0] = 0.3  # torch gives a lone constant column 8.9e-16, and so must we
    W = {"float64": W.double(), "one column": W[:, :1].contiguous()}[case]
    assert torch.equal(column_variance(W), W.var(dim=0, unbiased=False))


@pytest.mark.parametrize("count_limit", [1 << 24, 10], ids=["counted", "summed as floats"])
def test_zpruner_fraction_of_small_weights_is_the_references_either_way(monkeypatch, two_thread_reference,
                                                                        count_limit, small_chunks):
    """α's fraction of small weights is counted (exact below 2²⁴ per share, a chunk at a
    time) or, above, summed as floats as torch does: the same score both ways, on one
    share and on two."""
    monkeypatch.setattr(reductions, "_EXACT_COUNT", count_limit)
    for shape in [(45, 61), (300, 250)]:
        W, stats, _ = layer(*shape, seed=8)
        assert torch.equal(zpruner(W, stats), two_thread_reference(scores.zpruner, W, stats))


def test_zpruner_score_survives_zero_rows_and_columns(small_chunks):
    W, stats, _ = layer(30, 40, seed=4)
    W[3] = 0
    W[:, 7] = 0
    S = zpruner(W, stats)
    assert torch.isfinite(S).all()
    assert torch.equal(S, scores.zpruner(W, stats))


@pytest.fixture
def two_thread_reference():
    """Runs a function on two torch threads, then gives the caller its thread count back."""
    before = torch.get_num_threads()

    def run(fn, *args):
        torch.set_num_threads(2)
        try:
            return fn(*args)
        finally:
            torch.set_num_threads(before)

    yield run
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
def test_zpruner_of_a_real_shaped_layer_is_the_two_thread_reference_on_any_thread_count(threads, two_thread_reference):
    """A SmolLM2 MLP shape: the textbook score's whole-matrix means depend on torch's thread
    count; the verified Table 1 was measured on two threads, and the score gives those bits
    on one thread as on two."""
    W, stats, _ = layer(1536, 576, seed=12)
    expected = two_thread_reference(scores.zpruner, W, stats)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        assert torch.equal(zpruner(W, stats), expected)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("n", [1000, 32767, 32768, 32769, 65536, 65537, 884736, 3_000_001])
def test_matrix_mean_and_std_are_torchs_two_thread_ones(n, two_thread_reference):
    g = torch.Generator().manual_seed(n)
    X = (torch.randn(n, generator=g) * 0.01 + 1e-3).reshape(1, -1)
    mean = reductions.matrix_mean(X)
    assert torch.equal(mean, two_thread_reference(torch.mean, X))
    assert torch.equal(reductions.matrix_std(X, mean), two_thread_reference(torch.std, X))


@pytest.mark.parametrize("slack, sequential", [(None, False), (1e7, True)])
def test_matrix_std_runs_the_sequential_sum_only_when_the_fast_one_cannot_decide(
        monkeypatch, two_thread_reference, slack, sequential):
    """The fast sum decides the float32 std unless a rounding boundary lies within its
    error bound (a bound made huge here); either way the bits are torch's."""
    if slack is not None:
        monkeypatch.setattr(reductions, "_STD_SLACK", slack)
    cumsums = []
    cumsum = torch.cumsum
    monkeypatch.setattr(torch, "cumsum", lambda *a, **k: cumsums.append(1) or cumsum(*a, **k))
    X = (torch.randn(100_000, generator=torch.Generator().manual_seed(7)) * 0.01).reshape(1, -1)
    mean = reductions.matrix_mean(X)
    assert torch.equal(reductions.matrix_std(X, mean), two_thread_reference(torch.std, X))
    assert bool(cumsums) == sequential


@pytest.mark.parametrize("threads", [1, 2])
def test_ec_of_a_real_shaped_layer_is_the_reference_bit_for_bit(threads):
    """A SmolLM2 MLP shape, default chunks (one per matrix: the column sums are the
    textbook's), on one thread and on two (the reference's reductions then use two)."""
    W, _, keep = layer(1536, 576, seed=12)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        expected = energy_compensate(W, W * keep, keep, ("col", "row"), (0.8, 1.25))
        assert torch.equal(energy_compensate_(W, None, keep, ("col", "row"), (0.8, 1.25)), expected)
    finally:
        torch.set_num_threads(before)


def test_ec_across_chunks_is_the_same_on_one_and_two_threads():
    """Larger than a chunk (a 7B attention projection has 16 M weights): reassociated column
    sums, within 1e-6 of the textbook, and the same bits whichever thread finishes first."""
    W, _, keep = layer(2600, 1000, seed=13)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(energy_compensate_(W, None, keep, ("col", "row"), (0.8, 1.25)))
    finally:
        torch.set_num_threads(before)
    assert_close_relative(results[0], energy_compensate(W, W * keep, keep, ("col", "row"), (0.8, 1.25)), 1e-6)
    assert torch.equal(results[0], results[1])


# --- layer-wide selection ----------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.0001, 0.1, 0.5, 0.9, 0.9999])
def test_layer_selection_equals_topk_on_distinct_scores(fraction):
    g = torch.Generator().manual_seed(5)
    score = torch.randperm(300_000, generator=g).float().reshape(1, -1)  # all distinct
    k = int(fraction * score.numel())
    assert torch.equal(drop_lowest(score, k), drop_lowest_by_topk(score, k))


@pytest.mark.parametrize("levels", [2, 7, 1000])
def test_layer_selection_with_ties_at_the_cut_is_topk_s(levels):
    """Top-k's choice among tied scores decides real results (dequantized weights tie by
    the dozen): a tie across the cut must give exactly top-k's mask."""
    g = torch.Generator().manual_seed(6)
    score = torch.randint(levels, (1, 200_000), generator=g).float()
    k = 123_457
    keep = drop_lowest(score, k)
    assert int((~keep).sum()) == k
    assert torch.equal(keep, drop_lowest_by_topk(score, k))


@pytest.mark.parametrize("levels", [2, 7, 1000])
def test_long_row_with_ties_at_the_cut_drops_the_first_tied_without_topk(monkeypatch, levels):
    """From TIES_BY_INDEX_MIN scores on (a whole 7B-70B layer), no top-k: everything below
    the k-th score goes, everything above stays, and of the scores equal to it the lowest
    indices go, exactly k in all."""
    g = torch.Generator().manual_seed(14)
    score = torch.randint(levels, (1, selection.TIES_BY_INDEX_MIN), generator=g).float()
    k = selection.TIES_BY_INDEX_MIN // 2 + 12_345
    t = score.reshape(-1).kthvalue(k).values
    tied = torch.nonzero(score[0] == t).reshape(-1)
    need = k - int((score < t).sum())
    expected = score[0] > t
    expected[tied[need:]] = True
    assert 0 < need < tied.numel()  # the cut falls inside a level
    monkeypatch.setattr(selection.torch, "topk", None)  # any top-k call would fail
    keep = drop_lowest(score, k)
    assert int((~keep).sum()) == k
    assert torch.equal(keep[0], expected)


def test_layer_selection_with_ties_below_the_cut_needs_no_topk(monkeypatch):
    """Ties that do not straddle the cut are decided by the threshold alone."""
    score = torch.randperm(200_000, generator=torch.Generator().manual_seed(11)).float().reshape(1, -1)
    score[0, :5000] = 3.0  # 5000 equal scores, all far below the cut
    monkeypatch.setattr(selection.torch, "topk", None)  # any top-k call would fail
    keep = drop_lowest(score, 100_000)
    assert int((~keep).sum()) == 100_000
    assert (~keep[0, :5000]).all()
    assert score[~keep].max() < score[keep].min()


def test_layer_selection_keeps_nan_scores_like_topk():
    score = torch.randperm(100_000, generator=torch.Generator().manual_seed(10)).float().reshape(1, -1)
    score[0, ::97] = float("nan")
    keep = drop_lowest(score, 40_000)
    assert int((~keep).sum()) == 40_000
    assert keep[0, ::97].all()
    assert torch.equal(keep, drop_lowest_by_topk(score, 40_000))


def test_layer_selection_falls_back_when_the_sample_misses(monkeypatch):
    """A bracket that misses t (forced here by a 2-score sample) must not give a wrong mask."""
    monkeypatch.setattr(selection, "SAMPLE_SIZE", 2)
    score = torch.randperm(100_000, generator=torch.Generator().manual_seed(7)).float().reshape(1, -1)
    for k in (1, 1000, 50_000, 99_999):
        assert torch.equal(drop_lowest(score, k), drop_lowest_by_topk(score, k))


def test_layer_selection_at_the_ends_and_of_a_short_row_is_topks():
    g = torch.Generator().manual_seed(12)
    tied = torch.randint(7, (1, 300_000), generator=g).float()
    for k in (0, tied.numel()):
        assert torch.equal(drop_lowest(tied, k), drop_lowest_by_topk(tied, k))
    short = torch.randint(7, (1, 1000), generator=g).float()  # too short to search: top-k decides its tie
    assert torch.equal(drop_lowest(short, 501), drop_lowest_by_topk(short, 501))


def test_layer_mask_of_a_real_shaped_score_matches_topk():
    W, _, _ = layer(512, 384, seed=8)
    keep = keep_mask(W.abs(), 0.5, Pattern(), "layer")
    assert torch.equal(keep, drop_lowest_by_topk(W.abs().reshape(1, -1), W.numel() // 2).reshape(W.shape))


@pytest.mark.parametrize("pattern", [Pattern(), Pattern(2, 4)], ids=["row", "2:4"])
@pytest.mark.parametrize("levels", [3, 1000])
def test_row_selection_in_chunks_is_one_topk_over_the_matrix(small_chunks, pattern, levels):
    """Rows and N:M groups go through top-k a chunk of rows at a time, on the worker
    threads: the mask, ties at the cut included, must be one whole-matrix top-k's."""
    score = torch.randint(levels, (97, 64), generator=torch.Generator().manual_seed(12)).float()
    keep = keep_mask(score, 0.5, pattern, "row")
    groups, k = (score, 32) if not pattern.is_nm else (score.reshape(-1, 4), 2)
    assert torch.equal(keep, drop_lowest_by_topk(groups, k).reshape(score.shape))


def test_masked_copy_is_the_product_with_the_mask_bit_for_bit(small_chunks):
    g = torch.Generator().manual_seed(13)
    W = torch.randn(41, 96, generator=g)
    keep = torch.rand(41, 96, generator=g) > 0.5
    copy = rowpass.masked_copy(W, keep)
    assert torch.equal(copy.view(torch.int32), (W * keep).view(torch.int32))  # -0.0 included
    assert copy.data_ptr() != W.data_ptr()


# --- SparseGPT --------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", [Pattern(), Pattern(2, 4)])
def test_sparsegpt_is_the_same_on_one_and_two_threads(pattern):
    g = torch.Generator().manual_seed(9)
    W = torch.randn(70, 96, generator=g)
    X = torch.randn(256, 96, generator=g) * torch.exp(torch.randn(96, generator=g))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        W1, keep1 = sparsegpt(W, X.t() @ X, sparsity=0.5, pattern=pattern, blocksize=32)
        torch.set_num_threads(2)
        W2, keep2 = sparsegpt(W, X.t() @ X, sparsity=0.5, pattern=pattern, blocksize=32)
        assert torch.get_num_threads() == 2  # the solver gives the caller its threads back
    finally:
        torch.set_num_threads(before)
    assert torch.equal(keep1, keep2)
    assert_close_relative(W2, W1, 1e-6)


def test_map_chunks_returns_results_in_chunk_order(monkeypatch):
    monkeypatch.setattr(rowpass, "CHUNK_ELEMENTS", 10)
    X = torch.arange(100.0).reshape(50, 2)
    parts = rowpass.map_chunks(lambda rows, _s: X[rows].sum(), X, workers=2)
    assert len(parts) == 10
    assert [float(p) for p in parts] == [float(X[i * 5:(i + 1) * 5].sum()) for i in range(10)]


def test_pool_threads_stay_on_one_torch_thread_when_the_main_thread_changes_its_count(monkeypatch):
    """A sum over more than torch's grain splits by the thread count, so Z-Pruner's
    two-share scalars need each share on exactly one thread, even when the pool was made
    before the main thread last called torch.set_num_threads (its threads take the count
    of the moment at their first parallel op)."""
    monkeypatch.setattr(rowpass, "_pools", {})
    X = torch.randn(2, 300_000, generator=torch.Generator().manual_seed(3))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = [X[0].sum(), X[1].sum()]
        torch.set_num_threads(2)
        two_threads = [X[0].sum(), X[1].sum()]
        rowpass.map_chunks(lambda rows, _s: None, X, rows=1, workers=2)  # the pool, still idle
        torch.set_num_threads(1)
        torch.set_num_threads(2)
        shares = rowpass.map_threads(lambda row: row.sum(), [X[0], X[1]])
    finally:
        torch.set_num_threads(before)
    assert not torch.equal(torch.stack(one_thread), torch.stack(two_threads))  # the split shows
    assert torch.equal(torch.stack(shares), torch.stack(one_thread))


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "torch passes"])
@pytest.mark.parametrize("shape", [(45, 61), (1536, 576)])
def test_zpruner_is_the_reference_with_and_without_its_compiled_passes(monkeypatch, small_chunks, two_thread_reference,
                                                                       compiled, shape):
    """Z-Pruner's compiled score pass, small-weight count and fast std sums (any size, on
    the CPU) against its torch passes (GPU, no compiler): the same bits."""
    from zpruner.kernels import native

    if compiled and None in (native.load(*score_passes._KERNEL), native.load(*reductions._KERNEL)):
        pytest.skip("the native Z-Pruner kernels could not be built here")
    if not compiled:
        monkeypatch.setattr(reductions, "_reduction_kernel", lambda X: None)
        monkeypatch.setattr(score_passes, "_score_kernel", lambda *operands: None)
    W, stats, _ = layer(*shape, seed=21, offset=0.01)
    W[2] = 0.0
    W[:, 3] = 0.0
    assert (reductions._reduction_kernel(W) is not None) == compiled
    assert torch.equal(zpruner(W, stats), two_thread_reference(scores.zpruner, W, stats))
