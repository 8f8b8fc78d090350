"""End-to-end time and peak memory of pruning a model (SmolLM2-135M by default, any
``--model``, e.g. a mixture of experts) with each method, quick protocol.

Per method, in a fresh child process (so that its peak RSS is that method's alone): load
the model, draw the calibration windows (64 x 512 C4 tokens, seed 0), prune at 50 %
unstructured, evaluate WikiText-2 perplexity (seqlen 512, first 64 windows), then time
one plain forward pass of the model over the same calibration tokens, in the engine's
batches, with and without the LM head. Pruning is reported as a multiple of that plain
forward and of the two passes over the blocks that a calibrated method cannot avoid (under
the statistics hooks, then to carry the pruned outputs on: twice the blocks-only forward),
and split into the per-layer work (score, mask, update, solve) and the rest (block passes,
statistics). ``--render FILE`` prints the report again from a ``--json`` file, without
measuring.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/end_to_end.py --data-dir ../shared/data \
        --methods wanda,cvr+ec,zpruner,sparsegpt,magnitude,ria --eval-windows 4 | tee benchmarks/out/end_to_end.txt
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/end_to_end.py --data-dir ../shared/data --nsamples 4 --eval-windows 2 --methods wanda
    .venv/bin/python benchmarks/end_to_end.py --render FILE   # FILE: an earlier run's --json FILE
"""
from __future__ import annotations

# Only light imports at module level: the parent must stay small (see _common's docstring);
# torch and zpruner are imported inside the child's functions.
import argparse
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from _common import DEFAULT_DATA_DIR, calib_batch_size, fmt, markdown_table, vm_hwm_mib, write_json

METHODS = "magnitude,wanda,ria,zpruner,cvr,cvr+ec,wanda+ec,sparsegpt"


# ---------------------------------------------------------------- child: one method


def peak_rss_mib() -> dict[str, float | None]:
    """Peak resident memory of this process so far, in MiB.

    ru_maxrss (KiB on Linux, bytes on macOS) and, on Linux, VmHWM: the latter is the
    process's own address space only, a cross-check on ru_maxrss, which also counts
    whatever the parent held when it started this process.
    """
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"ru_maxrss": maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024), "vmhwm": vm_hwm_mib()}


class Phases(dict):
    """Seconds per named phase, and the peak RSS when each one ended."""

    def __init__(self):
        super().__init__()
        self.rss = {"start": peak_rss_mib()}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self[name] = time.perf_counter() - start
        self.rss[name] = peak_rss_mib()


def forward_time(module, calibration, batch_size: int) -> float:
    """Seconds of one no-grad pass of ``module`` over the calibration tokens, in batches of
    ``batch_size`` samples, as the engine feeds them."""
    import torch

    start = time.perf_counter()
    with torch.no_grad():
        for batch in calibration.split(batch_size):
            module(batch, use_cache=False)
    return time.perf_counter() - start


def layer_kind(name: str) -> str:
    """'model.layers.12.mlp.down_proj' -> 'mlp.down_proj': the layer's role in any block."""
    return re.sub(r"^.*?\.\d+\.", "", name)


def measure_method(args) -> dict:
    import zpruner
    from transformers.utils import logging as hf_logging

    from _common import environment, prune_config

    hf_logging.disable_progress_bar()  # one bar per child would bury the summary lines
    config = prune_config(args.child, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
    phases = Phases()
    with phases("load"):
        model, tokenizer = zpruner.load_model(zpruner.ModelConfig(args.model))
    with phases("calibration"):
        texts = zpruner.load_texts("c4", data_dir=args.data_dir)
        calibration = zpruner.calibration_windows(tokenizer, texts, config.nsamples, config.seqlen, config.seed)
    with phases("pruning"):
        report = zpruner.prune(model, config, calibration, progress=False)
    with phases("eval"):
        tokens = zpruner.eval_tokens(tokenizer, zpruner.load_texts("wikitext2", data_dir=args.data_dir))
        ppl = zpruner.perplexity(model, tokens, args.eval_seqlen, args.eval_windows, progress=False)
    # The reference forwards come last: a full forward's logits (batch x seqlen x 49152
    # floats, 0.8 GB at 8 x 512) outweigh anything pruning holds, and would otherwise set
    # every method's peak. Running them on the pruned weights costs the same: dense CPU
    # kernels do not skip zeros.
    batch = args.forward_batch_size or calib_batch_size(config) or 1
    phases["forward"] = forward_time(model, calibration, batch)
    phases["forward_blocks"] = forward_time(model.base_model, calibration, batch)
    layer_s = sum(report.layer_time_s.values())
    by_kind: dict[str, float] = {}
    for name, seconds in report.layer_time_s.items():
        by_kind[layer_kind(name)] = by_kind.get(layer_kind(name), 0.0) + seconds
    return {
        "method": args.child,
        "uses_hessian": config.uses_hessian,
        "calib_batch_size": calib_batch_size(config),
        "forward_batch_size": batch,
        "timings_s": dict(phases),
        "prune_report": {"total_s": report.total_s, "layer_sum_s": layer_s, "rest_s": report.total_s - layer_s,
                         "layer_sum_by_kind_s": by_kind},
        "perplexity": ppl.value,
        "sparsity": zpruner.measure_sparsity(model)["overall"],
        # the method's own peak (load + calibration + pruning), and the run's with evaluation;
        # both before the reference forwards
        "peak_rss_pruning_mib": phases.rss["pruning"]["ru_maxrss"],
        "peak_rss_mib": phases.rss["eval"]["ru_maxrss"],
        "peak_rss_by_phase_mib": {**phases.rss, "with_forward": peak_rss_mib()},
        "environment": environment(),
    }


def preflight(args) -> dict:
    """Checks every method name before the first long child, and records the environment,
    from a child of its own so the parent never imports torch."""
    from _common import environment, parse_methods, prune_config

    methods = parse_methods(args.methods)
    config = prune_config(methods[0], nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
    return {"methods": methods, "environment": environment(), "calib_batch_size": calib_batch_size(config)}


# ---------------------------------------------------------------- parent: all methods


def child_argv(args, mode: list[str], out: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *mode, "--child-out", str(out),
            "--model", args.model, "--data-dir", args.data_dir, "--methods", args.methods,
            "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", str(args.seed),
            "--eval-seqlen", str(args.eval_seqlen), "--eval-windows", str(args.eval_windows),
            *(["--forward-batch-size", str(args.forward_batch_size)] if args.forward_batch_size else [])]


def run_child(args, mode: list[str], workdir: Path, label: str) -> dict:
    out = workdir / f"{label.replace('+', '_')}.json"
    code = subprocess.run(child_argv(args, mode, out)).returncode
    if code != 0 or not out.is_file():
        return {"method": label, "error": f"child process exited with code {code}"}
    return json.loads(out.read_text())


def ratio(result: dict) -> float:
    return result["timings_s"]["pruning"] / result["timings_s"]["forward"]


def passes_ratio(result: dict) -> float:
    """Pruning time over the two block passes a calibrated method cannot avoid."""
    return result["timings_s"]["pruning"] / (2 * result["timings_s"]["forward_blocks"])


def table(results: list[dict]) -> str:
    headers = ["method", "load s", "calibration s", "forward s", "forward, blocks only s", "pruning s",
               "pruning / forward", "pruning / 2 block passes", "eval s", "peak RSS MiB, to pruning",
               "peak RSS MiB, run", "perplexity"]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["method"], *["-"] * 5, r["error"], *["-"] * 5])
            continue
        t = r["timings_s"]
        rows.append([r["method"], fmt(t["load"]), fmt(t["calibration"]), fmt(t["forward"]), fmt(t["forward_blocks"]),
                     fmt(t["pruning"]), fmt(ratio(r), 2, "x"), fmt(passes_ratio(r), 2, "x"), fmt(t["eval"]),
                     fmt(r["peak_rss_pruning_mib"], 0), fmt(r["peak_rss_mib"], 0), fmt(r["perplexity"], 3)])
    return markdown_table(headers, rows, right=set(range(1, 12)))


def breakdown(r: dict) -> str:
    """Where a method's pruning time went."""
    t, p = r["timings_s"], r["prune_report"]
    kinds = sorted(p["layer_sum_by_kind_s"].items(), key=lambda kv: -kv[1])
    return "\n".join([
        f"- **{r['method']}**: pruning {t['pruning']:.2f} s = {ratio(r):.2f}x the plain forward; "
        f"engine total {p['total_s']:.2f} s",
        f"  - per-layer work (score, mask, update, solve; sum of layer_time_s): {p['layer_sum_s']:.2f} s "
        f"({p['layer_sum_s'] / p['total_s']:.0%}) = {p['layer_sum_s'] / t['forward']:.2f}x forward; by layer: "
        + ", ".join(f"{kind} {s:.2f} s" for kind, s in kinds),
        f"  - the rest (input capture, block passes under the statistics hooks, re-runs of the pruned blocks): "
        f"{p['rest_s']:.2f} s ({p['rest_s'] / p['total_s']:.0%}) = {p['rest_s'] / t['forward']:.2f}x forward "
        f"= {p['rest_s'] / t['forward_blocks']:.2f}x the blocks-only forward (a calibrated method passes every "
        f"block at least twice: under the hooks, then to carry the pruned outputs on)",
    ])


def report(args, results: list[dict], pre: dict) -> str:
    env = pre["environment"]
    lines = [
        f"# End-to-end pruning of {args.model}, 50 % unstructured",
        "",
        f"Calibration {args.nsamples} x {args.seqlen} C4 tokens (seed {args.seed}); WikiText-2 perplexity at "
        f"seqlen {args.eval_seqlen}, first {args.eval_windows} windows. torch {env['torch']}, "
        f"{env['torch_threads']} torch threads (OMP_NUM_THREADS={env['OMP_NUM_THREADS']}), "
        f"{env['cpu_count']} CPUs. Engine calibration batch (PruneConfig.calib_batch_size): "
        f"{pre['calib_batch_size'] if pre['calib_batch_size'] is not None else 'no such option (one sample)'}.",
        "",
        table(results),
        "",
        "forward: one no-grad pass of the whole model over the calibration tokens, in the engine's batches "
        "(blocks only: `model.base_model`, no LM head), same process. Peak RSS: ru_maxrss of the method's own "
        "process after pruning (load + calibration + pruning) and after evaluation; the reference forwards "
        "run last and are not included (their logits would set every method's peak).",
    ]
    measured = [r for r in results if "error" not in r]
    if measured:
        lines += ["", "## Where the pruning time goes", "", *map(breakdown, measured)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--methods", default=METHODS, help="comma-separated; METHOD+UPDATE for an update (cvr+ec)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    parser.add_argument("--nsamples", type=int, default=64, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=512, help="calibration window length")
    parser.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--forward-batch-size", type=int,
                        help="samples per reference forward; None: the engine's calibration batch")
    parser.add_argument("--json", metavar="FILE", help="also write every measurement here")
    parser.add_argument("--render", metavar="FILE", type=Path,
                        help="print the report of an earlier --json FILE again, measuring nothing")
    parser.add_argument("--child", metavar="METHOD", help=argparse.SUPPRESS)
    parser.add_argument("--preflight", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.render:
        saved = json.loads(args.render.read_text())
        print(report(argparse.Namespace(**saved["settings"]), saved["results"], saved))
        return
    if args.child or args.preflight:
        result = measure_method(args) if args.child else preflight(args)
        args.child_out.write_text(json.dumps(result, indent=2))
        return

    with tempfile.TemporaryDirectory(prefix="zpruner-e2e-") as tmp:
        pre = run_child(args, ["--preflight"], Path(tmp), "preflight")
        if "error" in pre:
            sys.exit("stopped: the method list or the environment check failed (see above)")
        print(f"threads in each child: {pre['environment']['torch_threads']} "
              f"(OMP_NUM_THREADS={pre['environment']['OMP_NUM_THREADS']})", flush=True)
        results = []
        for method in pre["methods"]:
            print(f"--- {method}", flush=True)
            results.append(run_child(args, ["--child", method], Path(tmp), method))
            if "error" not in results[-1]:
                t = results[-1]["timings_s"]
                print(f"    pruning {t['pruning']:.2f} s, forward {t['forward']:.2f} s, "
                      f"ratio {ratio(results[-1]):.2f}x", flush=True)
    print()
    print(report(args, results, pre))
    if args.json:
        write_json(args.json, {
            "benchmark": "end_to_end",
            "settings": {k: v for k, v in vars(args).items() if k not in ("child", "preflight", "child_out", "json", "render")},
            "environment": pre["environment"],
            "calib_batch_size": pre["calib_batch_size"],
            "results": results,
        })
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
