"""The method registries: a new method is one decorated function, and the CLI, the sweep,
the run key and the report pick it up; plus the layering rules that keep it that way."""
import ast
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from zpruner.cli import main
from zpruner.config import PruneConfig, RunConfig
from zpruner.errors import ZprunerError
from zpruner.registry import SCORES, UPDATES, constant, constants, method_names
from zpruner.sweep import plan, read_grid

SRC = Path(__file__).resolve().parents[1] / "src" / "zpruner"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ToyConstants:
    toy_power: float = constant(2.0, "exponent of |W| in the toy score", minimum=0.0)


def toy(W, stats, *, toy_power):
    """|W|^p · ‖x_j‖₂: Wanda's score when p = 1."""
    return W.abs().pow(toy_power) * stats.l2[None, :]


@pytest.fixture
def toy_score():
    with SCORES.registered("toy", toy, needs_activations=True, default_group="row", constants=ToyConstants):
        yield
    assert "toy" not in method_names() and "toy_power" not in constants()


def quick(model_dir, data_dir, *extra):
    return ["--model", str(model_dir), "--data-dir", str(data_dir), "--nsamples", "4", "--seqlen", "32",
            "--eval-seqlen", "32", "--eval-windows", "4", "--quiet", *extra]


def test_toy_score_runs_through_cli_sweep_and_report(toy_score, capsys, tmp_path, tiny_model_dir, tiny_data_dir):
    model_dir = tiny_model_dir("llama")
    ppl = {}
    for name, extra in (("wanda", ["--method", "wanda"]), ("toy1", ["--method", "toy", "--toy-power", "1"]),
                        ("toy3", ["--method", "toy", "--toy-power", "3"])):
        out = tmp_path / f"{name}.json"
        assert main(["prune", *quick(model_dir, tiny_data_dir), *extra, "--output-json", str(out)]) == 0
        result = json.loads(out.read_text())
        assert result["sparsity"]["overall"] == pytest.approx(0.5)
        ppl[name] = result["perplexity"]["wikitext2"]
    assert json.loads((tmp_path / "toy3.json").read_text())["config"]["prune"]["toy_power"] == 3.0
    # p = 1 is Wanda's score, so the same masks and perplexity; p = 3 chooses other weights
    assert ppl["toy1"] == pytest.approx(ppl["wanda"], rel=1e-6)
    assert ppl["toy3"] != pytest.approx(ppl["wanda"], rel=1e-4)
    capsys.readouterr()

    assert main(["prune", *quick(model_dir, tiny_data_dir), "--method", "toy", "--toy-power", "-1"]) == 2
    assert "toy_power (--toy-power) must be a finite number >= 0, got -1.0" in capsys.readouterr().err

    grid, results = tmp_path / "grid.toml", tmp_path / "r.jsonl"
    grid.write_text('methods = ["wanda", "toy"]\nseqlen = 32\nnsamples = 4\neval_seqlen = 32\neval_windows = 4\n'
                    "[[grids]]\ntoy_power = 1.0\n[[grids]]\ntoy_power = 3.0\n")
    planned = plan(read_grid(grid))
    # wanda's key ignores the toy's constant: planned once; the toy once per value
    assert sorted((c.prune.method, c.prune.toy_power) for c in planned.configs if c.prune) == [
        ("toy", 1.0), ("toy", 3.0), ("wanda", 1.0)]
    assert main(["sweep", str(grid), "--results", str(results), "--models", str(model_dir),
                 "--data-dir", str(tiny_data_dir), "--quiet"]) == 0
    swept = {(r["config"]["prune"] or {}).get("method", "dense") + str((r["config"]["prune"] or {}).get("toy_power")):
             r["perplexity"]["wikitext2"] for r in map(json.loads, results.read_text().splitlines())}
    assert swept["toy3.0"] == pytest.approx(ppl["toy3"], rel=1e-5)

    assert main(["report", str(results), "--out", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in report.splitlines()
            if line.startswith("| toy") or line.startswith("| wanda")}
    # two toys that differ in their constant are two rows, labelled by it
    assert set(rows) == {"wanda", "toy (toy_power=1.0)", "toy (toy_power=3.0)"}
    assert rows["toy (toy_power=1.0)"] == rows["wanda"]


def test_constants_reach_the_method_and_only_its_run_key():
    cvr = PruneConfig("cvr", cvr_alpha=0.5)
    assert cvr.cvr_alpha == 0.5 and cvr.to_dict()["cvr_alpha"] == 0.5
    assert set(cvr.used_constants()) == {"cvr_alpha", "cvr_eps"}
    wanda = PruneConfig("wanda", cvr_alpha=0.5)
    assert wanda.identity() == PruneConfig("wanda").identity()
    assert PruneConfig("wanda", update="ec", ec_clamp=[0.5, 2]).ec_clamp == (0.5, 2.0)
    assert set(PruneConfig("wanda", update="sparsegpt").used_constants()) == {"blocksize", "damp"}
    with pytest.raises(ZprunerError, match="neither a pruning option nor a registered method's constant"):
        PruneConfig("wanda", cvr_alfa=0.5)
    with pytest.raises(ZprunerError, match=r"cvr_eps \(--cvr-eps\) must be a finite number >= 0"):
        PruneConfig("cvr", cvr_eps=float("nan"))
    with pytest.raises(ZprunerError, match="EC clamp range 1.1,2.0 is invalid"):
        PruneConfig("wanda", ec_clamp=(1.1, 2.0))


def test_registry_refuses_ambiguous_registrations():
    with pytest.raises(ValueError, match="already registered"):
        SCORES.register("wanda", default_group="row")(toy)
    with pytest.raises(ValueError, match="already registered"):  # a score may not shadow a solver
        SCORES.register("sparsegpt", default_group="row")(toy)

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Clash:
        cvr_alpha: float = constant(3.0, "another meaning")

    with pytest.raises(ValueError, match="constant 'cvr_alpha' is already defined differently"):
        UPDATES.register("clash", constants=Clash)(lambda *a, **k: None)

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Plain:
        x: float = 1.0

    with pytest.raises(TypeError, match="registry.constant"):
        UPDATES.register("plain", constants=Plain)(lambda *a, **k: None)
    with pytest.raises(ValueError, match="default_group"):
        SCORES.register("nogroup")(toy)
    assert not {"clash", "plain"} & set(UPDATES) and "nogroup" not in SCORES


def test_run_config_from_options():
    quick = RunConfig.from_options("quick", method="ria", ria_exponent=0.25, seqlen=256)
    assert (quick.prune.nsamples, quick.prune.seqlen, quick.prune.ria_exponent) == (64, 256, 0.25)
    assert (quick.eval.seqlen, quick.eval.windows, quick.protocol) == (512, 64, "quick")
    # None means "not given": the dataclass default wins
    default = RunConfig.from_options(method=None, eval_batch_size=None, model=None)
    assert (default.prune.method, default.eval.batch_size, default.model.name) == ("wanda", 1, "smollm2-135m")
    dense = RunConfig.from_options("quick", prune=False, method="cvr", tasks="arc_easy", limit=5)
    assert dense.prune is None and dense.zero_shot.limit == 5 and dense.zero_shot.tasks == ["arc_easy"]
    assert RunConfig.from_options(no_eval=True).eval is None
    with pytest.raises(ZprunerError, match="unknown option"):
        RunConfig.from_options(methd="wanda")
    with pytest.raises(ZprunerError, match="add --tasks"):
        RunConfig.from_options(limit=3)


def _module_imports(path: Path) -> tuple[set[str], list[int]]:
    """zpruner modules ``path`` imports (at module level or inside functions), and the lines
    of its imports of zpruner modules inside functions."""
    tree = ast.parse(path.read_text())
    package = path.parent.relative_to(SRC.parent).as_posix().replace("/", ".")
    top, late = set(), []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            names = [f"{base}.{node.module}"] if node.module else [f"{base}.{a.name}" for a in node.names]
        else:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
        names = [n for n in names if n.split(".")[0] == "zpruner"]
        top.update(names)  # a late import is an edge too: it cannot hide a cycle
        if node.col_offset != 0 and names:
            late.append(node.lineno)
    return top, late


def test_no_import_cycle_no_late_import_no_long_module():
    modules = {p: ".".join(p.relative_to(SRC.parent).with_suffix("").parts) for p in SRC.rglob("*.py")}
    names = {name.removesuffix(".__init__") for name in modules.values()}
    graph = {}
    for path, name in modules.items():
        imports, late = _module_imports(path)
        # 'from . import scores' names a module; 'from .x import f' names module x
        graph[name.removesuffix(".__init__")] = {n if n in names else n.rsplit(".", 1)[0] for n in imports} & names
        # every internal import at the top (the package's lazy names and the registry's
        # built-ins are imported by name, importlib, which is no import statement)
        assert not late, f"late imports in {path.name} at lines {late}"
        assert len(path.read_text().splitlines()) <= 400, f"{path.name} is over 400 lines"
    graph.pop("zpruner")  # the package imports everything; its modules never import it

    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            assert nxt != "zpruner", f"{node} imports the package itself"
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_the_listing_order_does_not_depend_on_what_was_imported_first():
    """Importing zpruner.admm before the first lookup registers ADMM first; the help texts,
    errors and constants must still list the built-ins in one order."""
    code = ("import sys, zpruner.{} as m, zpruner.registry as r; "
            "print(r.method_names(), r.update_names(), list(r.constants()))")
    outs = {subprocess.run([sys.executable, "-c", code.format(first)], capture_output=True, text=True,
                           check=True).stdout for first in ("admm", "sparsegpt", "registry")}
    assert len(outs) == 1
    assert "'sparsegpt', 'admm']" in outs.pop()
