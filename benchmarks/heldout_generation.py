"""Time of the held-out text ``--select heldout`` generates (the default of ``--recipe
recommended``): ``zpruner.heldout.generated_windows`` for ``--texts`` windows of
``--seqlen`` tokens, packed from documents of ``--length`` tokens (the default) and written
as one document per window, against one batched forward over the same tokens, in this
process.

Generation samples one token at a time, every document of the batch at once, so its cost
is about one decoding step per token of a document, whatever the batch: documents of 128
tokens packed four to a window take a quarter of the steps of one 512-token document per
window.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/heldout_generation.py | tee benchmarks/out/heldout_generation.txt
"""
from __future__ import annotations

import argparse
import time

import torch

from _common import describe_threads

from zpruner.config import ModelConfig
from zpruner.heldout import HeldoutConstants, generated_windows, start_token
from zpruner.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--texts", type=int, default=HeldoutConstants.heldout_texts, help="windows (--heldout-texts)")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per window (the calibration's --seqlen)")
    parser.add_argument("--length", type=int, default=HeldoutConstants.heldout_length,
                        help="tokens per document (--heldout-length)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model, _ = load_model(ModelConfig(name=args.model))
    model.eval()
    start = start_token(model)
    print(f"model {args.model}, torch {torch.__version__}, {describe_threads()}")
    with torch.no_grad():
        times = {}
        for length in (args.length, 0):
            began = time.perf_counter()
            ids = generated_windows(model, args.texts, args.seqlen, length, args.seed, start)
            times[length] = time.perf_counter() - began
        began = time.perf_counter()
        model(ids)
        forward = time.perf_counter() - began
    print(f"one forward over {args.texts} x {args.seqlen} tokens: {forward:.2f} s")
    for length, seconds in times.items():
        what = f"documents of {length} tokens packed" if length else "one document per window"
        print(f"generated {args.texts} x {args.seqlen} tokens, {what}: {seconds:.2f} s ({seconds / forward:.1f}x)")


if __name__ == "__main__":
    main()
