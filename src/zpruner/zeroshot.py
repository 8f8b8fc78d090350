"""Zero-shot accuracy through lm-evaluation-harness (0.4.x), measured on the model in memory.

lm-eval's own task configurations are reused (prompts, answer choices, metrics, versions):
for every requested task a small YAML that ``include``s lm-eval's built-in config is written
to a temporary folder and registered with ``TaskManager(include_path=...)``. With a data
directory (layout of shared/data) the YAML also points the task at the local file under
``DATA_DIR/tasks`` through the ``json``/``parquet`` dataset builders and maps the local record
fields onto the standard prompt; tasks with no local copy are skipped with the reason. Without
one, the tasks are lm-eval's own, loaded from the Hugging Face hub. The model is wrapped in
lm-eval's ``HFLM`` as it is in memory: a pruned model is measured pruned, never reloaded.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import tempfile
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from .data import resolve_data_dir
from .errors import ZprunerError
from .tasks import TASK_SETS, TASKS, TaskSpec, parse_tasks  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

_BUILDERS = {".jsonl": "json", ".parquet": "parquet"}


@dataclass
class TaskPlan:
    """Where each runnable task reads its data (a local file, or None for the hub), and why
    the others are skipped."""

    run: dict[str, Path | None]
    skipped: dict[str, str]


def plan_tasks(tasks: Iterable[str], data_dir: str | os.PathLike | None) -> TaskPlan:
    """With a data directory every task reads its local copy, and one without is skipped;
    without, every task comes from the hub. Raises when nothing is left to run."""
    local_root = resolve_data_dir(data_dir)
    run: dict[str, Path | None] = {}
    skipped: dict[str, str] = {}
    for name in parse_tasks(tasks):
        spec = TASKS[name]
        if local_root is None:
            run[name] = None
        elif spec.local is None:
            skipped[name] = "no local copy exists; it runs from the Hugging Face hub (without --data-dir)"
        elif not (local_root / "tasks" / spec.local).is_file():
            skipped[name] = f"data directory {local_root} has no tasks/{spec.local}"
        else:
            run[name] = local_root / "tasks" / spec.local
    if not run:
        reasons = "; ".join(f"{name}: {why}" for name, why in skipped.items())
        raise ZprunerError(f"none of the zero-shot tasks can run with this data directory ({reasons})")
    return TaskPlan(run, skipped)


def task_config(name: str, local_file: Path | None) -> dict[str, Any]:
    """The YAML content registering ``name``: lm-eval's built-in config, and for a local
    file its dataset, split and field mapping. Zero-shot: ``num_fewshot`` 0."""
    import lm_eval.tasks

    spec = TASKS[name]
    builtin = Path(lm_eval.tasks.__file__).parent / spec.builtin
    if not builtin.is_file():
        raise ZprunerError(f"the installed lm-eval has no {spec.builtin} (task {name}); install lm-eval>=0.4.5,<0.5")
    config: dict[str, Any] = {"include": str(builtin), "task": name, "num_fewshot": 0}
    if local_file is not None:
        builder = _BUILDERS.get(local_file.suffix)
        if builder is None:
            raise ZprunerError(f"{local_file}: task files must be .jsonl or .parquet")
        # The local file holds only the evaluation split: no training split to draw few-shot examples from.
        config.update(dataset_path=builder, dataset_name=None, dataset_kwargs={"data_files": {spec.split: str(local_file)}},
                      training_split=None, validation_split=None, test_split=None)
        config["test_split" if spec.split == "test" else "validation_split"] = spec.split
        config.update(spec.fields)
    return config


@dataclass
class LoadedTasks:
    """lm-eval Task objects by name, the data each reads, and the tasks skipped (with why)."""

    tasks: dict[str, Any]
    sources: dict[str, str]
    skipped: dict[str, str]


def load_tasks(tasks: Iterable[str], data_dir: str | os.PathLike | None = None) -> LoadedTasks:
    """Build lm-eval's Task objects (reading their datasets), before any model is needed."""
    import yaml

    plan = plan_tasks(tasks, data_dir)
    loaded: dict[str, Any] = {}
    sources: dict[str, str] = {}
    with _quiet_lm_eval(progress=False), tempfile.TemporaryDirectory(prefix="zpruner-tasks-") as folder:
        from lm_eval.tasks import TaskManager

        for name, local_file in plan.run.items():
            Path(folder, f"{name}.yaml").write_text(yaml.safe_dump(task_config(name, local_file), sort_keys=False))
        # Only these YAMLs are indexed (not lm-eval's ~200 task folders); they include the built-ins.
        manager = TaskManager(include_path=folder, include_defaults=False)
        for name, local_file in plan.run.items():
            try:
                loaded.update(manager.load([name])["tasks"])
            except Exception as exc:  # datasets and the hub client raise many types; all mean "unreadable"
                where = f"from {local_file}" if local_file else "from the Hugging Face hub"
                hint = ("check the file against the layout in zpruner's README, \"Data: offline and online\"" if local_file else
                        "offline, pass --data-dir (or set $ZPRUNER_DATA_DIR) to a folder with tasks/ like shared/data")
                raise ZprunerError(f"could not load zero-shot task {name} {where} ({_root_cause(exc)}); {hint}") from exc
            task = loaded[name]
            sources[name] = str(local_file) if local_file else f"hub:{task.config.dataset_path}"
    return LoadedTasks(loaded, sources, plan.skipped)


def _root_cause(exc: BaseException) -> str:
    """'Type: first line' of the innermost cause: datasets wraps the parse error that says what is wrong."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else 'no message'}"


def run_tasks(model, tokenizer, loaded: LoadedTasks, limit: int | None = None, batch_size: int = 8,
              progress: bool = True) -> dict[str, Any]:
    """Evaluate ``model`` as it is in memory on ``loaded`` tasks; the ``zero_shot`` results entry."""
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    was_training = model.training
    try:
        with _quiet_lm_eval(progress):
            # The tokenizer is copied: HFLM may set a pad token on the one it is given.
            lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
            output = evaluate(lm=lm, task_dict={"tasks": loaded.tasks, "groups": {}, "group_map": {}},
                              limit=limit, log_samples=False)
    finally:
        model.train(was_training)
    return summarise(output, loaded)


def summarise(output: dict[str, Any], loaded: LoadedTasks) -> dict[str, Any]:
    """lm-eval's results -> {task: {acc, acc_stderr, acc_norm, acc_norm_stderr, n, metric, source},
    "average": mean of each task's metric, "skipped": {task: reason}}."""
    summary: dict[str, Any] = {}
    for name in loaded.tasks:
        metrics = output["results"][name]
        entry = {key: _number(metrics.get(f"{key},none"))
                 for key in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")}
        entry.update(n=int(output["n-samples"][name]["effective"]), metric=TASKS[name].metric,
                     source=loaded.sources[name])
        summary[name] = entry
    values = [summary[name][summary[name]["metric"]] for name in loaded.tasks]
    summary["average"] = sum(values) / len(values)
    summary["skipped"] = dict(loaded.skipped)
    return summary


def _number(value: Any) -> float | None:
    """lm-eval writes "N/A" for a standard error it cannot compute (one item)."""
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def evaluate_tasks(model, tokenizer, tasks: str | Iterable[str], data_dir: str | os.PathLike | None = None,
                   limit: int | None = None, batch_size: int = 8, progress: bool = True) -> dict[str, Any]:
    """Zero-shot accuracy of ``model`` (in memory, unchanged) on ``tasks`` (names or 'paper'):
    local files from ``data_dir`` when given, else the hub. ``limit``: first N items per task."""
    return run_tasks(model, tokenizer, load_tasks(tasks, data_dir), limit, batch_size, progress)


def _silent_tqdm(*args, **kwargs):
    """tqdm that never draws, whatever ``disable`` its caller passes."""
    from tqdm.auto import tqdm

    return tqdm(*args, **{**kwargs, "disable": True})


@contextmanager
def _quiet_lm_eval(progress: bool):
    """lm-eval at ERROR (its warnings are about its own configs and the in-memory model we
    pass on purpose; $LMEVAL_LOG_LEVEL overrides), datasets silent, no dataset-building bars, no per-task
    request-building bars, and without ``progress`` no scoring bars either."""
    import datasets
    import lm_eval.api.model
    import lm_eval.api.task
    import lm_eval.models.huggingface
    from unittest import mock

    lm_eval_log = logging.getLogger("lm_eval")
    level, datasets_level = lm_eval_log.level, datasets.logging.get_verbosity()
    lm_eval_log.setLevel(os.environ.get("LMEVAL_LOG_LEVEL", "").upper() or logging.ERROR)
    datasets.logging.set_verbosity(logging.CRITICAL)  # its load errors reach the user through ours
    bars_were_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    # lm-eval draws its bars with no switch to turn them off: its modules' tqdm is swapped for this call.
    silenced = [lm_eval.api.task] + ([] if progress else [lm_eval.api.model, lm_eval.models.huggingface])
    try:
        with ExitStack() as stack:
            for module in silenced:
                if hasattr(module, "tqdm"):
                    stack.enter_context(mock.patch.object(module, "tqdm", _silent_tqdm))
            yield
    finally:
        lm_eval_log.setLevel(level)
        datasets.logging.set_verbosity(datasets_level)
        if bars_were_on:
            datasets.enable_progress_bars()
