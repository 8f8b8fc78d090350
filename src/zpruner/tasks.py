"""The zero-shot tasks zpruner knows, by name, and how each one runs (lm-eval's built-in
config, its local copy under ``DATA_DIR/tasks``, the metric averaged); torch-free, so that a
configuration can name tasks without loading lm-eval (``zpruner.zeroshot`` runs them)."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .errors import ZprunerError


@dataclass(frozen=True)
class TaskSpec:
    """How one task runs. ``builtin``: lm-eval's YAML (relative to ``lm_eval/tasks``);
    ``local``: its file under ``DATA_DIR/tasks`` (None: hub only), holding lm-eval's
    evaluation ``split``; ``fields``: config keys that map the local records onto the
    standard prompt; ``metric``: the one averaged (lm-eval's ``acc`` everywhere, as in
    Wanda's zero-shot tables; ``acc_norm`` is reported too where the task defines it)."""

    builtin: str
    local: str | None = None
    split: str = "validation"
    fields: Mapping[str, Any] = field(default_factory=dict)
    metric: str = "acc"


def _fields(**keys: Any) -> Mapping[str, Any]:
    return MappingProxyType(keys)


# {"query", "choices", "gold"} records: the answer is choices[gold].
_QUERY_CHOICES = dict(doc_to_target="gold", doc_to_choice="choices")

TASKS: dict[str, TaskSpec] = {
    # query = "Question: {question}": lm-eval's prompt is "Question: {question}\nAnswer:".
    "arc_easy": TaskSpec("arc/arc_easy.yaml", "arc_easy/arc_easy.jsonl", "test",
                         _fields(doc_to_text="{{query}}\nAnswer:", **_QUERY_CHOICES)),
    "arc_challenge": TaskSpec("arc/arc_challenge.yaml", "arc_challenge/arc_challenge.jsonl", "test",
                              _fields(doc_to_text="{{query}}\nAnswer:", **_QUERY_CHOICES)),
    # query = "Passage: {passage}\nQuestion: {question}?"; lm-eval's prompt has no "Passage: ".
    "boolq": TaskSpec("super_glue/boolq/default.yaml", "boolq/boolq.jsonl", "validation",
                      _fields(doc_to_text='{{query | replace("Passage: ", "", 1)}}\nAnswer:', **_QUERY_CHOICES)),
    # The original fields: lm-eval's own process_docs builds the prompt.
    "hellaswag": TaskSpec("hellaswag/hellaswag.yaml", "hellaswag/hellaswag.validation.subset1000.jsonl"),
    # Partial scoring, as lm-eval does it: one context per option, the same continuation.
    "winogrande": TaskSpec("winogrande/default.yaml", "winogrande/winogrande.jsonl", "validation",
                           _fields(doc_to_text="gold", doc_to_target="continuation",
                                   doc_to_choice="context_options")),
    # query = the question stem, which is lm-eval's whole prompt.
    "openbookqa": TaskSpec("openbookqa/openbookqa.yaml", "openbookqa/openbookqa.jsonl", "test",
                           _fields(doc_to_text="query", **_QUERY_CHOICES)),
    # query = "Question: {goal}\n": lm-eval's prompt is "Question: {goal}\nAnswer:".
    "piqa": TaskSpec("piqa/piqa.yaml", "piqa/piqa.jsonl", "validation",
                     _fields(doc_to_text="{{query}}Answer:", **_QUERY_CHOICES)),
    # GLUE's own columns (sentence1, sentence2, label): nothing to map.
    "rte": TaskSpec("glue/rte/default.yaml", "rte/rte.validation.parquet"),
    "mnli": TaskSpec("glue/mnli/default.yaml"),
    "wnli": TaskSpec("glue/wnli/default.yaml"),
}
# The statistical-correction paper's set (BoolQ, RTE, HellaSwag, WinoGrande, ARC-e, ARC-c, OBQA).
TASK_SETS = {"paper": ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")}


def parse_tasks(tasks: str | Iterable[str]) -> tuple[str, ...]:
    """'arc_easy,paper' or a list of names -> known task names, sets expanded, in order, once each."""
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names: list[str] = []
    for item in filter(None, (str(i).strip().lower() for i in items)):
        expanded = TASK_SETS.get(item, (item,))
        for name in expanded:
            if name not in TASKS:
                raise ZprunerError(
                    f"task '{item}' is unknown; choose from {', '.join(TASKS)} or the set "
                    f"{', '.join(TASK_SETS)} ({','.join(TASK_SETS['paper'])})"
                )
            if name not in names:
                names.append(name)
    if not names:
        raise ZprunerError("no task given; e.g. --tasks arc_easy,boolq or --tasks paper")
    return tuple(names)
