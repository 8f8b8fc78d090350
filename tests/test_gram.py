"""XᵀX over the upper panels (zpruner.kernels.gram) and its use in the activation statistics."""
import pytest
import torch
from torch import nn

from zpruner.kernels import gram
from zpruner.layers import Matrix
from zpruner.stats import ActivationStats, record_inputs

D = gram.MIN_PANELS * gram.PANEL_ROWS + 17  # the fewest panels, the last one a little taller


def batches(d=D, sizes=(700, 700, 300), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g) * (torch.rand(d, generator=g) * 3) for n in sizes]


def whole(xs, d=D):
    acc = torch.zeros(d, d)
    for x in xs:
        acc.addmm_(x.t(), x)
    return acc


def exact(xs, d=D):
    return sum(x.double().t() @ x.double() for x in xs).float()


def same_bits(a, b):
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.fixture(autouse=True)
def fresh_verdicts(monkeypatch):
    monkeypatch.setattr(gram, "_verdicts", {})


@pytest.fixture
def panels_always(monkeypatch):
    """The panel path whatever this machine's BLAS rounds: for tests of the arithmetic."""
    monkeypatch.setattr(gram, "agrees", lambda x, edges: True)


def test_panel_edges_cover_the_matrix_in_panels_of_at_least_the_minimum_height():
    assert gram.panel_edges(gram.MIN_PANELS * gram.PANEL_ROWS - 1) is None  # too few: not worth it
    edges = gram.panel_edges(D)
    assert edges[0] == 0 and edges[-1] == D and len(edges) == gram.MIN_PANELS + 1
    assert all(b - a >= gram.PANEL_ROWS for a, b in zip(edges, edges[1:]))


def test_upper_panels_are_the_product_and_only_they_are_written():
    xs = batches()
    edges = gram.panel_edges(D)
    acc = torch.zeros(D, D)
    below = torch.zeros(D, D, dtype=torch.bool)
    for p in range(1, len(edges) - 1):
        below[edges[p]:edges[p + 1], :edges[p]] = True
    acc[below] = float("nan")  # what add_upper must not read or write
    for x in xs:
        gram.add_upper(acc, x, edges)
    assert acc[below].isnan().all() and not acc[~below].isnan().any()
    gram.mirror(acc, edges)
    assert torch.equal(acc, acc.t())
    assert torch.allclose(acc, exact(xs), rtol=1e-5, atol=1e-3)


def test_hessian_with_panels_is_symmetric_and_the_sum(panels_always):
    xs = batches()
    s = ActivationStats(D, hessian=True)
    for x in xs:
        s.add(x)
    assert torch.equal(s.xtx, s.xtx.t())
    assert torch.allclose(s.xtx, exact(xs), rtol=1e-5, atol=1e-3)
    first = s.xtx.clone()  # read, then accumulated on: the mirrored part is overwritten again
    s.add(xs[0])
    assert torch.allclose(s.xtx, first + exact(xs[:1]), rtol=1e-5, atol=1e-3)
    assert torch.equal(s.xtx, s.xtx.t())


def test_hessian_keeps_addmm_bits_where_the_probe_agrees_and_addmm_where_not(monkeypatch):
    xs = batches()
    s = ActivationStats(D, hessian=True)
    for x in xs:
        s.add(x)
    if all(gram._verdicts.values()):
        assert same_bits(s.xtx, whole(xs))  # the probe's answer holds for other data
    monkeypatch.setattr(gram, "agrees", lambda x, edges: False)
    s = ActivationStats(D, hessian=True)
    for x in xs:
        s.add(x)
    assert same_bits(s.xtx, whole(xs))


def test_batches_of_other_sizes_may_take_either_path(monkeypatch):
    """A shape where the probe disagrees (here: the short batches) takes the whole
    product, onto a sum whose part below the panels is stale until read."""
    monkeypatch.setattr(gram, "agrees", lambda x, edges: x.shape[0] == 700)
    xs = batches(sizes=(700, 300, 700, 300))
    s = ActivationStats(D, hessian=True)
    for x in xs:
        s.add(x)
    assert torch.equal(s.xtx, s.xtx.t())
    assert torch.allclose(s.xtx, exact(xs), rtol=1e-5, atol=1e-3)


def test_one_probe_per_shape_and_none_off_the_cpu_or_for_other_dtypes(monkeypatch):
    x = torch.randn(64, D)
    assert gram.panels_for(x.double()) is None
    assert gram.panels_for(torch.randn(64, gram.PANEL_ROWS)) is None
    calls = []
    monkeypatch.setattr(gram, "agrees", lambda x, edges: calls.append(x.shape) or len(calls) == 1)
    for _ in range(2):
        assert gram.panels_for(x) == gram.panel_edges(D)
        assert gram.panels_for(torch.randn(65, D)) is None
    assert calls == [(64, D), (65, D)]


def test_probe_sees_a_panel_that_rounds_otherwise_and_an_asymmetric_whole(monkeypatch):
    x = batches(sizes=(300,))[0]
    edges = gram.panel_edges(D)
    honest = gram.agrees(x, edges)  # this machine's answer; either is allowed
    assert isinstance(honest, bool)
    addmm = torch.Tensor.addmm_

    def off_by_one_ulp_in_panels(self, a, b, **kw):
        out = addmm(self, a, b, **kw)
        if out.shape[0] < D:  # a panel, not the whole product
            out.view(torch.int32)[0, -1] += 1
        return out

    def off_by_one_ulp_below(self, a, b, **kw):
        out = addmm(self, a, b, **kw)
        if out.shape[0] == D:  # the whole product, below the first panel
            out.view(torch.int32)[-1, 0] += 1
        return out

    for wrong in (off_by_one_ulp_in_panels, off_by_one_ulp_below):
        monkeypatch.setattr(torch.Tensor, "addmm_", wrong)
        assert not gram.agrees(x, edges), wrong.__name__
    monkeypatch.setattr(torch.Tensor, "addmm_", addmm)
    assert gram.agrees(x, edges) == honest


def test_layers_fed_the_same_tensor_share_a_sum_awaiting_its_mirror(panels_always):
    torch.manual_seed(2)
    q, k, o = (nn.Linear(D, 4) for _ in range(3))
    xs = batches(sizes=(300, 300))
    with record_inputs({n: Matrix.of(m) for n, m in {"q": q, "k": k, "o": o}.items()}, hessian=True) as stats:
        for i, x in enumerate(xs):
            q(x), k(x)
            if i == 0:
                stats["k"].xtx  # k reads (mirrors) its sum between batches, q does not
            o(x.clone())
    expected = exact(xs)
    for name in "qko":
        assert torch.equal(stats[name].xtx, stats[name].xtx.t()), name
        assert torch.allclose(stats[name].xtx, expected, rtol=1e-5, atol=1e-3), name
    assert same_bits(stats["q"].xtx, stats["k"].xtx)


def test_a_replaced_hessian_is_not_mirrored_over(panels_always):
    s = ActivationStats(D, hessian=True)
    s.add(batches(sizes=(64,))[0])
    s.xtx = torch.arange(D * D, dtype=torch.float32).reshape(D, D)  # as a permutation does
    assert torch.equal(s.xtx, torch.arange(D * D, dtype=torch.float32).reshape(D, D))
