"""Where one Wanda pruning of SmolLM2 spends its time, pass by pass (quick protocol).

Wraps the engine's block passes with timers: the hooked statistics passes, the re-runs of
the pruned blocks, the input capture; prints them with the per-layer work and, for
comparison, one blocks-only and one full forward over the same calibration tokens.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/engine_passes.py --data-dir ../shared/data \
        | tee benchmarks/out/engine_passes.txt
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8, help="calibration windows per block forward")
    args = parser.parse_args()

    from zpruner import ModelConfig, engine, load_model, pruning
    from zpruner.config import PruneConfig
    from zpruner.data import calibration_windows, load_texts
    from zpruner.layers import find_matrices
    from zpruner.stats import record_inputs

    model, tok = load_model(ModelConfig("smollm2-135m"))
    cal = calibration_windows(tok, load_texts("c4", args.data_dir), args.nsamples, args.seqlen, 0)
    spent = {"stats_pass": 0.0, "keep_pass": 0.0, "capture": 0.0}
    orig_forward, orig_capture = engine._forward, engine.capture_block_inputs

    def timed_forward(block, calls, hidden, keep, limit=None, inputs_of=None):
        start = time.perf_counter()
        out = orig_forward(block, calls, hidden, keep, limit, inputs_of)
        spent["keep_pass" if keep else "stats_pass"] += time.perf_counter() - start
        return out

    def timed_capture(*a, **k):
        start = time.perf_counter()
        out = orig_capture(*a, **k)
        spent["capture"] += time.perf_counter() - start
        return out

    engine._forward, engine.capture_block_inputs = timed_forward, timed_capture
    blocks = model.model.layers
    # block 0 without and with the statistics hooks
    hidden, calls = orig_capture(model, cal, False, args.batch)
    with torch.no_grad():
        start = time.perf_counter()
        orig_forward(blocks[0], calls, [x.clone() for x in hidden], True)
        plain = time.perf_counter() - start
        with record_inputs(find_matrices(blocks[0])):
            start = time.perf_counter()
            orig_forward(blocks[0], calls, [x.clone() for x in hidden], False)
            hooked = time.perf_counter() - start
    print(f"block 0 plain pass {plain:.2f}s, hooked pass {hooked:.2f}s")
    start = time.perf_counter()
    report = pruning.prune(model, PruneConfig("wanda", nsamples=args.nsamples, seqlen=args.seqlen), cal,
                           progress=False)
    total = time.perf_counter() - start
    print({k: round(v, 2) for k, v in spent.items()}, "layers", round(sum(report.layer_time_s.values()), 2),
          "total", round(total, 2))
    with torch.no_grad():
        start = time.perf_counter()
        for batch in cal.split(args.batch):
            model.model(batch, use_cache=False)
        print("blocks-only forward", round(time.perf_counter() - start, 2))
        start = time.perf_counter()
        for batch in cal.split(args.batch):
            model(batch, use_cache=False)
        print("full forward", round(time.perf_counter() - start, 2))


if __name__ == "__main__":
    main()
