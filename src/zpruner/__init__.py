"""zpruner: post-training pruning of large language models.

    import zpruner
    model, tokenizer = zpruner.load_model(zpruner.ModelConfig("smollm2-135m"))
    cfg = zpruner.PruneConfig(method="wanda", sparsity=0.5, nsamples=32, seqlen=512)
    calib = zpruner.calibration(tokenizer, cfg, data_dir="../shared/data")
    zpruner.prune(model, cfg, calib)
    print(zpruner.evaluate_tasks(model, tokenizer, "arc_easy,boolq", data_dir="../shared/data", limit=100))

The names below are imported when first used, so that ``import zpruner.config`` (describing
a run) does not import torch.
"""
from importlib import import_module
from importlib.metadata import version as _version

__version__ = _version("zpruner")

# public name -> the module that defines it
_API = {
    "EvalConfig": "config", "ModelConfig": "config", "PruneConfig": "config", "RunConfig": "config",
    "ZeroShotConfig": "config", "ZprunerError": "errors", "calibration": "data", "calibration_windows": "data",
    "eval_tokens": "data", "load_texts": "data", "perplexity": "evaluate", "measure_sparsity": "layers",
    "load_model": "models", "prune": "pruning", "run": "runner", "evaluate_tasks": "zeroshot",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'zpruner' has no attribute '{name}'")
    value = getattr(import_module(f"{__name__}.{_API[name]}"), name)
    globals()[name] = value
    return value
