"""Time of the held-out text ``--select heldout`` generates (the default of ``--recipe
recommended``): ``zpruner.heldout.generated_text`` for ``--texts`` x ``--length`` tokens,
against one batched forward over the same tokens, in this process.

The generation samples one token at a time for every sequence, so its cost is one decoding
step per position, not one pass over the tokens: the ratio shows how much of the recipe's
pruning time beyond the ADMM solver's is this step.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/heldout_generation.py | tee benchmarks/out/heldout_generation.txt
"""
from __future__ import annotations

import argparse
import time

import torch

from _common import describe_threads

from zpruner.config import ModelConfig
from zpruner.heldout import generated_text, start_token
from zpruner.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--texts", type=int, default=8, help="sequences (--heldout-texts)")
    parser.add_argument("--length", type=int, default=512, help="tokens each (the calibration's --seqlen)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model, _ = load_model(ModelConfig(name=args.model))
    model.eval()
    with torch.no_grad():
        start = time.perf_counter()
        ids = generated_text(model, args.texts, args.length, args.seed, start_token(model))
        generation = time.perf_counter() - start
        start = time.perf_counter()
        model(ids)
        forward = time.perf_counter() - start
    print(f"model {args.model}, torch {torch.__version__}, {describe_threads()}")
    print(f"generated {args.texts} x {args.length} tokens: {generation:.2f} s")
    print(f"one forward over the same tokens: {forward:.2f} s ({generation / forward:.1f}x)")


if __name__ == "__main__":
    main()
