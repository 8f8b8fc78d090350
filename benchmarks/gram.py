"""XᵀX of one calibration batch: the whole-matrix ``addmm_`` against ``zpruner.kernels.gram``'s
upper panels (each on one torch thread, the threads side by side), by input width d and
panel height; whether the panels give the whole product's bits (``gram.agrees``: random
data onto a non-zero sum, compared bit for bit), and the time of one batch (median of
``--repeats``, after a warm-up), alone and right after a 4096 x 576 by 576 x 576 linear on
torch's threads, as in a statistics pass, where the hook runs after the block's own ops
(the time of the linear alone is subtracted).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/gram.py | tee benchmarks/out/gram.txt

d: 576 and 1536 are SmolLM2-135M's inputs (attention and MLP up, down_proj), 4096 and
11008 LLaMA-2-7B's. tokens: the engine's calibration batch, 8 x 512.

``--pruning panels,whole,...`` instead prunes SmolLM2 with SparseGPT (quick protocol: 64 x
512 C4 tokens, seed 0), once per listed mode, and reports the seconds spent accumulating
XᵀX by input width (``ActivationStats.add_gram``), with the panels used as the package
decides (``--min-panels`` overrides ``gram.MIN_PANELS``) or never:

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/gram.py --pruning panels,whole,panels,whole \
        --min-panels 3 --data-dir ../shared/data | tee -a benchmarks/out/gram.txt
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from _common import markdown_table


def seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def pruning(args) -> None:
    import zpruner
    from zpruner import stats
    from zpruner.kernels import gram
    from _common import prune_config

    config = prune_config("sparsegpt", nsamples=64, seqlen=512, seed=0)
    add, panels_for, spent = stats.ActivationStats.add_gram, gram.panels_for, {}

    def timed(self, flat):
        start = time.perf_counter()
        add(self, flat)
        spent[flat.shape[1]] = spent.get(flat.shape[1], 0.0) + time.perf_counter() - start

    stats.ActivationStats.add_gram = timed
    if args.min_panels is not None:
        gram.MIN_PANELS = args.min_panels
    rows = []
    for mode in args.pruning.split(","):
        gram.panels_for = panels_for if mode == "panels" else (lambda x: None)
        model, tokenizer = zpruner.load_model(zpruner.ModelConfig("smollm2-135m"))
        texts = zpruner.load_texts("c4", data_dir=args.data_dir)
        calibration = zpruner.calibration_windows(tokenizer, texts, config.nsamples, config.seqlen, config.seed)
        spent.clear()
        start = time.perf_counter()
        zpruner.prune(model, config, calibration, progress=False)
        total = time.perf_counter() - start
        rows.append([mode, f"{total:.1f}", *(f"{spent[d]:.2f}" for d in sorted(spent)), f"{sum(spent.values()):.2f}"])
        widths = sorted(spent)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} torch threads; panels from {gram.MIN_PANELS}\n")
    print(markdown_table(["XᵀX", "pruning s", *(f"XᵀX d={d} s" for d in widths), "XᵀX s"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", default="576,768,1152,1536,4096,11008", help="comma-separated input widths d")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--rows", default="64,128,192,256,384", help="panel heights to try")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--pruning", help="modes (panels, whole) of SmolLM2 SparseGPT runs instead")
    parser.add_argument("--min-panels", type=int, help="with --pruning: gram.MIN_PANELS for the panels runs")
    parser.add_argument("--data-dir", default="../shared/data")
    args = parser.parse_args()
    if args.pruning:
        return pruning(args)
    from zpruner.kernels import gram

    rows_list = [int(r) for r in args.rows.split(",")]
    h, w = torch.randn(args.tokens, 576), torch.randn(576, 576)
    linear = seconds(lambda: torch.nn.functional.linear(h, w), args.repeats)

    def both(fn) -> tuple[float, float]:
        alone = seconds(fn, args.repeats)
        after = seconds(lambda: (torch.nn.functional.linear(h, w), fn()), args.repeats) - linear
        return alone, after

    table = []
    for d in (int(v) for v in args.dims.split(",")):
        x = torch.randn(args.tokens, d, generator=torch.Generator().manual_seed(0))
        acc = torch.zeros(d, d)
        whole = both(lambda: acc.addmm_(x.t(), x))
        table.append([d, "whole addmm_", "-", f"{whole[0] * 1e3:.1f}", "1.00", f"{whole[1] * 1e3:.1f}", "1.00"])
        for rows in rows_list:
            edges = [d * i // (d // rows) for i in range(d // rows + 1)] if d // rows >= 2 else None
            if edges is None:
                continue
            same = gram.agrees(x, edges)
            t = both(lambda: gram.add_upper(acc, x, edges))
            used = " (default)" if edges == gram.panel_edges(d) else ""
            table.append([d, f"{len(edges) - 1} panels of >= {rows} rows{used}", "yes" if same else "**no**",
                          f"{t[0] * 1e3:.1f}", f"{t[0] / whole[0]:.2f}", f"{t[1] * 1e3:.1f}", f"{t[1] / whole[1]:.2f}"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, tokens {args.tokens}; "
          f"panels used from {gram.MIN_PANELS} panels of >= {gram.PANEL_ROWS} rows\n")
    print(markdown_table(["d", "XᵀX of one batch", "bits of addmm_", "alone ms", "x whole", "after a linear ms",
                          "x whole"], table))


if __name__ == "__main__":
    main()
