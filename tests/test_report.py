"""zpruner report: tables, grouping by protocol, dedupe, plots and input errors, on a fixed
hand-written results file (tests/data/report_results.jsonl, schema 1, as an older zpruner
wrote it). Tables are read from the report.md that write_report (``zpruner report``) writes."""
import copy
import json
import logging
from pathlib import Path

import pytest

from zpruner.errors import ZprunerError
from zpruner.report import method_label, write_report
from zpruner.results import SCHEMA_VERSION, RunResult, dedupe, load_results

FIXTURE = Path(__file__).parent / "data" / "report_results.jsonl"
PNG = b"\x89PNG"


def groups(markdown: str) -> dict[str, str]:
    """'## heading' -> its text."""
    sections = markdown.split("\n## ")[1:]
    return {s.split("\n", 1)[0]: s for s in sections}


def group(markdown: str, contains: str) -> str:
    found = [text for heading, text in groups(markdown).items() if contains in heading]
    assert len(found) == 1, (contains, list(groups(markdown)))
    return found[0]


def table(section: str, title: str) -> tuple[list[str], dict[str, list[str]], str]:
    """(header, {first cell: other cells}, protocol line) of the table under '### title...'."""
    block = section.split(f"### {title}", 1)[1].split("\n### ", 1)[0]
    lines = [line for line in block.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    protocol = next(line for line in block.splitlines() if line.startswith("Protocol:"))
    return cells[0], {row[0]: row[1:] for row in cells[2:]}, protocol


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_lines(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def report_of(folder: Path, lines: list[dict], name: str = "results") -> str:
    """report.md as ``zpruner report`` writes it for a results file holding ``lines``."""
    write_report([write_lines(folder / f"{name}.jsonl", lines)], folder / name)
    return (folder / name / "report.md").read_text()


def tables_of(markdown: str) -> str:
    """The report below its list of input files, without the marker line (its hash covers the list)."""
    return markdown.split("\n## ", 1)[1].rsplit("<!-- written by zpruner report", 1)[0]


@pytest.fixture(scope="module")
def results():
    return load_results([FIXTURE]).results


@pytest.fixture(scope="module")
def markdown(tmp_path_factory):
    out = tmp_path_factory.mktemp("fixture_report")
    write_report([FIXTURE], out)
    return (out / "report.md").read_text()


def test_method_label():
    assert method_label({"method": "wanda", "update": "none", "reallocate": False}) == "wanda"
    assert method_label({"method": "cvr", "update": "ec"}) == "cvr+ec"
    assert method_label({"method": "magnitude", "update": "sparsegpt", "reallocate": False}) == "magnitude+sparsegpt"
    assert method_label({"method": "ria", "update": "ec-col", "reallocate": True}) == "ria+ec-col+realloc"


def test_table1_cells_columns_and_seed_mean(markdown):
    header, rows, protocol = table(group(markdown, "c4 64 × 512, wikitext2 64 windows"), "Table 1")
    # the papers' Table 1: 50 % and N:M; the other unstructured sparsities are Table 4's
    assert header == ["method", "50 %", "4:8", "2:4"]
    assert list(rows) == ["dense", "magnitude", "wanda", "sparsegpt", "cvr", "cvr+ec-col", "cvr+ec"]
    assert rows["dense"] == ["29.93"] * 3
    assert rows["wanda"][2] == "195.17"  # 2:4
    assert rows["sparsegpt"] == ["61.02", "85.32", "119.70"]
    # seeds 0 and 1: 66.841 and 67.42, sample std |a - b| / sqrt(2)
    assert rows["wanda"][0] == "67.13 (2 seeds, ±0.41 std)"
    assert "calibration c4, 64 samples × 512 tokens, seeds 0, 1" in protocol
    assert "evaluation wikitext2 64 windows × 512 tokens" in protocol
    assert "preset quick" in protocol
    assert "no calibration data used by magnitude" in protocol
    # dense + 17 pruned at 50 % and N:M, the duplicate line counted once
    assert protocol.endswith("Results used: 18.")


def test_an_old_results_file_reads_unchanged(markdown):
    """The fixture was written by an older zpruner: every line round-trips through RunResult
    exactly (absent keys stay absent, order kept), and its report has the Table 1 it had."""
    lines = [line for line in FIXTURE.read_text().splitlines() if line.strip()]
    for line in lines:
        result = RunResult.from_dict(json.loads(line))
        assert result.schema_version == 1 <= SCHEMA_VERSION and not result.extra
        assert json.dumps(result.to_dict()) == line
    newer = {**json.loads(lines[1]), "written_by_a_newer_zpruner": {"x": 1}}
    assert RunResult.from_dict(newer).to_dict() == newer
    _, rows, _ = table(group(markdown, "c4 64 × 512, wikitext2 64 windows"), "Table 1")
    assert rows == {"dense": ["29.93", "29.93", "29.93"], "magnitude": ["519.77", "", ""],
                    "wanda": ["67.13 (2 seeds, ±0.41 std)", "109.22", "195.17"],
                    "sparsegpt": ["61.02", "85.32", "119.70"], "cvr": ["81.95", "153.76", "326.55"],
                    "cvr+ec-col": ["83.10", "155.40", "330.12"], "cvr+ec": ["85.51", "160.24", "345.86"]}


def test_calibration_use_comes_from_the_configuration(tmp_path, markdown):
    """Whether a result read calibration data is its configuration's to say, not guessed from
    the calibration digest being present: without digests the report is the same."""
    lines = lines_of(FIXTURE)
    for line in lines:
        line.pop("calibration_sha256_16", None)
    assert tables_of(report_of(tmp_path, lines)) == tables_of(markdown)


def test_other_eval_protocol_is_its_own_group(markdown):
    headings = list(groups(markdown))
    assert len(headings) == 4  # 3 protocol groups + calibration size
    assert headings[2].startswith("Group 3: smollm2-135m, calibration c4 64 × 512, wikitext2 32 windows")
    header, rows, protocol = table(group(markdown, "32 windows"), "Table 1")
    assert header == ["method", "50 %"]
    assert rows == {"dense": ["31.05"], "wanda": ["70.11"]}
    assert "32 windows × 512 tokens" in protocol and "Results used: 1." in protocol
    assert "70.11" not in group(markdown, "c4 64 × 512, wikitext2 64 windows")
    # nsamples 128 is another calibration protocol: its own Table 1, dense shared (same evaluation)
    _, rows, protocol = table(group(markdown, "c4 128 × 512"), "Table 1")
    # magnitude reads no calibration data: the sweep ran it once, it belongs to both sizes
    assert rows == {"dense": ["29.93"], "magnitude": ["519.77"], "wanda": ["65.90"], "cvr+ec": ["84.02"]}
    assert "calibration c4, 128 samples × 512 tokens, seed 0; no calibration data used by magnitude" in protocol


def test_ablation_rows_in_paper_order(markdown):
    header, rows, _ = table(group(markdown, "c4 64 × 512, wikitext2 64 windows"), "Table 5")
    assert list(rows) == ["dense", "Wanda", "+ CVR score", "+ EC along columns", "+ EC along rows (full CVR+EC)"]
    assert header == ["method", "50 %", "4:8", "2:4"]
    assert rows["+ EC along columns"][1:] == ["155.40", "330.12"]


def test_ablation_needs_wanda_and_the_cvr_score(tmp_path):
    lines = [line for line in lines_of(FIXTURE)
             if line["config"]["prune"] is None or line["config"]["prune"]["method"] == "sparsegpt"
             or line["run_key"] == "wanda-none-2:4"]
    assert "Table 5" not in report_of(tmp_path, lines, "a")
    # Wanda and full CVR+EC without the CVR-score step are Table 1 rows, not an ablation
    with_ec = next(line for line in lines_of(FIXTURE) if line["config"]["prune"] and
                   line["config"]["prune"]["method"] == "cvr" and line["config"]["prune"]["update"] == "ec"
                   and line["config"]["prune"]["pattern"] == "2:4")
    assert "Table 5" not in report_of(tmp_path, [*lines, with_ec], "b")
    lines.append(next(line for line in lines_of(FIXTURE) if line["run_key"] == "cvr-none-2:4"))
    assert "Table 5" in report_of(tmp_path, lines, "c")


def test_sparsity_table_only_with_two_sparsities(markdown):
    header, rows, _ = table(group(markdown, "c4 64 × 512, wikitext2 64 windows"), "Table 4")
    assert header == ["method", "30 %", "50 %", "60 %", "70 %"]
    assert rows["cvr+ec"] == ["40.12", "85.51", "171.04", ""]
    # a method measured at one sparsity only is Table 1's, not a sweep across sparsity
    assert list(rows) == ["dense", "wanda", "cvr+ec"]
    assert "Table 4" not in group(markdown, "c4 128 × 512")


def test_zero_shot_table(markdown):
    section = group(markdown, "c4 128 × 512")
    header, rows, protocol = table(section, "Table 2")
    assert header == ["method", "sparsity", "boolq", "arc_easy", "average"]
    assert rows == {"dense": ["—", "64.00", "60.00", "62.00"], "cvr+ec": ["50 %", "57.00", "60.00", "58.50"]}
    assert "zero-shot limit 100, 100 items per task, metric acc" in protocol
    assert "Table 2" not in group(markdown, "c4 64 × 512, wikitext2 64 windows")


def test_calibration_size_table(markdown):
    header, rows, protocol = table(group(markdown, "Calibration size"), "Perplexity by number of calibration")
    assert header == ["method", "sparsity", "64 samples", "128 samples"]
    # only the cells measured at both sizes: a single size shows no trend
    assert rows == {"dense": ["—", "29.93", "29.93"],
                    "wanda": ["50 %", "67.13 (2 seeds, ±0.41 std)", "65.90"],
                    "cvr+ec": ["50 %", "85.51", "84.02"]}
    assert "64, 128 samples × 512 tokens" in protocol and "Results used: 6." in protocol


def test_dedupe(tmp_path, results, markdown):
    assert len(results) == 27 and len(dedupe(results)) == 26  # the fixture repeats one sweep line
    dense = lines_of(FIXTURE)[0]
    dense["config"]["output_json"] = "/somewhere/else/dense.json"
    dense.pop("protocol")
    dense["config"]["protocol"] = None  # the same options given one by one
    single = tmp_path / "dense.json"
    single.write_text(json.dumps(dense, indent=2))
    twice = load_results([FIXTURE, FIXTURE, single])
    assert twice.inputs == [(str(FIXTURE), 27), (str(FIXTURE), 27), (str(single), 1)]
    assert len(dedupe(twice.results)) == 26
    write_report([FIXTURE, FIXTURE, single], tmp_path / "twice")
    text = (tmp_path / "twice" / "report.md").read_text()
    assert "from 26 distinct results (55 read" in text and tables_of(text) == tables_of(markdown)
    # another seed is another result, not a duplicate
    other_seed = copy.deepcopy(lines_of(FIXTURE)[2])
    other_seed["config"]["prune"]["seed"] = 7
    assert len(dedupe([*results, RunResult.from_dict(other_seed)])) == 27


def test_different_constants_are_not_averaged(tmp_path):
    lines = lines_of(FIXTURE)
    variant = copy.deepcopy(next(r for r in lines if r.get("run_key") == "cvr-ec-50"))
    variant["config"]["prune"]["cvr_alpha"] = 0.5
    variant["perplexity_protocol"]["value"] = 90.0
    _, rows, _ = table(group(report_of(tmp_path, [*lines, variant], "a"), "c4 64 × 512, wikitext2 64"), "Table 1")
    assert rows["cvr+ec (cvr_alpha=1.0)"][0] == "85.51"
    assert rows["cvr+ec (cvr_alpha=0.5)"][0] == "90.00"
    # a constant the method does not use (CVR's alpha for Wanda) does not make another method
    wanda = copy.deepcopy(next(r for r in lines if r.get("run_key") == "wanda-none-2:4"))
    wanda["config"]["prune"]["cvr_alpha"] = 0.5
    wanda["config"]["prune"]["ec_clamp"] = [0.5, 2.0]
    _, rows, _ = table(group(report_of(tmp_path, [*lines, wanda], "b"), "c4 64 × 512, wikitext2 64"), "Table 1")
    assert [label for label in rows if label.startswith("wanda")] == ["wanda"]
    # ... nor another configuration: it is the same run, counted once
    assert rows["wanda"][2] == "195.17"


def test_zero_shot_limits_are_separate_tables(tmp_path):
    lines = lines_of(FIXTURE)
    other = copy.deepcopy(next(r for r in lines if r.get("run_key") == "cvr-ec-50-n128"))
    other["config"]["zero_shot"]["limit"] = 50
    for task in ("boolq", "arc_easy"):
        other["zero_shot"][task]["n"] = other["dense_zero_shot"][task]["n"] = 50
    other["zero_shot"]["boolq"]["acc"] = 0.5
    section = group(report_of(tmp_path, [*lines, other]), "c4 128 × 512")
    tables = section.split("### Table 2")[1:]
    assert len(tables) == 2
    assert "zero-shot limit 100, 100 items per task" in tables[0] and "| 57.00 |" in tables[0]
    assert "zero-shot limit 50, 50 items per task" in tables[1] and "| 50.00 |" in tables[1]


def test_write_report_files(tmp_path):
    out = tmp_path / "report"
    written = write_report([str(FIXTURE)], out, title="Fixture report")
    assert written == [out / "report.md", *(out / f"ppl_by_pattern_{i}.png" for i in (1, 2, 3)),
                       out / "ppl_vs_sparsity_1.png", out / "ppl_vs_calibration.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in written)  # no temp files left
    for png in written[1:]:
        assert png.read_bytes()[:4] == PNG
    text = written[0].read_text()
    assert text.startswith("# Fixture report\n")
    assert f"`zpruner report {FIXTURE}`" in text and "from 26 distinct results (27 read" in text
    assert "![perplexity versus unstructured sparsity](ppl_vs_sparsity_1.png)" in text
    assert "![perplexity versus calibration samples](ppl_vs_calibration.png)" in text
    # the plots are linked under their own group's tables
    assert "ppl_vs_sparsity_1.png" in group(text, "Group 1:")
    assert "![perplexity by method and sparsity pattern](ppl_by_pattern_3.png)" in group(text, "Group 3:")


def test_no_plot_without_data(tmp_path):
    lines = [line for line in lines_of(FIXTURE)
             if line["config"]["prune"] is None or line["run_key"] in ("wanda-none-50", "sparsegpt-none-2:4")]
    out = tmp_path / "out"
    written = write_report([write_lines(tmp_path / "few.jsonl", lines)], out)
    # one sparsity and one calibration size: Table 1's bars only
    assert written == [out / "report.md", out / "ppl_by_pattern.png"]
    assert sorted(p.name for p in out.iterdir()) == ["ppl_by_pattern.png", "report.md"]
    text = written[0].read_text()
    assert text.count("![") == 1 and "| wanda | 66.84 |  |" in text
    # a dense model alone: nothing to plot
    dense_out = tmp_path / "dense"
    assert write_report([write_lines(tmp_path / "dense.jsonl", lines_of(FIXTURE)[:1])], dense_out) == [
        dense_out / "report.md"]


def test_dense_only_input(tmp_path):
    _, rows, protocol = table(report_of(tmp_path, lines_of(FIXTURE)[:1]), "Dense perplexity")
    assert rows == {"dense": ["29.93"]} and "calibration" not in protocol


def test_missing_file(tmp_path):
    with pytest.raises(ZprunerError, match="does not exist"):
        load_results([tmp_path / "nope.jsonl"])


def test_cut_off_line_is_skipped_with_a_notice(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("zpruner"), "propagate", True)  # the CLI turns it off
    path = tmp_path / "killed.jsonl"
    first = FIXTURE.read_text().splitlines()[0]
    path.write_text(first + "\n\n" + first[: len(first) // 2])  # a sweep killed while appending
    with caplog.at_level("WARNING", logger="zpruner"):
        assert len(load_results([path]).results) == 1
    assert "killed.jsonl: line 3 is not valid JSON" in caplog.text


def test_file_with_no_json_line_is_refused(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("{not json\nnor this\n")
    with pytest.raises(ZprunerError, match=r"bad\.jsonl line 1 is not valid JSON, nor is any other line"):
        load_results([path])


def test_result_without_config(tmp_path):
    path = write_lines(tmp_path / "odd.jsonl", [{"perplexity": {"wikitext2": 3.0}}])
    with pytest.raises(ZprunerError, match=r"odd\.jsonl line 1 is not a zpruner result \(no 'config'"):
        load_results([path])


def test_empty_input(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(ZprunerError, match="no results in"):
        load_results([empty])
    with pytest.raises(ZprunerError, match="no results in"):
        write_report([empty], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ZprunerError, match="no results"):
        load_results([])


def test_report_command_writes_next_to_the_results_by_default(capsys, tmp_path):
    from zpruner.cli import main

    results = tmp_path / "run" / "results.jsonl"
    results.parent.mkdir()
    results.write_text(FIXTURE.read_text())
    assert main(["report", str(results)]) == 0
    written = capsys.readouterr().out.split()
    assert written[0] == str(results.parent / "report.md")
    assert all(Path(p).read_bytes()[:4] == PNG for p in written[1:]) and len(written) >= 2
    assert "| wanda | 67.13 (2 seeds, ±0.41 std) | 109.22 | 195.17 |" in (results.parent / "report.md").read_text()

    assert main(["report", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "does not exist" in err
    assert not (tmp_path / "out" / "report.md").exists()


def test_perplexity_measured_again_with_zero_shot_counts_once(tmp_path):
    """The same pruning re-run with zero-shot tasks added: its zero-shot numbers make Table 2,
    its repeated perplexity does not make Table 1 a two-run mean."""
    lines = lines_of(FIXTURE)
    sweep_line = next(r for r in lines if r.get("run_key") == "wanda-none-2:4")
    again = copy.deepcopy(sweep_line)
    again["config"]["zero_shot"] = {"tasks": ["boolq"], "limit": 50, "batch_size": 8}
    again["perplexity_protocol"]["value"] = 199.0
    again["zero_shot"] = {"boolq": {"acc": 0.5, "acc_stderr": 0.07, "acc_norm": None, "acc_norm_stderr": None,
                                    "n": 50, "metric": "acc", "source": "local"},
                          "average": 0.5, "skipped": {}}
    markdown = report_of(tmp_path, [*lines, again])
    _, rows, _ = table(group(markdown, "c4 64 × 512, wikitext2 64 windows"), "Table 1")
    assert rows["wanda"][2] == "195.17"
    _, rows, protocol = table(group(markdown, "c4 64 × 512, wikitext2 64 windows"), "Table 2")
    assert rows["wanda"] == ["2:4", "50.00", "50.00"] and "zero-shot limit 50" in protocol


def test_best_configuration_and_owl_block_sparsities(tmp_path, markdown):
    _, rows, _ = table(group(markdown, "c4 64 × 512, wikitext2 64 windows"), "Best configuration per sparsity")
    assert rows["50 %"] == ["sparsegpt", "61.02", "61.02", "1.000"]
    # an OWL run: its own row label, and its block sparsities listed
    lines = lines_of(FIXTURE)
    owl = copy.deepcopy(next(r for r in lines if r.get("run_key") == "cvr-ec-50"))
    owl["config"]["prune"].update(method="wanda", update="none", allocation="owl", owl_m=5.0, owl_lambda=0.08)
    owl["perplexity_protocol"]["value"] = 55.0
    owl["run_key"] = "wanda-owl-50"
    owl["block_sparsity"] = [0.46, 0.5, 0.54]
    section = group(report_of(tmp_path, [*lines, owl], "a"), "c4 64 × 512, wikitext2 64")
    _, rows, _ = table(section, "Best configuration per sparsity")
    assert rows["50 %"] == ["wanda+owl", "55.00", "61.02", "0.901"]
    _, rows, _ = table(section, "Per-block sparsity")
    assert rows["wanda+owl"] == ["50 %", "46.0", "54.0", "46.0 50.0 54.0"]


def test_report_replaces_only_its_own_unedited_files_without_overwrite(tmp_path):
    out = tmp_path / "out"
    write_report([FIXTURE], out)
    first = (out / "report.md").read_text()
    assert first.splitlines()[-1].startswith("<!-- written by zpruner report")
    write_report([FIXTURE], out, title="again")  # its own, unedited: replaced
    assert (out / "report.md").read_text().startswith("# again\n")

    (out / "report.md").write_text((out / "report.md").read_text().replace("# again", "# my notes"))
    with pytest.raises(ZprunerError, match="report.md exists and zpruner report did not write it"):
        write_report([FIXTURE], out)
    assert (out / "report.md").read_text().startswith("# my notes\n")  # untouched
    write_report([FIXTURE], out, overwrite=True)
    assert (out / "report.md").read_text().startswith("# zpruner report\n")


@pytest.mark.parametrize("name", ["report.md", "ppl_by_pattern_1.png"])
def test_report_refuses_a_file_it_did_not_write(tmp_path, name):
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_bytes(b"the user's own")
    with pytest.raises(ZprunerError, match=f"{name} exists and zpruner report did not write it"):
        write_report([FIXTURE], out)
    assert sorted(p.name for p in out.iterdir()) == [name] and (out / name).read_bytes() == b"the user's own"
    write_report([FIXTURE], out, overwrite=True)
    assert (out / name).read_bytes() != b"the user's own"


def test_report_never_writes_through_a_link_or_into_a_pipe(tmp_path):
    import os

    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere.md"
    out.mkdir()
    elsewhere.write_text("kept")
    (out / "report.md").symlink_to(elsewhere)
    with pytest.raises(ZprunerError, match="report.md is a symbolic link"):
        write_report([FIXTURE], out, overwrite=True)
    assert elsewhere.read_text() == "kept" and (out / "report.md").is_symlink()
    (out / "report.md").unlink()
    os.mkfifo(out / "ppl_vs_calibration.png")
    with pytest.raises(ZprunerError, match="is a named pipe"):
        write_report([FIXTURE], out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["ppl_vs_calibration.png"]
