"""Mixture-of-experts models: every expert pruned on the tokens routed to it, routers left
alone, the sparsity of every block weight counted from the weights, whole experts removed
together with their router rows and the config's count, and the saved folder loading back
to the model that was measured."""
import importlib.util
import json

import pytest
import torch
import transformers

from conftest import MOE_FAMILIES, REPO, build_tiny_model, build_tiny_moe
from test_offload import assert_same_weights, quick
from zpruner import ModelConfig, PruneConfig, RunConfig, measure_sparsity, prune
from zpruner.config import EvalConfig
from zpruner.engine import capture_block_inputs
from zpruner.experts import use_eager_experts
from zpruner.layers import block_experts, find_blocks, find_matrices, iter_matrices, left_alone
from zpruner.runner import run
from zpruner.stats import record_inputs
from zpruner.summary import percent_below_all
from zpruner.workspace import Workspace

VOCAB = 300


def samples(n: int = 4, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def moe(family: str, **kwargs):
    model = build_tiny_moe(family, VOCAB, **kwargs)
    use_eager_experts(model)
    return model


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_experts_and_routers_are_found(family):
    model = moe(family)
    blocks = find_blocks(model)
    found = [block_experts(b) for b in blocks]
    assert sum(len(f) for f in found) >= 1 and all(ex.count == 4 for f in found for ex in f)
    for block, experts in zip(blocks, found):
        matrices = find_matrices(block)
        alone = left_alone(block)
        for ex in experts:
            for param in ex.params:
                slices = [matrices[ex.matrix_name(param, e)].weight for e in range(4)]
                stored = getattr(ex.module, param)
                assert all(s.data_ptr() == stored[e].data_ptr() for e, s in enumerate(slices))  # views, not copies
                assert {tuple(s.shape) for s in slices} in ({(96, 64)}, {(64, 48)})  # [out, in], any stored layout
        routers = [name for name, (why, _) in alone.items() if why.startswith("router")]
        assert len(routers) == len(experts)
        assert not any(name.startswith(r.rpartition(".")[0] + ".") or name == r.rpartition(".")[0]
                       for name in matrices for r in routers)
    sparsity = measure_sparsity(model)
    assert sparsity["pruned_share"] > 0.97 and sparsity["left_alone"]


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_observing_the_experts_changes_no_output_and_sees_each_routed_token(family):
    """The block's output under observation is its own, bit for bit; the experts' first
    matrices receive, together, every token top-k times."""
    model = moe(family)
    x = samples()
    hidden, calls = capture_block_inputs(model, x, progress=False, batch_size=2)
    top_k = model.config.num_experts_per_tok
    for block in find_blocks(model):
        own = [call.run(block, h) for call, h in zip(calls, hidden)]
        matrices = find_matrices(block)
        with record_inputs(matrices) as stats:
            observed = [call.run(block, h) for call, h in zip(calls, hidden)]
        assert all(torch.equal(a, b) for a, b in zip(own, observed))
        for ex in block_experts(block):
            routed = sum(stats.tokens[ex.matrix_name(ex.params[0], e)] for e in range(ex.count))
            assert routed == x.numel() * top_k
        hidden = own


def test_an_expert_sees_exactly_the_tokens_its_router_sends_it():
    """Mixtral, checked against its router's own choice: expert e's statistics are the sums
    over the tokens whose top-k contains e, of the MoE input (gate_up) and of
    act(gate)·up of them (down)."""
    model = moe("mixtral")
    hidden, calls = capture_block_inputs(model, samples(), progress=False, batch_size=4)
    block = find_blocks(model)[0]
    seen = []
    handle = block.mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, 64)))
    with record_inputs(find_matrices(block)) as stats:
        calls[0].run(block, hidden[0])
    handle.remove()
    x = seen[0]
    _, _, chosen = block.mlp.gate(x)
    experts = block.mlp.experts
    for e in range(4):
        mine = x[(chosen == e).any(dim=1)]
        gate, up = torch.nn.functional.linear(mine, experts.gate_up_proj[e]).chunk(2, dim=-1)
        inner = experts.act_fn(gate) * up
        gate_up_stats = stats[f"mlp.experts.gate_up_proj[{e}]"]
        down_stats = stats[f"mlp.experts.down_proj[{e}]"]
        assert gate_up_stats.count == down_stats.count == mine.shape[0] > 0
        torch.testing.assert_close(gate_up_stats.sum, mine.sum(dim=0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(down_stats.sumsq, inner.square().sum(dim=0), rtol=1e-5, atol=1e-6)


def _pruned_run(tmp_path, model_dir, data_dir, offload="none", **prune_options):
    """(results, the pruned model as it was measured) of one API run that saves the model."""
    save = tmp_path / f"saved-{offload}"
    config = RunConfig(ModelConfig(str(model_dir), device="cpu"),
                       PruneConfig(nsamples=4, seqlen=32, **prune_options), EvalConfig(seqlen=32, windows=4),
                       data_dir=str(data_dir), save=str(save), offload=offload)
    workspace = Workspace(config.model, config.data_dir, offload_mode=offload)
    results = run(config, progress=False, workspace=workspace).to_dict()  # as the results file holds them
    return results, workspace.model, save


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_every_expert_is_pruned_exactly_and_the_saved_model_is_the_measured_one(tmp_path, tiny_moe_dir, tiny_data_dir,
                                                                              family, pattern):
    model_dir = tiny_moe_dir(family)
    results, pruned, save = _pruned_run(tmp_path, model_dir, tiny_data_dir, method="wanda", pattern=pattern)
    dense = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(save)
    use_eager_experts(reloaded)
    for name, matrix in iter_matrices(reloaded):
        zeros = matrix.weight == 0
        if pattern == "2:4":
            assert (zeros.reshape(-1, 4).sum(dim=1) == 2).all(), name
        else:
            assert (zeros.sum(dim=1) == zeros.shape[1] // 2).all(), name
    routers = [n for n, why in measure_sparsity(reloaded)["left_alone"].items() if why.startswith("router")]
    assert routers
    dense_state, saved_state = dense.state_dict(), reloaded.state_dict()
    assert all(torch.equal(dense_state[n], saved_state[n]) for n in routers)
    counted = measure_sparsity(reloaded)
    for key in ("overall", "all_block_weights", "pruned_share"):
        assert results["sparsity"][key] == counted[key], key
    block_weights = [p for b in find_blocks(reloaded) for p in b.parameters() if p.dim() >= 2]  # routers too
    zeros = sum(int((p == 0).sum()) for p in block_weights) / sum(p.numel() for p in block_weights)
    assert results["sparsity"]["all_block_weights"] == pytest.approx(zeros, abs=1e-12)
    ids = samples(2, 16, seed=5)
    with torch.no_grad():
        assert torch.equal(pruned(ids).logits, reloaded(ids).logits)
    experts = results["experts"]
    assert experts and all(sum(entry["tokens"]) > 0 for entry in experts.values())
    # streamed from disk block by block: the same bits and the same counts
    streamed, _, streamed_save = _pruned_run(tmp_path, model_dir, tiny_data_dir, "disk", method="wanda",
                                             pattern=pattern)
    assert_same_weights(save, streamed_save)
    assert streamed["sparsity"] == results["sparsity"] and streamed["experts"] == experts
    assert streamed["perplexity"] == pytest.approx(results["perplexity"], rel=1e-6)


@pytest.mark.parametrize("method", ["sparsegpt", "admm", "zpruner", "cvr", "ria"])
def test_every_method_prunes_experts(method):
    model = moe("qwen3_moe")
    extra = {"update": "ec"} if method in ("zpruner", "cvr") else {}
    report = prune(model, PruneConfig(method=method, pattern="2:4", nsamples=4, seqlen=32, **extra), samples(),
                   progress=False)
    assert report.experts
    for name, matrix in iter_matrices(model):
        assert ((matrix.weight == 0).reshape(-1, 4).sum(dim=1) == 2).all(), name


def _starve_experts(model, x: torch.Tensor, few: int) -> None:
    """gpt-oss block 0's router biased so that expert 0 takes every token, expert 2 none,
    and expert 3 beats expert 1 on exactly ``few`` tokens (the others go to expert 1)."""
    block = find_blocks(model)[0]
    seen = []
    handle = block.mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, 64)))
    with torch.no_grad():
        model(x)
    handle.remove()
    router = block.mlp.router
    margin = torch.nn.functional.linear(torch.cat(seen), router.weight[3] - router.weight[1])
    cut = margin.sort(descending=True).values[few - 1:few + 1].mean()
    with torch.no_grad():
        router.bias.copy_(torch.tensor([100.0, 10.0, -100.0, 10.0 - float(cut)]))


@pytest.mark.parametrize("method,fallbacks", [("wanda", {2}), ("sparsegpt", {2, 3})])
def test_experts_with_too_few_tokens_get_the_pooled_statistics_and_say_so(method, fallbacks):
    """No tokens: a fallback for every method; 3 tokens: enough for an activation norm, not
    for a Hessian of 64 inputs."""
    model = moe("gpt_oss")
    x = samples()
    _starve_experts(model, x, few=3)
    report = prune(model, PruneConfig(method=method, nsamples=4, seqlen=32), x, progress=False)
    entry = report.experts["model.layers.0.mlp.experts"]
    assert entry["tokens"][2] == 0 and entry["tokens"][3] == 3 and entry["tokens"][0] == x.numel()
    starved = {int(name.rsplit("[", 1)[1][:-1]) for name in entry["fallback"]}
    assert starved == fallbacks
    assert all("pooled statistics" in why and "routed tokens" in why for why in entry["fallback"].values())
    for name, matrix in iter_matrices(model):  # SparseGPT chooses its mask per column block, not per row
        assert int((matrix.weight == 0).sum()) == matrix.weight.numel() // 2, name


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_removing_half_the_experts_saves_a_model_that_loads_and_computes_the_same(tmp_path, tiny_moe_dir,
                                                                                 tiny_data_dir, family):
    model_dir = tiny_moe_dir(family)
    results, pruned, save = _pruned_run(tmp_path, model_dir, tiny_data_dir, method="wanda", prune_experts=0.5)
    config = json.loads((save / "config.json").read_text())
    assert {v for k, v in config.items() if k in ("num_local_experts", "num_experts")} == {2}
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(save)
    use_eager_experts(reloaded)
    ids = samples(2, 16, seed=5)
    with torch.no_grad():
        assert torch.equal(pruned(ids).logits, reloaded(ids).logits)
    dense = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    for name, entry in results["experts"].items():
        assert len(entry["kept"]) == 2 and sorted(entry["kept"] + entry["removed"]) == [0, 1, 2, 3]
        assert entry["scores"] and entry["score"] == "reap"
        i = int(name.split(".")[2])
        before, after = find_blocks(dense)[i].mlp, find_blocks(reloaded)[i].mlp
        assert torch.equal(after.gate.weight, before.gate.weight[entry["kept"]])  # the kept experts' router rows
        assert torch.equal(after.experts.down_proj.data, before.experts.down_proj.data[entry["kept"]] *
                           (after.experts.down_proj.data != 0))  # their weights, pruned
    s = results["sparsity"]
    assert s["removed_with_experts"] > s["all_block_weights"]


@pytest.mark.parametrize("score", ["frequency", "random"])
def test_other_expert_scores(score):
    model = moe("mixtral")
    report = prune(model, PruneConfig(method="wanda", prune_experts=0.25, expert_score=score, nsamples=4, seqlen=32),
                   samples(), progress=False)
    for entry in report.experts.values():
        assert len(entry["removed"]) == 1 and entry["score"] == score
        if score == "frequency":
            assert entry["removed"] == [min(range(4), key=lambda e: (entry["routed_tokens_dense"][e], -e))]
    assert model.config.num_local_experts == 3


def test_a_resumed_run_that_removes_experts_gives_the_uninterrupted_bits(monkeypatch, tmp_path, tiny_moe_dir,
                                                                         tiny_data_dir):
    from zpruner.checkpoint import WorkDir
    from zpruner.cli import main
    from test_offload import _kill_after

    model_dir = tiny_moe_dir("qwen3_moe")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    options = ["--offload", "disk", "--prune-experts", "0.5", "--method", "sparsegpt"]
    assert main(quick(model_dir, tiny_data_dir, *options, "--save", str(full))) == 0
    args = quick(model_dir, tiny_data_dir, *options, "--save", str(resumed))
    with monkeypatch.context() as m:
        m.setattr(WorkDir, "block_done", _kill_after(0, KeyboardInterrupt))
        assert main(args) == 130
    assert main(args + ["--resume"]) == 0
    assert_same_weights(full, resumed)
    config = json.loads((resumed / "config.json").read_text())
    assert {v for k, v in config.items() if k in ("num_local_experts", "num_experts")} == {2}


def _upcycle_module():
    spec = importlib.util.spec_from_file_location("upcycle", REPO / "experiments" / "upcycle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_upcycled_model_computes_the_dense_function_and_keeps_it_without_half_its_copies():
    dense = build_tiny_model("llama", VOCAB)
    upcycled = _upcycle_module().upcycle(dense, experts=4, top_k=2)
    use_eager_experts(upcycled)
    ids = samples(2, 16, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(upcycled(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
        prune(upcycled, PruneConfig(method="wanda", sparsity=0.0, prune_experts=0.5, expert_score="frequency",
                                    nsamples=4, seqlen=32), samples(), progress=False)
        assert upcycled.config.num_local_experts == 2
        torch.testing.assert_close(upcycled(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)


def test_pooled_statistics_of_identical_experts_give_the_dense_masks():
    """One block: the upcycled model's experts pruned on pooled statistics (every token, k
    times) get exactly the masks Wanda gives the dense MLP; on their own tokens they differ."""
    import conftest

    config = conftest.tiny_configs(VOCAB)["llama"]
    config.num_hidden_layers = 1
    torch.manual_seed(0)
    dense = transformers.AutoModelForCausalLM.from_config(config).eval()
    upcycle = _upcycle_module().upcycle
    x = samples()
    masks = {}
    for stats in ("pooled", "own"):
        model = upcycle(dense, experts=4, top_k=2)
        use_eager_experts(model)
        prune(model, PruneConfig(method="wanda", expert_stats=stats, nsamples=4, seqlen=32), x, progress=False)
        masks[stats] = model.model.layers[0].mlp.experts.gate_up_proj.data != 0
    prune(dense, PruneConfig(method="wanda", nsamples=4, seqlen=32), x, progress=False)
    mlp = dense.model.layers[0].mlp
    expected = torch.cat([mlp.gate_proj.weight != 0, mlp.up_proj.weight != 0])
    assert all(torch.equal(masks["pooled"][e], expected) for e in range(4))
    assert not all(torch.equal(masks["own"][e], expected) for e in range(4))


class ListMoE(torch.nn.Module):
    """A mixture of experts kept as a list of modules (older and remote code): a linear
    router, 4 LLaMA MLPs, the top 2 of a softmax, each expert called on its own tokens."""

    def __init__(self, config, experts: int = 4, top_k: int = 2):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaMLP

        self.gate = torch.nn.Linear(config.hidden_size, experts, bias=False)
        self.experts = torch.nn.ModuleList(LlamaMLP(config) for _ in range(experts))
        self.top_k = top_k

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = torch.topk(self.gate(flat).softmax(-1), self.top_k, dim=-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(chosen == e)
            if rows.numel():
                out.index_add_(0, rows, expert(flat[rows]) * weights[rows, slot, None])
        return out.reshape(x.shape)


@pytest.mark.parametrize("stats", ["own", "pooled"])
def test_experts_kept_as_a_list_of_modules(stats):
    """Found from the structure (a list beside a router), the router left alone, each
    expert's layers pruned on its own tokens, or on every token of its block."""
    model = build_tiny_model("llama", VOCAB)
    torch.manual_seed(1)
    for layer in find_blocks(model):
        layer.mlp = ListMoE(model.config)
    routers = [layer.mlp.gate.weight.clone() for layer in find_blocks(model)]
    x = samples()
    report = prune(model, PruneConfig(method="wanda", expert_stats=stats, nsamples=4, seqlen=32), x, progress=False)
    for block, router in zip(find_blocks(model), routers):
        assert [ex.name for ex in block_experts(block)] == ["mlp.experts"]
        assert torch.equal(block.mlp.gate.weight, router)
        assert "mlp.gate" not in find_matrices(block)
    for name, matrix in iter_matrices(model):
        assert ((matrix.weight == 0).sum(dim=1) == matrix.weight.shape[1] // 2).all(), name
    for entry in report.experts.values():
        assert sum(entry["tokens"]) == x.numel() * 2 and entry["stats"] == stats
    with pytest.raises(Exception, match="list of modules"):
        prune(model, PruneConfig(method="wanda", prune_experts=0.5, nsamples=4, seqlen=32), x, progress=False)


def test_the_summary_never_rounds_a_share_below_all_to_all():
    """A router is 0.02 % of a block's weights: the summary must not say the pruned matrices
    hold 100.0 % of them."""
    assert percent_below_all(0.9998) == "99.98"
    assert percent_below_all(0.99995) == "99.995"
    assert percent_below_all(0.995) == "99.5"
    assert percent_below_all(1.0) == "100.0"


@pytest.mark.parametrize("offload", ["none", "disk"])
def test_a_run_after_one_that_removed_experts_starts_from_the_whole_dense_model(tmp_path, tiny_moe_dir,
                                                                                tiny_data_dir, offload):
    """A sweep shares one workspace: after --prune-experts the next run must see all the
    experts again (the kept dense weights no longer fit the shrunk modules), and give what it
    gives alone."""
    model = ModelConfig(str(tiny_moe_dir("qwen3_moe")), device="cpu")

    def config(**options):
        return RunConfig(model, PruneConfig(method="wanda", nsamples=4, seqlen=32, **options),
                         EvalConfig(seqlen=32, windows=4), data_dir=str(tiny_data_dir), offload=offload)

    shared = Workspace(model, str(tiny_data_dir), keep_dense=True, offload_mode=offload)
    removed = run(config(prune_experts=0.5), progress=False, workspace=shared).to_dict()
    assert all(len(e["kept"]) == 2 for e in removed["experts"].values())
    after = run(config(), progress=False, workspace=shared).to_dict()
    alone = run(config(), progress=False,
                workspace=Workspace(model, str(tiny_data_dir), offload_mode=offload)).to_dict()
    assert after["perplexity"] == alone["perplexity"]
    assert after["sparsity"]["all_block_weights"] == alone["sparsity"]["all_block_weights"]
    assert all(len(e["tokens"]) == 4 for e in after["experts"].values())
