"""The method vocabularies: scores and solvers (``--method``) and updates (``--update``).

A method is one decorated function: ``SCORES.register``, ``SOLVERS.register`` or
``UPDATES.register``, with an optional keyword-only dataclass of its constants whose fields
are made with ``constant(...)``. Everything else is generated from the registries: the
CLI's flags (``--method``, ``--update`` and one flag per constant), the configurations'
validation, the sweep's grid settings, the run key (a result depends on the constants of
the methods it used, never on the others) and the report's labels. So a new method costs
one file, or one function in an existing one::

    @dataclass(frozen=True, kw_only=True)
    class MyConstants:
        my_power: float = constant(2.0, "exponent of |W| in my score", minimum=0.0)

    @SCORES.register("mine", needs_activations=True, default_group="row", constants=MyConstants)
    def mine(W, stats, *, my_power):
        return W.abs().pow(my_power) * stats.l2

Signatures by kind (W: [out, in] float32, keep: bool, True = kept):
- allocation: ``fn(survey, *, sparsity, pattern, **constants) -> [sparsity per block]``
  (``--allocation``), where ``survey(measure)`` runs the dense model over the calibration
  data once and returns ``measure(weights, stats)`` of every block and the blocks' sizes;
- score: ``fn(W, stats, **constants) -> S``, higher is more important;
- solver: ``fn(W, stats, *, sparsity, pattern, **constants) -> (W', keep)``, choosing its
  own mask inside a reconstruction;
- update: ``fn(W0, W, keep, stats, **constants) -> W'``, where W0 is the dense layer and W
  the pruned one, or None for W0 masked by keep (the update may then build it cheaper);
  every update returns exactly keep's zeros;
- selection: ``fn(W0, split, families, **constants) -> (W', keep, record)``
  (``--select``): how strongly a reconstruction is applied to one matrix, decided on
  data it was not fitted on (zpruner.heldout); ``families[name](stats, factor)`` is a
  reconstruction with its mask ('configured': the configuration's own) fitted on
  ``stats`` with its ridge constant (``ridge`` below) multiplied by ``factor``.
Constants are passed under their field names, or under ``constant(keyword=...)``.

A registered function is the method's formula, written to be read. A faster version of it
(chunked passes, compiled loops: ``zpruner.kernels``) is attached with
``Registry.accelerate(name, applies=...)`` and runs in its place wherever ``applies`` holds
for the arguments of the call (always when applies is None); it must give the formula's
result, bit for bit or within a tolerance its docstring states, and tests hold it to that.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .checks import check_float, check_int, check_pair
from .errors import ZprunerError

KINDS = ("score", "solver", "update", "allocation", "selection")


def constant(default, help: str, *, minimum: float | None = None, strict: bool = False,
             check: Callable[[Any], None] | None = None, keyword: str | None = None) -> Any:
    """A field of a method's constants dataclass. Its type follows ``default``: an int is an
    integer option (``minimum`` defaults to 1), a float a finite number (>= ``minimum``, or >
    with ``strict``), a pair of numbers a range LO,HI. ``check(value)`` adds a rule of the
    method's own (raise ZprunerError); ``keyword`` is the function's argument name when it
    differs from the field's (a config-wide name such as ``ria_exponent`` for ``a``)."""
    if isinstance(default, bool) or not isinstance(default, (int, float, tuple)):
        raise TypeError(f"constant default {default!r}: use an int, a float or a pair of floats")
    kind = "range" if isinstance(default, tuple) else type(default).__name__
    if kind == "int" and minimum is None:
        minimum = 1
    meta = {"help": help, "kind": kind, "minimum": minimum, "strict": strict, "check": check, "keyword": keyword}
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class Constant:
    """One constant as every method that uses it sees it (its owners share one definition)."""

    name: str
    default: Any
    help: str
    kind: str  # 'int', 'float' or 'range'
    minimum: float | None
    strict: bool
    check: Callable[[Any], None] | None
    owners: tuple[str, ...]  # "kind name" of each method that uses it

    def validate(self, value) -> Any:
        """``value`` checked, as stored (a range becomes a tuple of floats)."""
        if self.kind == "int":
            check_int(self.name, value, minimum=None if self.minimum is None else int(self.minimum))
        elif self.kind == "float":
            check_float(self.name, value, self.minimum, self.strict)
            value = float(value)  # 1 and 1.0 are one constant, and one run key
        else:
            value = check_pair(self.name, value)
        if self.check is not None:
            self.check(value)
        return value


@dataclass(frozen=True)
class Method:
    """A registered score, solver or update."""

    kind: str
    name: str
    fn: Callable
    constants: type | None = None
    needs_activations: bool = False  # reads the calibration inputs' statistics
    needs_hessian: bool = False  # reads XᵀX (implies activations); also: reconstructs the weights
    default_group: str | None = None  # scores (and solvers that take --group): where unstructured masks compare
    # reconstructions: the constant that pulls the solution toward the dense weights (a ridge,
    # stronger when larger), which a selection (--select) may scale
    ridge: str | None = None
    needs_split: bool = False  # selections: reads calibration statistics in two parts (fit, held out)
    fast: Callable | None = None  # fn's faster version, same signature (Registry.accelerate)
    applies: Callable[..., bool] | None = None  # where fast runs: applies(*args, **kwargs); None: always

    @property
    def constant_fields(self) -> tuple[dataclasses.Field, ...]:
        return dataclasses.fields(self.constants) if self.constants is not None else ()

    def kwargs(self, values: dict[str, Any]) -> dict[str, Any]:
        """The function's keyword arguments from ``values`` (constant name -> value)."""
        return {f.metadata.get("keyword") or f.name: values[f.name] for f in self.constant_fields}

    def implementation(self, *args, **kwargs) -> Callable:
        """The function a call with these arguments runs: the fast version where it is
        attached and applies, else the formula."""
        if self.fast is not None and (self.applies is None or self.applies(*args, **kwargs)):
            return self.fast
        return self.fn

    def __call__(self, *args, constants: dict[str, Any], **kwargs):
        kwargs = {**kwargs, **self.kwargs(constants)}
        return self.implementation(*args, **kwargs)(*args, **kwargs)


class Registry(dict):
    """Methods of one kind by name, in registration order."""

    def __init__(self, kind: str, option: str):
        super().__init__()
        self.kind, self.option = kind, option

    def register(self, name: str, *, constants: type | None = None, **flags) -> Callable[[Callable], Callable]:
        """Decorator: register ``fn`` under ``name``; ``flags`` are ``Method``'s
        (needs_activations, needs_hessian, default_group, ridge, needs_split)."""
        def wrap(fn: Callable) -> Callable:
            self.add(Method(self.kind, name, fn, constants, **flags))
            return fn

        return wrap

    def add(self, method: Method) -> None:
        if not isinstance(method.name, str) or not method.name or method.name != method.name.strip():
            raise ValueError(f"{self.kind} name {method.name!r} must be a non-empty text without spaces around")
        # the registries as they are now: registering must not load the built-ins (the first
        # built-in registration happens while they load)
        if method.name in self or (self.option == "--method" and any(method.name in r for r in (SCORES, SOLVERS))):
            raise ValueError(f"{self.kind} '{method.name}' is already registered")
        if method.constants is not None:
            if not dataclasses.is_dataclass(method.constants):
                raise TypeError(f"constants of {self.kind} '{method.name}' must be a dataclass")
            for f in method.constant_fields:
                if "kind" not in f.metadata:
                    raise TypeError(f"{method.constants.__name__}.{f.name}: make it with zpruner.registry.constant()")
                _check_same_definition(f)
        if self.kind == "score" and method.default_group not in ("row", "layer"):
            raise ValueError(f"score '{method.name}' needs default_group 'row' or 'layer'")
        if method.ridge is not None and method.ridge not in {f.name for f in method.constant_fields}:
            raise ValueError(f"{self.kind} '{method.name}': ridge '{method.ridge}' is not one of its constants")
        self[method.name] = method
        self._in_builtin_order()

    def _in_builtin_order(self) -> None:
        """The built-ins in BUILTIN_MODULES' order, then the others as registered: a test or a
        script that imports zpruner.admm before the built-ins load must not reorder the
        choices that help texts, error messages and reports list."""
        def rank(method: Method) -> int:
            fn = method.fn.func if isinstance(method.fn, functools.partial) else method.fn  # EC's passes
            module = getattr(fn, "__module__", "").removeprefix(f"{__package__}.")
            return BUILTIN_MODULES.index(module) if module in BUILTIN_MODULES else len(BUILTIN_MODULES)

        ordered = sorted(self.values(), key=rank)  # stable: a module's own order is kept
        if list(self.values()) != ordered:
            self.clear()
            self.update((m.name, m) for m in ordered)

    def accelerate(self, name: str, *, applies: Callable[..., bool] | None = None) -> Callable[[Callable], Callable]:
        """Decorator: attach ``fast`` to the registered method ``name``, to run instead of its
        function wherever ``applies(*args, **kwargs)`` holds for a call's arguments (always
        when None). ``fast`` is returned unchanged."""
        def wrap(fast: Callable) -> Callable:
            if name not in self:
                raise ValueError(f"{self.kind} '{name}' is not registered; register it before accelerating it")
            if self[name].fast is not None:
                raise ValueError(f"{self.kind} '{name}' already has a fast version")
            self[name] = dataclasses.replace(self[name], fast=fast, applies=applies)
            return fast

        return wrap

    def get_method(self, name: str) -> Method:
        if name not in self:
            raise ZprunerError(f"{self.kind} '{name}' is unknown; choose one of {', '.join(self)}")
        return self[name]

    @contextmanager
    def registered(self, name: str, fn: Callable, **options) -> Iterator[Method]:
        """``register`` for a limited time (tests, experiments): removed on exit."""
        self.register(name, **options)(fn)
        try:
            yield self[name]
        finally:
            del self[name]


SCORES = Registry("score", "--method")
SOLVERS = Registry("solver", "--method")
UPDATES = Registry("update", "--update")
# How the target sparsity is shared out among the decoder blocks (zpruner.allocation)
ALLOCATIONS = Registry("allocation", "--allocation")
# How strongly a reconstruction is applied per matrix, judged on held-out data (zpruner.heldout)
SELECTIONS = Registry("selection", "--select")


# The built-in methods register themselves when their modules are imported, in the order
# help texts and reports list them, then the CPU fast paths attach their faster versions to
# them (zpruner.kernels). That happens on the first lookup, so that describing a run
# (zpruner.config) imports no torch.
BUILTIN_MODULES = ("scores", "updates", "sparsegpt", "admm", "allocation", "heldout", "kernels.score_passes")
_loaded = False


def load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for name in BUILTIN_MODULES:
            importlib.import_module(f"{__package__}.{name}")


def _method_kinds() -> tuple[Registry, ...]:
    load_builtins()
    return SCORES, SOLVERS


def method_names() -> list[str]:
    """``--method`` choices: every score, then every solver."""
    return [name for registry in _method_kinds() for name in registry]


def update_names() -> list[str]:
    load_builtins()
    return list(UPDATES)


def allocation_names() -> list[str]:
    load_builtins()
    return list(ALLOCATIONS)


def selection_names() -> list[str]:
    load_builtins()
    return list(SELECTIONS)


def get_method(name: str) -> Method:
    """The score or solver called ``name``."""
    for registry in _method_kinds():
        if name in registry:
            return registry[name]
    raise ZprunerError(f"method '{name}' is unknown; choose one of {', '.join(method_names())}")


def get_update(name: str) -> Method:
    load_builtins()
    return UPDATES.get_method(name)


def get_allocation(name: str) -> Method:
    load_builtins()
    return ALLOCATIONS.get_method(name)


def get_selection(name: str) -> Method:
    load_builtins()
    return SELECTIONS.get_method(name)


def constants() -> dict[str, Constant]:
    """Every registered constant by name, in registration order, with all its owners."""
    load_builtins()
    return _registered_constants()


def _registered_constants() -> dict[str, Constant]:
    found: dict[str, Constant] = {}
    for registry in (SCORES, SOLVERS, UPDATES, ALLOCATIONS, SELECTIONS):
        for method in registry.values():
            for f in method.constant_fields:
                owner = f"{method.kind} {method.name}"
                if f.name in found:
                    found[f.name] = dataclasses.replace(found[f.name], owners=(*found[f.name].owners, owner))
                    continue
                m = f.metadata
                found[f.name] = Constant(f.name, f.default, m["help"], m["kind"], m["minimum"], m["strict"],
                                         m["check"], (owner,))
    return found


def _check_same_definition(f: dataclasses.Field) -> None:
    """Constants share one flat namespace (CLI flags, grid settings, results): a name two
    methods use must mean the same thing to both."""
    known = _registered_constants().get(f.name)
    if known is not None and (known.default, known.help, known.kind) != (f.default, f.metadata["help"],
                                                                          f.metadata["kind"]):
        raise ValueError(f"constant '{f.name}' is already defined differently by {', '.join(known.owners)}; "
                         "rename it or reuse that definition")
