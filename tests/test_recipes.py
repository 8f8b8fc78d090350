"""``--recipe recommended``: the advised options per pattern, explicit options winning, the
choice recorded in the results."""
import json

import pytest

from test_offload import quick
from zpruner.cli import main
from zpruner.config import RunConfig
from zpruner.errors import ZprunerError
from zpruner.recipes import apply_recipe
from zpruner.results import run_key


def run_config(recipe, protocol, **options):
    return RunConfig.from_options(protocol, recipe=recipe, **options)


@pytest.mark.parametrize("pattern,sparsity,select,allocation", [("unstructured", None, "heldout", "uniform"),
                                                               ("unstructured", 0.5, "heldout", "uniform"),
                                                               ("unstructured", 0.69, "heldout", "uniform"),
                                                               ("unstructured", 0.7, "none", "owl"),
                                                               ("unstructured", 0.8, "none", "owl"),
                                                               ("2:4", None, "heldout", "uniform"),
                                                               ("4:8", None, "heldout", "uniform")])
def test_the_recommended_options_per_pattern(pattern, sparsity, select, allocation):
    config = run_config("recommended", "quick", pattern=pattern, sparsity=sparsity)
    p = config.prune
    assert (p.method, p.update, p.select, p.allocation) == ("admm", "none", select, allocation)
    assert p.group == (None if ":" in pattern else "row")
    assert config.recipe["name"] == "recommended" and config.recipe["overridden_by_options"] == {}
    # the same options typed out are the same run
    typed = RunConfig.from_options("quick", pattern=pattern, sparsity=sparsity, method="admm", select=select,
                                   allocation=allocation, group=p.group)
    assert run_key(typed) == run_key(config)


def test_explicit_options_win_and_are_recorded():
    config = run_config("recommended", "quick", method="sparsegpt", allocation="uniform", sparsity=0.7)
    p = config.prune
    assert (p.method, p.update, p.select, p.allocation) == ("sparsegpt", "none", "none", "uniform")
    assert config.recipe["overridden_by_options"] == {"method": "sparsegpt", "allocation": "uniform"}
    config = run_config("recommended", "quick", select="heldout", sparsity=0.7)
    assert (config.prune.select, config.prune.allocation) == ("heldout", "owl")
    assert config.recipe["overridden_by_options"] == {"select": "heldout"}
    # a score method given: its mask gets the recipe's reconstruction (the ADMM update)
    config = run_config("recommended", "quick", method="wanda")
    assert (config.prune.method, config.prune.update, config.prune.select) == ("wanda", "admm", "heldout")
    assert config.prune.group is None  # Wanda's own comparison group
    assert config.recipe["overridden_by_options"] == {"method": "wanda"}
    # streamed from disk: no generated text, calibration windows held out instead
    config = run_config("recommended", "quick", offload="disk")
    assert config.prune.heldout_texts == 0 and config.recipe["chose"]["heldout_texts"] == 0
    # ... and at 70 %, where the recipe holds nothing out, nothing is said about held-out text
    config = run_config("recommended", "quick", offload="disk", sparsity=0.7)
    assert config.prune.select == "none" and "heldout_texts" not in config.recipe["chose"]
    with pytest.raises(ZprunerError, match="recipe 'best' is unknown"):
        apply_recipe("best", {})
    # an explicit option that makes the recipe's selection impossible is refused with its reason
    with pytest.raises(ZprunerError, match="chooses how strongly a reconstruction"):
        run_config("recommended", "quick", method="wanda", update="ec")


def test_the_cli_records_what_the_recipe_chose(tmp_path, tiny_model_dir, tiny_data_dir, capsys):
    out = tmp_path / "r.json"
    assert main(quick(tiny_model_dir("llama"), tiny_data_dir, "--recipe", "recommended", "--nsamples", "8",
                      "--output-json", str(out))) == 0
    assert "recipe      recommended: method admm" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["config"]["recipe"]["chose"]["select"] == "heldout"
    assert result["config"]["prune"]["method"] == "admm" and result["config"]["prune"]["select"] == "heldout"
    assert result["selection"]
