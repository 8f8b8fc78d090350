"""zpruner: post-training pruning of large language models.

    import zpruner
    model, tokenizer = zpruner.load_model(zpruner.ModelConfig("smollm2-135m"))
    cfg = zpruner.PruneConfig(method="wanda", sparsity=0.5, nsamples=32, seqlen=512)
    texts = zpruner.load_texts("c4", data_dir="../shared/data")
    calib = zpruner.calibration_windows(tokenizer, texts, cfg.nsamples, cfg.seqlen, cfg.seed)
    zpruner.prune(model, cfg, calib)
    print(zpruner.evaluate_tasks(model, tokenizer, "arc_easy,boolq", data_dir="../shared/data", limit=100))
"""
__version__ = "0.1.0"

from .config import EvalConfig, ModelConfig, PruneConfig, RunConfig, ZeroShotConfig  # noqa: E402
from .data import calibration_windows, eval_tokens, load_texts  # noqa: E402
from .errors import ZprunerError  # noqa: E402
from .evaluate import perplexity  # noqa: E402
from .layers import measure_sparsity  # noqa: E402
from .models import load_model  # noqa: E402
from .pruning import prune  # noqa: E402
from .runner import run  # noqa: E402
from .zeroshot import evaluate_tasks  # noqa: E402

__all__ = [
    "EvalConfig",
    "ModelConfig",
    "PruneConfig",
    "RunConfig",
    "ZeroShotConfig",
    "ZprunerError",
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
