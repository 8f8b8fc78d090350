"""Where one Wanda pruning of SmolLM2 spends its time, pass by pass (quick protocol).

Wraps the engine's block passes with timers: the hooked statistics passes, the re-runs of
the pruned blocks, the input capture; prints them with the per-layer work and, for
comparison, one blocks-only and one full forward over the same calibration tokens.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/engine_passes.py
"""
import time, torch
from zpruner import ModelConfig, load_model
from zpruner.config import PruneConfig
from zpruner.data import load_texts, calibration_windows
from zpruner import engine, pruning
from zpruner.stats import record_inputs
from zpruner.layers import find_matrices
model, tok = load_model(ModelConfig("smollm2-135m"))
cal = calibration_windows(tok, load_texts("c4", "../shared/data"), 64, 512, 0)
T = {"stats_pass": 0.0, "keep_pass": 0.0, "capture": 0.0}
orig_forward = engine._forward
def timed_forward(block, calls, hidden, keep, limit=None):
    t = time.perf_counter(); r = orig_forward(block, calls, hidden, keep, limit)
    T["keep_pass" if keep else "stats_pass"] += time.perf_counter() - t; return r
engine._forward = timed_forward
orig_cap = engine.capture_block_inputs
def timed_cap(*a, **k):
    t = time.perf_counter(); r = orig_cap(*a, **k); T["capture"] += time.perf_counter() - t; return r
engine.capture_block_inputs = timed_cap
blocks = model.model.layers
# plain block pass without hooks for comparison
h, calls = orig_cap(model, cal, False, 8)
with torch.no_grad():
    t = time.perf_counter(); orig_forward(blocks[0], calls, [x.clone() for x in h], True); one = time.perf_counter() - t
    layers = find_matrices(blocks[0])
    with record_inputs(layers) as st:
        t = time.perf_counter(); orig_forward(blocks[0], calls, [x.clone() for x in h], False); hooked = time.perf_counter() - t
print(f"block 0 plain pass {one:.2f}s, hooked pass {hooked:.2f}s")
t = time.perf_counter()
r = pruning.prune(model, PruneConfig("wanda", nsamples=64, seqlen=512), cal, progress=False)
total = time.perf_counter() - t
print({k: round(v, 2) for k, v in T.items()}, "layers", round(sum(r.layer_time_s.values()), 2), "total", round(total, 2))
with torch.no_grad():
    t = time.perf_counter()
    for b in cal.split(8): model.model(b, use_cache=False)
    print("blocks-only forward", round(time.perf_counter() - t, 2))
    t = time.perf_counter()
    for b in cal.split(8): model(b, use_cache=False)
    print("full forward", round(time.perf_counter() - t, 2))
