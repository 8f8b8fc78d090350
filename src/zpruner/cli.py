"""``zpruner`` command line: a thin argparse layer over ``zpruner.runner.run``."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

from .argtypes import (Parser, clamp_range, comma_list, finite, non_negative_float, non_negative_int, positive_float,
                       positive_int, seed, window)
from .config import RunConfig, options
from .errors import ZprunerError
from .executors import RayExecutor
from .io import check_output_file, check_output_folder, describe_os_error
from .options import Option
from .protocols import DEFAULTS
from .registry import Constant, constants
from .report import write_report
from .results import run_key
from .runner import run
from .summary import format_summary
from .sweep import AXES, Grid, adopt, plan, read_done, read_grid, run_sweep
from .sweep import describe as describe_run

# An option's kind -> how its flag's text is read (the value's range and choices are then the
# configuration's checks, the same for the CLI, the API and grids)
_PARSERS = {"text": str, "path": str, "pattern": str, "tasks": str, "choice": str, "int": positive_int, "seed": seed,
            "window": window, "fraction": finite, "sparsity": finite, "recipe": str}
_CONSTANT_PARSERS = {"int": positive_int, "float": finite, "range": clamp_range}
# a registered method's kind -> the option that chooses it
_OWNER_OPTIONS = {"update": "--update", "allocation": "--allocation", "selection": "--select"}


def _default_text(opt: Option) -> str:
    if opt.preset:
        fallback = DEFAULTS[opt.name]
        return ". Default: the --protocol's" + (f", else {fallback}" if fallback is not None else "")
    if opt.kind == "flag" or opt.default is None or "default" in opt.help:
        return ""
    return f". Default: {opt.default}"


def _add_option(target, opt: Option) -> None:
    """One run option's flag, as the configuration schema declares it."""
    if opt.kind == "flag":
        target.add_argument(opt.flag, action="store_true", default=None, help=opt.help)
        return
    names = opt.choice_names()
    metavar = opt.metavar or ("{" + ",".join(names) + "}" if names else None)
    target.add_argument(opt.flag, type=_PARSERS[opt.kind], metavar=metavar, help=opt.help + _default_text(opt))


def _add_constant_option(group, constant: Constant) -> None:
    """--name-of-constant, from the registry: its help, owners and default."""
    default = ",".join(map(str, constant.default)) if constant.kind == "range" else constant.default
    by_option: dict[str, list[str]] = {}
    for owner in constant.owners:
        kind, name = owner.split(" ", 1)
        by_option.setdefault(_OWNER_OPTIONS.get(kind, "--method"), []).append(name)
    owners = "; ".join(f"{option} {', '.join(names)}" for option, names in by_option.items())
    parse = non_negative_int if constant.kind == "int" and constant.minimum == 0 else _CONSTANT_PARSERS[constant.kind]
    group.add_argument("--" + constant.name.replace("_", "-"), type=parse,
                       metavar="LO,HI" if constant.kind == "range" else None,
                       help=f"{constant.help} (used by {owners}). Default: {default}")


def _add_run_options(parser: argparse.ArgumentParser, command: str) -> None:
    """The run options ``command`` offers (zpruner.config's schema), by their help groups;
    for 'prune' the methods' constants too."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for opt in options():
        if command in opt.commands:
            target = groups.setdefault(opt.group, parser.add_argument_group(opt.group)) if opt.group else parser
            _add_option(target, opt)
    if command == "prune":
        constants_group = groups.setdefault("method constants", parser.add_argument_group("method constants"))
        for constant in constants().values():
            _add_constant_option(constants_group, constant)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="zpruner", description="Post-training pruning of large language models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    p = sub.add_parser("prune", help="prune a model, then measure it",
                       description="Prune every weight matrix of every decoder block, then measure perplexity "
                                   "(and zero-shot accuracy with --tasks) of the pruned model in memory.")
    _add_run_options(p, "prune")
    e = sub.add_parser("eval", help="measure a model as it is (dense baseline, saved pruned model)",
                       description="Measure perplexity (and zero-shot accuracy) of a model without changing it.")
    _add_run_options(e, "eval")
    _add_sweep_parser(sub)
    r = sub.add_parser("report", help="Markdown tables and PNG plots from results files",
                       description="Tables shaped like the papers' (perplexity by method x pattern, zero-shot "
                                   "average, perplexity across sparsity, the CVR/EC ablation, calibration size) and "
                                   "plots, from sweep results (.jsonl) and/or single-run results (.json).")
    r.add_argument("results", nargs="+", help="results files: .jsonl (zpruner sweep) or .json (--output-json)")
    r.add_argument("--out", metavar="DIR",
                   help="folder for report.md and the PNG files; default: the first results file's folder")
    r.add_argument("--title", help="the report's heading")
    r.add_argument("--overwrite", action="store_true",
                   help="replace a report.md or PNG in --out that zpruner report did not write (or that was edited "
                        "since); without it such a file stops the report. An unedited report of its own is always "
                        "replaced")
    return parser


def _add_sweep_parser(sub) -> None:
    w = sub.add_parser("sweep", help="run a grid of configurations into a results file, resumably",
                       description="Run models x methods x updates x patterns x sparsities x calibration sizes x "
                                   "seeds. Each finished run appends one JSON line to --results; configurations "
                                   "already there are skipped, so an interrupted sweep resumes. Lists come from "
                                   "the options (comma-separated) and/or a TOML/YAML grid file; options win.")
    w.add_argument("grid", nargs="?", help="grid file (.toml, .yaml): the lists below and fixed settings by name")
    w.add_argument("--results", required=True, metavar="FILE", help="JSON-lines results file, appended to")
    g = w.add_argument_group("grid (comma-separated lists)")
    for opt in options():
        if opt.grid == "axis":
            g.add_argument(f"--{opt.axis}", type=comma_list(_PARSERS[opt.kind]),
                           help=f"{opt.name}: {opt.help}; default: {opt.default}")
    f = w.add_argument_group("fixed settings")
    for opt in options():
        if "sweep" in opt.commands:
            _add_option(f, opt)
    f.add_argument("--no-dense", action="store_true", help="do not measure the dense model")
    f.add_argument("--dry-run", action="store_true", help="print the configurations to run, run nothing")
    f.add_argument("--adopt", nargs="+", metavar="JSON",
                   help="first add these single-run results (zpruner prune --output-json) to --results, "
                        "so their configurations are not run again (not with --dry-run)")
    f.add_argument("--quiet", action="store_true", help="no progress bars")
    x = w.add_argument_group("where the runs execute")
    x.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: one after another in this process; ray: as tasks on a Ray cluster, several at "
                        "once (pip install 'zpruner[ray]'). Default: %(default)s")
    x.add_argument("--ray-address", metavar="ADDR",
                   help="with --executor ray: 'auto' joins the cluster this machine belongs to, HOST:PORT or "
                        "ray://HOST:PORT a given one; default: start Ray on this machine for the sweep")
    x.add_argument("--cpus-per-run", type=positive_float, metavar="N",
                   help="with --executor ray: CPUs (and torch threads) reserved per run; default: 1")
    x.add_argument("--gpus-per-run", type=non_negative_float, metavar="N",
                   help="with --executor ray: GPUs reserved per run (fractions share one); "
                        "default: 1 if the cluster has GPUs, else 0")


def executor_from_args(args: argparse.Namespace):
    """The executor the options ask for; checked (Ray installed) before anything is written."""
    if args.executor == "local":
        given = [name for name in ("ray_address", "cpus_per_run", "gpus_per_run") if getattr(args, name) is not None]
        if given:
            raise ZprunerError(", ".join("--" + name.replace("_", "-") for name in given)
                               + ": options of --executor ray; add --executor ray or drop them")
        return None
    return RayExecutor(args.ray_address, args.cpus_per_run or 1, args.gpus_per_run)


def grid_from_args(args: argparse.Namespace):
    grids = read_grid(args.grid) if args.grid else [Grid()]
    overrides = {name: getattr(args, name) for name in AXES}
    overrides.update({o.name: getattr(args, o.name) for o in options() if "sweep" in o.commands})
    overrides["dense"] = False if args.no_dense else None
    return [grid.merged(overrides) for grid in grids]


def sweep_main(args: argparse.Namespace) -> int:
    check_output_file("--results", args.results)
    planned = plan(grid_from_args(args), args.data_dir)  # a bad grid stops here, before anything is written
    executor = executor_from_args(args)  # so does --executor ray without Ray
    for line in planned.skipped:
        print(f"skipped (not a valid combination): {line}")
    if args.adopt and not args.dry_run:
        for source in adopt(args.adopt, args.results):
            print(f"adopted {source}")
    if args.dry_run:
        done = read_done(Path(args.results).expanduser().resolve())
        for config in planned.configs:
            key = run_key(config)
            print(f"{key}  {'done ' if key in done else 'to run'}  {describe_run(config)}")
        return 0
    summary = run_sweep(planned.configs, args.results, not args.quiet, executor=executor)
    print(f"sweep: ran {len(summary.ran)}, skipped {summary.already_done} already in {args.results}, "
          f"failed {len(summary.failed)}")
    for line in summary.failed:
        print(f"  failed: {line}", file=sys.stderr)
    return 1 if summary.failed else 0


def report_main(args: argparse.Namespace) -> int:
    out = args.out if args.out is not None else Path(args.results[0]).expanduser().parent
    check_output_folder("--out", out)
    for path in write_report(args.results, out, args.title, args.overwrite):
        print(path)
    return 0


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run the options ask for: RunConfig.from_options, which the sweep uses too."""
    options = {k: v for k, v in vars(args).items() if k not in ("command", "quiet", "protocol")}
    return RunConfig.from_options(args.protocol, prune=args.command == "prune", **options)


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, a batch system's stop), raised where the program is so that it takes
    Ctrl-C's path: every writer removes its unfinished output on the way out."""


@contextmanager
def _sigterm_as_interrupt():
    def terminate(signum, frame):
        raise Terminated

    try:
        previous = signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread (main() called from a worker): the default stays
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("zpruner: %(message)s"))
    handler.set_name("zpruner-cli")
    package_log = logging.getLogger("zpruner")
    for old in [h for h in package_log.handlers if h.get_name() == "zpruner-cli"]:  # main() called again
        package_log.removeHandler(old)
    package_log.addHandler(handler)
    package_log.setLevel(logging.WARNING if getattr(args, "quiet", False) else logging.INFO)
    package_log.propagate = False
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        with _sigterm_as_interrupt():
            if args.command == "sweep":
                return sweep_main(args)
            if args.command == "report":
                return report_main(args)
            results = run(config_from_args(args), progress=not args.quiet)
    except ZprunerError as exc:
        print(f"zpruner {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the disk, not zpruner: full, read-only, removed under us
        print(f"zpruner {args.command}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        # outputs are written under temporary names that their writers remove on the way out
        what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        print(f"zpruner {args.command}: {what}; finished outputs are kept, unfinished ones removed", file=sys.stderr)
        return 128 + signal.SIGTERM if isinstance(exc, Terminated) else 130
    print(format_summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
