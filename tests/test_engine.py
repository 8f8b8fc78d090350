"""The engine's block-by-block run must reproduce the full model exactly."""
import pytest
import torch

from conftest import FAMILIES, build_tiny_model
from zpruner.engine import capture_block_inputs, run_layerwise
from zpruner.layers import find_blocks


def logits_through_engine(model, samples):
    """Full-model logits with the last block's output replaced by the engine's."""
    hidden = run_layerwise(model, samples, progress=False)
    last = find_blocks(model)[-1]
    logits = []
    for j, sample in enumerate(samples):
        def replace(_m, _args, out, j=j):
            return (hidden[j], *out[1:]) if isinstance(out, tuple) else hidden[j]

        handle = last.register_forward_hook(replace)
        try:
            logits.append(model(sample[None], use_cache=False).logits)
        finally:
            handle.remove()
    return torch.cat(logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_reproduces_full_model_logits(family):
    model = build_tiny_model(family, vocab_size=300)
    samples = torch.randint(3, 300, (3, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(samples, use_cache=False).logits
        got = logits_through_engine(model, samples)
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_engine_matches_one_sample_at_a_time(family):
    """Batches of 2 over 5 samples (the last batch smaller) give every sample's outputs, in order."""
    model = build_tiny_model(family, vocab_size=300)
    samples = torch.randint(3, 300, (5, 24), generator=torch.Generator().manual_seed(2))
    single = torch.cat(run_layerwise(model, samples, progress=False))
    batched = run_layerwise(model, samples, progress=False, batch_size=2)
    assert [h.shape[0] for h in batched] == [2, 2, 1]
    assert (torch.cat(batched) - single).abs().max().item() <= 1e-5


def test_batched_visit_sees_every_token_and_limit_counts_batches():
    model = build_tiny_model("llama", vocab_size=300)
    samples = torch.randint(3, 300, (5, 12), generator=torch.Generator().manual_seed(3))
    seen = []

    def visit(i, block, forward):
        if i == 0:
            seen.append([h.shape[0] for h in forward(limit=2)])

    run_layerwise(model, samples, visit, progress=False, batch_size=2)
    assert seen == [[2, 2]]
    with pytest.raises(ValueError, match="batch_size"):
        capture_block_inputs(model, samples, progress=False, batch_size=0)


def test_engine_output_differs_when_blocks_are_skipped():
    """The replacement hook really feeds the logits: zeroed block outputs change them."""
    model = build_tiny_model("llama", vocab_size=300)
    samples = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(samples, use_cache=False).logits
        handle = find_blocks(model)[-1].register_forward_hook(lambda _m, _a, out: torch.zeros_like(out))
        try:
            zeroed = model(samples, use_cache=False).logits
        finally:
            handle.remove()
    assert (zeroed - expected).abs().max().item() > 1e-2


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_capture_records_every_keyword_argument(family):
    model = build_tiny_model(family, vocab_size=300)
    samples = torch.randint(3, 300, (2, 16))
    hidden, calls = capture_block_inputs(model, samples, progress=False)
    assert len(calls) == len(hidden) == 2
    assert hidden[0].shape == (1, 16, 64)
    if family == "llama":
        # rotary tables are computed once by the model and passed to every layer
        assert "position_embeddings" in calls[0].kwargs
        cos, sin = calls[0].kwargs["position_embeddings"]
        assert cos.shape[-2] == 16
        # identical per-sample values are stored once
        assert calls[1].kwargs["position_embeddings"][0] is cos


class _KeywordBlock(torch.nn.Module):
    """Takes its hidden states by keyword, a per-sample keyword tensor, returns a tuple."""

    def __init__(self, width):
        super().__init__()
        self.fc = torch.nn.Linear(width, width)

    def forward(self, *, hidden_states, offset):
        return (torch.tanh(self.fc(hidden_states)) + offset, None)


class _KeywordModel(torch.nn.Module):
    def __init__(self, vocab=50, width=16, depth=3):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.layers = torch.nn.ModuleList(_KeywordBlock(width) for _ in range(depth))
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, ids, use_cache=False):
        h = self.embed(ids)
        offset = ids.float().mean()  # differs from sample to sample
        for layer in self.layers:
            h = layer(hidden_states=h, offset=offset)[0]
        return self.head(h)


def test_engine_keyword_hidden_states_tuple_outputs_and_per_sample_kwargs():
    torch.manual_seed(0)
    model = _KeywordModel().eval()
    samples = torch.randint(0, 50, (3, 8), generator=torch.Generator().manual_seed(2))
    _, calls = capture_block_inputs(model, samples, progress=False)
    assert [c.hidden_key for c in calls] == ["hidden_states"] * 3
    assert len({float(c.kwargs["offset"]) for c in calls}) == 3  # per-sample values kept apart
    hidden = run_layerwise(model, samples, progress=False)
    expected = []
    with torch.no_grad():
        for sample in samples:
            h = model.embed(sample[None])
            for layer in model.layers:
                h = layer(hidden_states=h, offset=sample.float().mean())[0]
            expected.append(h)
    for got, want in zip(hidden, expected):
        assert torch.allclose(got, want, atol=1e-6)


def test_without_last_outputs_the_last_block_is_not_rerun():
    """Pruning needs nothing after the last block: its final run is skipped, and what comes
    back is the last block's input (as the full model computes it)."""
    model = build_tiny_model("llama", vocab_size=300)
    samples = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(4))
    last = find_blocks(model)[-1]
    inputs = []
    handle = last.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
    try:
        with torch.no_grad():
            model(samples, use_cache=False)
        calls_before = len(inputs)
        hidden = run_layerwise(model, samples, lambda i, block, forward: forward(), progress=False,
                               batch_size=2, last_outputs=False)
    finally:
        handle.remove()
    assert len(inputs) - calls_before == 1  # the visit's own forward only
    assert (hidden[0] - inputs[0]).abs().max().item() <= 1e-5


def _stats_pass(model, samples, inputs_of, hessian=True):
    """Statistics of every linear of every block, gathered by the engine's statistics pass,
    and how many times each linear's own forward ran."""
    from zpruner.layers import find_matrices
    from zpruner.stats import record_inputs

    out, runs = {}, {}

    def visit(i, block, forward):
        layers = find_matrices(block)
        counters = [m.layer.register_forward_hook(lambda m, _a, _o: runs.__setitem__(id(m), runs.get(id(m), 0) + 1))
                    for m in layers.values()]
        with record_inputs(layers, hessian=hessian) as stats:
            forward(inputs_of=[m.layer for m in layers.values()] if inputs_of else None)
        for handle in counters:
            handle.remove()
        out.update({(i, name): (s.count, s.sum, s.sumsq, s.xtx) for name, s in stats.items()})
        out.update({(i, name, "runs"): runs.pop(id(m.layer), 0) for name, m in layers.items()})

    run_layerwise(model, samples, visit, progress=False, batch_size=2)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_statistics_pass_stops_after_the_last_input_with_the_same_statistics(family):
    model = build_tiny_model(family, vocab_size=300)
    samples = torch.randint(3, 300, (5, 16), generator=torch.Generator().manual_seed(4))
    full = _stats_pass(model, samples, inputs_of=False)
    short = _stats_pass(model, samples, inputs_of=True)
    stats_keys = [k for k in full if len(k) == 2]
    for key in stats_keys:
        count, s, sq, xtx = full[key]
        assert short[key][0] == count and count == 5 * 16
        assert torch.equal(short[key][1], s) and torch.equal(short[key][2], sq) and torch.equal(short[key][3], xtx)
    runs_full = {k: v for k, v in full.items() if len(k) == 3}
    runs_short = {k: v for k, v in short.items() if len(k) == 3}
    assert set(runs_full.values()) == {3}  # 3 batches of 2, 2, 1 samples
    # the last linear of each block runs only in the first batch; every other one in all
    skipped = [k for k in runs_short if runs_short[k] == 1]
    assert len(skipped) == len(find_blocks(model)) and all(runs_short[k] == 3 for k in runs_short if k not in skipped)


def test_statistics_pass_keeps_every_input_of_a_module_called_twice():
    """A module the block calls twice (a shared layer) would lose its second input to a
    stop after its first call: the stop is then not used."""
    from zpruner.engine import _forward, BlockCall

    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.b(self.b(self.a(x)))  # once every module has run, b runs again

    block = Shared()
    hidden = [torch.randn(3, 4, generator=torch.Generator().manual_seed(j)) for j in range(3)]
    seen = []
    handle = block.b.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    _forward(block, [BlockCall() for _ in hidden], hidden, keep=False, inputs_of=[block.a, block.b])
    handle.remove()
    assert len(seen) == 6  # two calls of b per batch, none cut off
