"""Run options, each declared once, as a field of a configuration dataclass made with
``option(default, help, ...)`` (as a method's constants are made with
``registry.constant``): its flat name (the CLI flag without ``--``, the sweep grid's
setting, the keyword of ``RunConfig.from_options``), its kind (type and bounds), its default,
its help text, where it appears, and whether it enters the run key. From these come the
CLI's flags (``zpruner.cli``), the checks of a configuration's fields and of a grid's
settings, the run key (``results.run_key``) and the usage in the docs (generated from the
parser). Adding a run option is one ``option(...)`` field plus the code that uses it.

Torch-free on purpose: describing a run must not import the pruning code.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .checks import check_bool, check_fraction, check_int, check_str, label
from .errors import ZprunerError
from .patterns import Pattern, check_sparsity
from .tasks import parse_tasks

KINDS = ("text", "path", "int", "seed", "window", "fraction", "flag", "choice", "sparsity", "pattern", "tasks",
         "recipe")
# keyed: True, False, "changed" (only when it differs from its default: the option is newer than
# results files keyed without it) or the name of a boolean property of the configuration that
# says whether the option decides its results (e.g. calibration settings of a data-free method).
Keyed = bool | str


@dataclass(frozen=True)
class Option:
    """One run option. ``section`` is the configuration it fills ('model', 'prune', 'eval',
    'zero_shot', 'run'), ``field`` its field there (None: an option that is no field, e.g.
    --no-eval). ``commands``: the subcommands whose CLI offers it; ``grid``: 'axis' (a list
    the sweep combines; ``axis`` names it), 'setting' (a grid's fixed setting) or ''."""

    name: str
    section: str
    field: str | None
    kind: str
    default: Any
    help: str
    choices: Callable[[], Sequence[str]] | tuple[str, ...] | None = None
    minimum: int | None = None  # int kinds: the least value (default 1)
    group: str = "pruning"
    commands: tuple[str, ...] = ("prune",)
    grid: str = "setting"
    axis: str | None = None
    keyed: Keyed = True
    preset: bool = False  # a --protocol fills it when it is not given
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def choice_names(self) -> tuple[str, ...]:
        return tuple(self.choices() if callable(self.choices) else self.choices or ())

    def check(self, value: Any) -> Any:
        """``value`` checked (None, not given, always passes), as the configuration stores it."""
        return None if value is None else _CHECKS[self.kind](self, value)

    def is_keyed(self, config: Any) -> bool:
        """Whether this option's value in ``config`` enters the run key."""
        if isinstance(self.keyed, bool):
            return self.keyed
        if self.keyed == "changed":
            return getattr(config, self.field) != self.default
        return bool(getattr(config, self.keyed))


def _path(opt: Option, value):
    # an empty or misplaced path: the runner's checks say what the path is, before any work
    if not isinstance(value, str):
        raise ZprunerError(f"{label(opt.name)} must be a path, got {value!r}")
    return value


def _text(opt: Option, value):
    check_str(opt.name, value)
    return value


def _pattern(opt: Option, value):
    check_str(opt.name, value)
    Pattern.parse(value)
    return value


def _integer(opt: Option, value):
    minimum = {"seed": 0, "window": 2}.get(opt.kind, 1 if opt.minimum is None else opt.minimum)
    check_int(opt.name, value, minimum=minimum)
    return value


def _flag(opt: Option, value):
    check_bool(opt.name, value)
    return value


def _fraction(opt: Option, value):
    check_fraction(opt.name, value)
    return float(value)


def _sparsity(opt: Option, value):
    check_sparsity(value)
    return float(value)


def _choice(opt: Option, value):
    names = opt.choice_names()
    if not isinstance(value, str) or value not in names:
        raise ZprunerError(f"{opt.name.replace('_', ' ')} {value!r} is unknown; choose one of {', '.join(names)}")
    return value


def _recipe(opt: Option, value):
    # a name as given, or the record of what it chose that a run stores (zpruner.recipes)
    _choice(opt, value.get("name") if isinstance(value, dict) else value)
    return value


def _tasks(opt: Option, value):
    if not isinstance(value, (str, list, tuple)):
        raise ZprunerError(f"tasks (--tasks) must be task names such as arc_easy,boolq, got {value!r}")
    parse_tasks(value)
    return value


# kind -> check(option, value) -> the value as stored
_CHECKS = {"path": _path, "text": _text, "pattern": _pattern, "int": _integer, "seed": _integer, "window": _integer,
           "flag": _flag, "fraction": _fraction, "sparsity": _sparsity, "choice": _choice, "tasks": _tasks,
           "recipe": _recipe}


def option(default: Any, help: str, kind: str, **spec) -> Any:
    """A configuration field that is a run option (see ``Option``; ``name`` defaults to the
    field's name, ``section`` and ``field`` are the dataclass's)."""
    if kind not in KINDS:
        raise ValueError(f"option kind {kind!r}: use one of {', '.join(KINDS)}")
    return dataclasses.field(default=default, metadata={"option": {"help": help, "kind": kind, **spec}})


def of_class(cls: type, section: str) -> list[Option]:
    """The options declared as fields of the dataclass ``cls``."""
    found = []
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("option")
        if spec is not None:
            spec = dict(spec)
            found.append(Option(spec.pop("name", f.name), section, f.name, spec.pop("kind"),
                                f.default, spec.pop("help"), **spec))
    return found


def check_fields(config: Any, options: list[Option]) -> None:
    """Each option field of ``config`` checked, and stored as its check returns it."""
    for opt in options:
        if opt.field is not None:
            setattr(config, opt.field, opt.check(getattr(config, opt.field)))


def unknown(names: set[str], known: Sequence[str], what: str) -> ZprunerError:
    return ZprunerError(f"{what} {', '.join(sorted(names))} unknown; known: {', '.join(known)}")


__all__ = ["Option", "option", "of_class", "check_fields", "label"]
