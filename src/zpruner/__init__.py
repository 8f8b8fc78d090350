"""zpruner: post-training pruning of large language models.

    import zpruner
    model, tokenizer = zpruner.load_model(zpruner.ModelConfig("smollm2-135m"))
    cfg = zpruner.PruneConfig(method="wanda", sparsity=0.5, nsamples=32, seqlen=512)
    calib = zpruner.calibration(tokenizer, cfg, data_dir="../shared/data")
    zpruner.prune(model, cfg, calib)
    print(zpruner.evaluate_tasks(model, tokenizer, "arc_easy,boolq", data_dir="../shared/data", limit=100))
"""
from importlib.metadata import version as _version

# The built-in methods register themselves, in the order help texts and reports list them.
from . import scores, updates, sparsegpt, admm, allocation, heldout  # noqa: F401, I001
from .config import EvalConfig, ModelConfig, PruneConfig, RunConfig, ZeroShotConfig
from .data import calibration, calibration_windows, eval_tokens, load_texts
from .errors import ZprunerError
from .evaluate import perplexity
from .layers import measure_sparsity
from .models import load_model
from .pruning import prune
from .runner import run
from .zeroshot import evaluate_tasks

__version__ = _version("zpruner")

__all__ = [
    "EvalConfig",
    "ModelConfig",
    "PruneConfig",
    "RunConfig",
    "ZeroShotConfig",
    "ZprunerError",
    "calibration",
    "calibration_windows",
    "eval_tokens",
    "evaluate_tasks",
    "load_model",
    "load_texts",
    "measure_sparsity",
    "perplexity",
    "prune",
    "run",
]
