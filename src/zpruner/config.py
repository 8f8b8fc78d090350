"""Dataclass configurations: validated on construction, serialised into every result.

The CLI is a thin layer that fills these; the Python API takes them directly.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ZprunerError

SCHEMA_VERSION = 1
DTYPES = ("auto", "float32", "bfloat16", "float16")
GROUPS = ("row", "layer")
CALIB_BATCH_TOKENS = 4096


@dataclass(frozen=True)
class Pattern:
    """Sparsity pattern. ``n``/``m`` set for N:M (n zeros in every m consecutive inputs)."""

    n: int | None = None
    m: int | None = None

    @property
    def is_nm(self) -> bool:
        return self.m is not None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"

    @classmethod
    def parse(cls, text: str) -> "Pattern":
        text = text.strip().lower()
        if text == "unstructured":
            return cls()
        parts = text.split(":")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ZprunerError(
                f"pattern '{text}' is not understood; use 'unstructured' or N:M such as 2:4 or 4:8"
            )
        n, m = int(parts[0]), int(parts[1])
        if m < 1 or not 0 < n < m:
            raise ZprunerError(
                f"pattern {n}:{m} is invalid: N (zeros per group) must satisfy 0 < N < M; e.g. 2:4"
            )
        return cls(n, m)


def check_sparsity(sparsity: float) -> None:
    if not is_number(sparsity) or math.isnan(sparsity) or not 0.0 <= sparsity < 1.0:
        raise ZprunerError(f"sparsity {sparsity!r} is out of range; give a fraction in [0, 1), e.g. 0.5")


def is_number(value) -> bool:
    """int or float, not bool (True is an int to Python, never a number to a user)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _label(name: str) -> str:
    return f"{name} (--{name.replace('_', '-')})"


def check_int(name: str, value, minimum: int | None = 1) -> None:
    """``value`` is an integer (not a bool, not a string) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise ZprunerError(f"{_label(name)} must be {bound}, got {value!r}")


def check_float(name: str, value, minimum: float | None = None, strict: bool = False) -> None:
    """``value`` is a finite number, >= ``minimum`` (> with ``strict``). NaN and infinity are
    refused everywhere: one of them in a constant silently ruins every score."""
    ok = is_number(value) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if strict else value >= minimum
    if not ok:
        bound = "" if minimum is None else f" {'>' if strict else '>='} {minimum:g}"
        raise ZprunerError(f"{_label(name)} must be a finite number{bound}, got {value!r}")


def check_str(name: str, value) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ZprunerError(f"{_label(name)} must be a non-empty text, got {value!r}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ZprunerError(f"{_label(name)} must be true or false, got {value!r}")


def check_clamp_pair(value) -> tuple[float, float]:
    """EC's clamp range as a pair of finite numbers (the range rule is updates.check_clamp's)."""
    if isinstance(value, str) or not hasattr(value, "__len__") or len(value) != 2 or not all(
            is_number(v) and math.isfinite(v) for v in value):
        raise ZprunerError(f"{_label('ec_clamp')} must be two finite numbers LO,HI such as 0.8,1.25, got {value!r}")
    return float(value[0]), float(value[1])


# Each PruneConfig field alone (combinations are PruneConfig.__post_init__'s); the sweep
# checks a grid's values with these before it builds any combination.
PRUNE_FIELD_CHECKS = {
    "method": check_str, "pattern": check_str, "group": check_str, "update": check_str, "calibration": check_str,
    "nsamples": check_int, "seqlen": check_int, "blocksize": check_int, "calib_batch_size": check_int,
    "seed": lambda n, v: check_int(n, v, minimum=None),
    "reallocate": check_bool,
    "ria_exponent": lambda n, v: check_float(n, v, 0.0),
    "cvr_alpha": lambda n, v: check_float(n, v, 0.0),
    "cvr_eps": lambda n, v: check_float(n, v, 0.0),
    "damp": lambda n, v: check_float(n, v, 0.0, strict=True),
    "ec_clamp": lambda n, v: check_clamp_pair(v),
    "sparsity": lambda n, v: check_sparsity(v),
}


def check_prune_field(name: str, value) -> None:
    """One PruneConfig field's type and range; None (the default) always passes."""
    if value is not None and name in PRUNE_FIELD_CHECKS:
        PRUNE_FIELD_CHECKS[name](name, value)


@dataclass
class PruneConfig:
    """What to prune and how, and the calibration data that drives it.

    ``pattern`` is 'unstructured' or 'N:M'. ``sparsity`` None means 0.5 for unstructured
    and N/M for N:M (where any other value is an error). ``group`` ('row' or 'layer') is the
    comparison group of unstructured masks; None takes the method's default.
    ``calibration`` is 'c4' or a path to a .txt/.jsonl file.
    ``update`` corrects the kept weights after the mask: 'none', 'ec' (column then row
    energy compensation), 'ec-col', 'ec-row', or 'sparsegpt' (reconstruct with the
    inverse Hessian, keeping the method's mask). Method 'sparsegpt' chooses its own mask
    inside the reconstruction. The remaining fields are the methods' constants; the
    defaults of ``cvr_alpha``, ``cvr_eps`` and ``ec_clamp`` come from the experiment in
    experiments/open_constants.md.
    """

    method: str = "wanda"
    sparsity: float | None = None
    pattern: str = "unstructured"
    group: str | None = None
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    calibration: str = "c4"
    update: str = "none"
    reallocate: bool = False  # RIA channel reallocation + linear-sum assignment (N:M only)
    ria_exponent: float = 0.5
    cvr_alpha: float = 1.0
    cvr_eps: float = 1e-6
    ec_clamp: tuple[float, float] = (0.8, 1.25)
    blocksize: int = 128  # SparseGPT column block
    damp: float = 0.01  # SparseGPT damping, fraction of the mean Hessian diagonal
    # Calibration samples per block forward; None = as many as make ~4096 tokens (8 x 512,
    # 2 x 2048): large enough for efficient matrix products, small enough for eager attention.
    calib_batch_size: int | None = None

    def __post_init__(self) -> None:
        # late imports: scores -> stats -> layers imports this module
        from .scores import check_method
        from .updates import check_clamp, check_update

        for f in dataclasses.fields(self):
            check_prune_field(f.name, getattr(self, f.name))
        check_method(self.method)
        check_update(self.update)
        self.ec_clamp = check_clamp_pair(self.ec_clamp)
        check_clamp(self.ec_clamp)
        if self.method == "sparsegpt":
            if self.update == "sparsegpt":
                raise ZprunerError("method sparsegpt already reconstructs; use --update none or ec")
            if self.group is not None:
                raise ZprunerError("--group does not apply to method sparsegpt: it selects per column block")
        pattern = self.parsed_pattern
        if pattern.is_nm:
            nm_sparsity = pattern.n / pattern.m
            if self.sparsity is not None and not math.isclose(self.sparsity, nm_sparsity):
                raise ZprunerError(
                    f"pattern {pattern} fixes sparsity at {nm_sparsity:g}, but sparsity {self.sparsity} "
                    "was given; drop --sparsity or make it equal N/M"
                )
            self.sparsity = nm_sparsity
        elif self.sparsity is None:
            self.sparsity = 0.5
        check_sparsity(self.sparsity)
        if self.calib_batch_size is None:
            self.calib_batch_size = max(1, CALIB_BATCH_TOKENS // self.seqlen)
        if self.group is not None and self.group not in GROUPS:
            raise ZprunerError(f"group '{self.group}' is unknown; choose one of {', '.join(GROUPS)}")
        if self.reallocate and (not pattern.is_nm or self.method == "sparsegpt"):
            raise ZprunerError("--reallocate needs an N:M --pattern and a score-based method (not sparsegpt)")

    @property
    def uses_hessian(self) -> bool:
        return "sparsegpt" in (self.method, self.update)

    @property
    def needs_calibration(self) -> bool:
        from .scores import SCORES

        # reallocation checks each permutation on a calibration sample
        return self.uses_hessian or self.reallocate or SCORES[self.method].needs_activations

    @property
    def parsed_pattern(self) -> Pattern:
        return Pattern.parse(self.pattern)

    def identity(self) -> dict[str, Any]:
        """The fields that decide this configuration's pruned weights: the constants of
        methods and updates it does not use, calibration settings of a data-free method and
        execution details (calib_batch_size) are left out, so equal results get equal keys."""
        from .scores import SCORES
        from .updates import EC_AXES

        used = {"method", "sparsity", "pattern", "group", "update", "reallocate"}
        if self.needs_calibration:
            used |= {"nsamples", "seqlen", "seed", "calibration"}
        if self.method in SCORES:
            used |= set(SCORES[self.method].options.values())
        if self.update in EC_AXES:
            used.add("ec_clamp")
        if self.uses_hessian:
            used |= {"blocksize", "damp"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k in used}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PruneConfig":
        """From a results file's ``config.prune``; fields a newer zpruner added take their defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class EvalConfig:
    """Perplexity protocol: non-overlapping windows of ``seqlen`` tokens (None = the model's
    context capped at 2048), the first ``windows`` of them (None = all)."""

    dataset: str = "wikitext2"
    seqlen: int | None = None
    windows: int | None = None
    batch_size: int = 1

    def __post_init__(self) -> None:
        check_str("eval_dataset", self.dataset)
        if self.seqlen is not None:
            check_int("eval_seqlen", self.seqlen, minimum=2)  # a window of one token predicts nothing
        if self.windows is not None:
            check_int("eval_windows", self.windows)
        check_int("eval_batch_size", self.batch_size)


@dataclass
class ZeroShotConfig:
    """Zero-shot accuracy with lm-evaluation-harness: ``tasks`` (names and/or the set 'paper',
    as a list or a comma-separated string; stored expanded), the first ``limit`` items of each
    (None = all), ``batch_size`` requests per forward."""

    tasks: list[str] = field(default_factory=lambda: ["paper"])
    limit: int | None = None
    batch_size: int = 8

    def __post_init__(self) -> None:
        from .zeroshot import parse_tasks  # late import, like PruneConfig's

        if not isinstance(self.tasks, (str, list, tuple)):
            raise ZprunerError(f"tasks (--tasks) must be task names such as arc_easy,boolq, got {self.tasks!r}")
        self.tasks = list(parse_tasks(self.tasks))
        if self.limit is not None:
            check_int("limit", self.limit)
        check_int("batch_size", self.batch_size)


@dataclass
class ModelConfig:
    """``name``: a hub id, a local directory, a .gguf file or a built-in alias."""

    name: str = "smollm2-135m"
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        check_str("model", self.name)
        check_str("device", self.device)
        check_bool("trust_remote_code", self.trust_remote_code)
        if self.dtype not in DTYPES:
            raise ZprunerError(f"dtype '{self.dtype}' is unknown; choose one of {', '.join(DTYPES)}")


@dataclass
class RunConfig:
    """Everything one ``zpruner prune`` or ``zpruner eval`` run does."""

    model: ModelConfig = field(default_factory=ModelConfig)
    prune: PruneConfig | None = None
    eval: EvalConfig | None = field(default_factory=EvalConfig)
    data_dir: str | None = None
    dense_baseline: bool = False
    save: str | None = None
    output_json: str | None = None
    zero_shot: ZeroShotConfig | None = None
    protocol: str | None = None  # the preset the options were expanded from (zpruner.protocols), for the record
    overwrite: bool = False  # let ``save`` replace a previous zpruner output (never any other folder)

    def __post_init__(self) -> None:
        from .protocols import check_protocol

        check_protocol(self.protocol)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, **dataclasses.asdict(self)}
