"""Zero-shot accuracy through lm-evaluation-harness: local task files give lm-eval's standard
prompts, the CLI reports every task, the pruned model in memory is the one measured, and bad
or unavailable tasks give one clear line."""
import copy
import json
import random
import shutil

import pytest
import yaml

from conftest import random_text
from zpruner import PruneConfig, ZeroShotConfig, ZprunerError, evaluate_tasks, measure_sparsity, prune
from zpruner.cli import main
from zpruner.zeroshot import TASK_SETS, TASKS, LoadedTasks, load_tasks, parse_tasks, summarise, task_config

LOCAL_TASKS = [name for name, spec in TASKS.items() if spec.local]


def sentence(rng: random.Random, words: int = 8) -> str:
    return random_text(rng, words).rstrip(".")


def item_pair(task: str, rng: random.Random) -> tuple[dict, dict]:
    """One synthetic item in the hub's fields and in the local layout (docs/data.md)."""
    choices = [sentence(rng, 3) for _ in range(4)]
    gold = rng.randrange(4)
    labels = ["A", "B", "C", "D"]
    question = sentence(rng) + "?"
    if task in ("arc_easy", "arc_challenge", "openbookqa"):
        key = "question_stem" if task == "openbookqa" else "question"
        hub = {key: question, "choices": {"text": choices, "label": labels}, "answerKey": labels[gold]}
        query = question if task == "openbookqa" else f"Question: {question}"
        return hub, {"query": query, "choices": choices, "gold": gold}
    if task == "boolq":
        passage, label = sentence(rng, 30) + ".", gold % 2
        hub = {"passage": passage, "question": question[:-1], "label": label}
        return hub, {"query": f"Passage: {passage}\nQuestion: {question}", "choices": ["no", "yes"], "gold": label}
    if task == "piqa":
        hub = {"goal": question, "sol1": choices[0], "sol2": choices[1], "label": gold % 2}
        return hub, {"query": f"Question: {question}\n", "choices": choices[:2], "gold": gold % 2}
    if task == "winogrande":
        before, after = sentence(rng, 6), sentence(rng, 4) + "."
        hub = {"sentence": f"{before} _ {after}", "option1": choices[0], "option2": choices[1],
               "answer": str(gold % 2 + 1)}
        local = {"context_options": [f"{before} {c}" for c in choices[:2]], "continuation": after, "gold": gold % 2}
        return hub, local
    if task == "hellaswag":  # the local file keeps the original fields
        record = {"activity_label": sentence(rng, 2), "ctx_a": sentence(rng) + ".", "ctx_b": sentence(rng, 3),
                  "endings": choices, "label": gold}
        record["ctx"] = record["ctx_a"] + " " + record["ctx_b"]
        return record, record
    if task == "rte":  # GLUE's own columns
        record = {"sentence1": sentence(rng, 12) + ".", "sentence2": sentence(rng) + ".", "label": gold % 2, "idx": 0}
        return record, record
    raise AssertionError(task)


def write_records(path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        import datasets

        datasets.Dataset.from_list(records).to_parquet(str(path))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture(scope="module")
def task_items():
    rng = random.Random(3)
    return {task: [item_pair(task, rng) for _ in range(6)] for task in LOCAL_TASKS}


@pytest.fixture(scope="module")
def task_data_dir(tmp_path_factory, tiny_data_dir, task_items):
    """tiny_data_dir plus a tasks/ folder holding every local task in the shared/data layout."""
    root = tmp_path_factory.mktemp("task-data") / "data"
    shutil.copytree(tiny_data_dir, root)
    for task, pairs in task_items.items():
        write_records(root / "tasks" / TASKS[task].local, [local for _, local in pairs])
    return root


def standard_task(task: str, hub_records: list[dict], folder):
    """lm-eval's built-in task, unchanged but for reading ``hub_records`` from a local file."""
    from lm_eval.tasks import TaskManager

    spec = TASKS[task]
    data = folder / f"{task}-hub.jsonl"
    write_records(data, hub_records)
    config = {**task_config(task, None), "task": f"{task}_standard", "dataset_path": "json",
              "dataset_kwargs": {"data_files": {spec.split: str(data)}}, "dataset_name": None,
              "training_split": None, "validation_split": None, "test_split": None}
    config["test_split" if spec.split == "test" else "validation_split"] = spec.split
    (folder / f"{task}_standard.yaml").write_text(yaml.safe_dump(config))
    return TaskManager(include_path=str(folder), include_defaults=False).load([f"{task}_standard"])["tasks"][
        f"{task}_standard"]


@pytest.mark.parametrize("task", LOCAL_TASKS)
def test_local_files_give_lm_eval_standard_prompts(task, task_data_dir, task_items, tmp_path):
    local = load_tasks([task], task_data_dir).tasks[task]
    standard = standard_task(task, [hub for hub, _ in task_items[task]], tmp_path)
    assert len(local.eval_docs) == len(standard.eval_docs) == 6
    assert local.config.num_fewshot == 0
    assert local.config.metric_list == standard.config.metric_list
    for ours, theirs in zip(local.eval_docs, standard.eval_docs):
        assert local.doc_to_text(ours) == standard.doc_to_text(theirs)
        assert local.doc_to_choice(ours) == standard.doc_to_choice(theirs)
        assert local.doc_to_target(ours) == standard.doc_to_target(theirs)
        # the requests lm-eval scores, context and continuation, are the same strings
        ours_req = local.construct_requests(ours, local.fewshot_context(doc=ours, num_fewshot=0))
        theirs_req = standard.construct_requests(theirs, standard.fewshot_context(doc=theirs, num_fewshot=0))
        assert [r.args for r in ours_req] == [r.args for r in theirs_req]


def test_task_names_and_sets():
    assert parse_tasks("paper") == TASK_SETS["paper"]
    assert parse_tasks(" ARC_easy,paper,arc_easy ") == ("arc_easy", *[t for t in TASK_SETS["paper"] if t != "arc_easy"])
    assert ZeroShotConfig("piqa,boolq", 4).tasks == ["piqa", "boolq"]
    for bad, message in (("arc_easy,bogus", "task 'bogus' is unknown"), (",", "no task given")):
        with pytest.raises(ZprunerError, match=message):
            parse_tasks(bad)
    with pytest.raises(ZprunerError, match=r"limit \(--limit\) must be an integer >= 1"):
        ZeroShotConfig("piqa", limit=0)


def test_summary_averages_each_task_metric_and_keeps_missing_stderr_empty():
    output = {"results": {"a": {"acc,none": 0.5, "acc_stderr,none": "N/A"},
                          "b": {"acc,none": 0.25, "acc_stderr,none": 0.1, "acc_norm,none": 0.75}},
              "n-samples": {"a": {"effective": 1}, "b": {"effective": 4}}}
    loaded = LoadedTasks({"a": None, "b": None}, {"a": "x", "b": "y"}, {"mnli": "why"})
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(TASKS, "a", TASKS["boolq"])
        mp.setitem(TASKS, "b", TASKS["arc_easy"])
        summary = summarise(output, loaded)
    assert summary["a"] == {"acc": 0.5, "acc_stderr": None, "acc_norm": None, "acc_norm_stderr": None,
                            "n": 1, "metric": "acc", "source": "x"}
    assert summary["b"]["acc_norm"] == 0.75
    assert summary["average"] == pytest.approx(0.375)
    assert summary["skipped"] == {"mnli": "why"}


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_two_local_tasks(capsys, tmp_path, tiny_model_dir, task_data_dir):
    out = tmp_path / "r.json"
    code, stdout, err = run_cli(capsys, "eval", "--model", tiny_model_dir("llama"), "--data-dir", task_data_dir,
                                "--tasks", "arc_easy,winogrande,mnli", "--limit", 4, "--no-eval", "--quiet",
                                "--output-json", out)
    assert code == 0, err
    results = json.loads(out.read_text())
    zero_shot = results["zero_shot"]
    assert set(zero_shot) == {"arc_easy", "winogrande", "average", "skipped"}
    for task in ("arc_easy", "winogrande"):
        entry = zero_shot[task]
        assert set(entry) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n", "metric", "source"}
        assert 0.0 <= entry["acc"] <= 1.0 and entry["acc_stderr"] >= 0.0
        assert entry["n"] == 4 and entry["metric"] == "acc"
        assert entry["source"] == str(task_data_dir / "tasks" / TASKS[task].local)
    assert 0.0 <= zero_shot["arc_easy"]["acc_norm"] <= 1.0
    assert zero_shot["winogrande"]["acc_norm"] is None  # lm-eval's winogrande has acc only
    assert zero_shot["average"] == pytest.approx((zero_shot["arc_easy"]["acc"] + zero_shot["winogrande"]["acc"]) / 2)
    assert "no local copy" in zero_shot["skipped"]["mnli"]
    assert "zero-shot task mnli skipped: no local copy" in err
    assert "Running loglikelihood" not in err and "Tokenizing inputs" not in err  # --quiet: no bars
    assert results["config"]["zero_shot"] == {"tasks": ["arc_easy", "winogrande", "mnli"], "limit": 4, "batch_size": 8}
    assert "perplexity" not in results and results["timings_s"]["zero_shot"] > 0
    assert "lm_eval" in results["versions"]
    table = stdout[stdout.index("zero-shot"):]
    for text in ("arc_easy", "winogrande", "average", "skipped mnli"):
        assert text in table


def test_the_pruned_model_in_memory_is_the_one_measured(capsys, tmp_path, tiny_model_dir, task_data_dir,
                                                        monkeypatch):
    import zpruner.runner

    measured, real_run_tasks = [], zpruner.runner.run_tasks

    def spy(model, *args, **kwargs):  # records the sparsity of the model handed to lm-eval
        measured.append(measure_sparsity(model)["overall"])
        return real_run_tasks(model, *args, **kwargs)

    monkeypatch.setattr(zpruner.runner, "run_tasks", spy)
    first, second, save = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "pruned"
    tasks = ["--tasks", "arc_easy,boolq,hellaswag,rte", "--limit", 6, "--quiet", "--data-dir", task_data_dir]
    code, stdout, err = run_cli(capsys, "prune", "--model", tiny_model_dir("qwen2"), "--method", "magnitude",
                                "--sparsity", 0.9, "--seqlen", 32, "--dense-baseline", "--no-eval", "--save", save,
                                "--output-json", first, *tasks)
    assert code == 0, err
    assert measured == [0.0, pytest.approx(0.9, abs=1e-3)]  # dense first, then the pruned model, not a reload
    assert stdout[stdout.index("zero-shot"):].splitlines()[0].split()[-3:] == ["dense", "pruned", "n"]
    code, _, err = run_cli(capsys, "eval", "--model", save, "--no-eval", "--output-json", second, *tasks)
    assert code == 0, err
    pruned, reloaded = json.loads(first.read_text()), json.loads(second.read_text())
    assert set(pruned["dense_zero_shot"]) == set(pruned["zero_shot"]) == {"arc_easy", "boolq", "hellaswag", "rte",
                                                                          "average", "skipped"}
    assert reloaded["zero_shot"] == pruned["zero_shot"]  # the saved pruned model scores the same


def test_evaluate_tasks_leaves_the_model_and_tokenizer_as_they_were(tiny_model_dir, task_data_dir):
    import transformers

    path = tiny_model_dir("llama")
    model = transformers.AutoModelForCausalLM.from_pretrained(path).train()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = None  # HFLM would set one on the tokenizer it is given
    state = copy.deepcopy(model.state_dict())
    first = evaluate_tasks(model, tokenizer, "piqa,openbookqa", task_data_dir, limit=3, batch_size=2, progress=False)
    assert model.training and tokenizer.pad_token is None
    assert all((state[k] == v).all() for k, v in model.state_dict().items())
    assert first["piqa"]["n"] == first["openbookqa"]["n"] == 3
    assert evaluate_tasks(model, tokenizer, ["piqa", "openbookqa"], task_data_dir, limit=3, batch_size=3,
                          progress=False) == first  # batching does not change the answer


def _expect_one_error_line(capsys, argv, message):
    code = main([str(a) for a in argv])
    _, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("extra,message", [
    (["--tasks", "arc_easy,hellaswag2"], "task 'hellaswag2' is unknown; choose from arc_easy"),
    (["--limit", "5"], "add --tasks"),
    (["--tasks", "mnli,wnli"], "none of the zero-shot tasks can run with this data directory (mnli: no local copy"),
])
def test_bad_tasks_are_refused_before_the_model_is_read(capsys, tmp_path, task_data_dir, extra, message):
    # the model does not exist: reaching it would give another error
    _expect_one_error_line(capsys, ["eval", "--model", tmp_path / "no-model", "--data-dir", task_data_dir,
                                    "--output-json", tmp_path / "r.json", *extra], message)
    assert not (tmp_path / "r.json").exists()


def test_task_missing_from_the_data_directory(capsys, tmp_path, tiny_data_dir):
    _expect_one_error_line(capsys, ["eval", "--model", tmp_path / "no-model", "--data-dir", tiny_data_dir,
                                    "--tasks", "piqa"], f"{tiny_data_dir} has no tasks/piqa/piqa.jsonl")


def test_unreadable_task_file(capsys, tmp_path, task_data_dir):
    broken = tmp_path / "data"
    shutil.copytree(task_data_dir, broken)
    (broken / "tasks" / TASKS["piqa"].local).write_text('{"query": "Question: x\\n", "choices": ["a", "b"]\nnot json\n')
    _expect_one_error_line(capsys, ["eval", "--model", tmp_path / "no-model", "--data-dir", broken, "--tasks", "piqa"],
                           f"could not load zero-shot task piqa from {broken / 'tasks' / TASKS['piqa'].local}")


def test_hub_tasks_without_the_hub_name_the_data_dir_option(capsys, tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.delenv("ZPRUNER_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    # offline for sure, whatever this machine reaches (the flags are read when the clients are imported)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    _expect_one_error_line(capsys, ["eval", "--model", tmp_path / "no-model", "--tasks", "arc_easy"],
                           "could not load zero-shot task arc_easy from the Hugging Face hub")


@pytest.mark.real_model
def test_smollm2_arc_easy_dense_above_chance_and_pruned_below_dense(smollm2, shared_data):
    model, tokenizer = smollm2
    # The first 50 items, the same every run (dense 0.46, magnitude 70 % 0.22 measured on
    # them; 0.46 and 0.21 on 100): both checks still pass by more than 0.1.
    dense = evaluate_tasks(model, tokenizer, "arc_easy", shared_data, limit=50, batch_size=16, progress=False)
    pruned_model = copy.deepcopy(model)
    prune(pruned_model, PruneConfig(method="magnitude", sparsity=0.7), None, progress=False)
    pruned = evaluate_tasks(pruned_model, tokenizer, "arc_easy", shared_data, limit=50, batch_size=16,
                            progress=False)
    assert dense["arc_easy"]["n"] == pruned["arc_easy"]["n"] == 50
    assert dense["arc_easy"]["acc"] > 0.35, dense  # 4 choices: chance is 0.25
    assert pruned["arc_easy"]["acc"] < dense["arc_easy"]["acc"] - 0.1, (dense, pruned)
