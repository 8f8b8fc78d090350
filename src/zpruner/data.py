"""Text for calibration and evaluation: local data directory first, the Hugging Face hub
otherwise, and the seeded window sampler of the SparseGPT/Wanda reference code.

A data directory has the layout of ``shared/data`` (see its README): it is given by the
``--data-dir`` option or the ``ZPRUNER_DATA_DIR`` environment variable.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import torch

from .errors import ZprunerError

DATA_DIR_ENV = "ZPRUNER_DATA_DIR"

# name -> (file inside a data directory, hub loader arguments, split). The hub C4 file is
# the shard whose head the local copy holds, so both sources sample the same documents.
DATASETS = {
    "c4": (
        "c4/c4-en-train.00000-of-01024.head1000.jsonl",
        dict(path="allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}),
        "train",
    ),
    "wikitext2": (
        "wikitext2/wikitext-2-raw-v1.test.jsonl",
        dict(path="Salesforce/wikitext", name="wikitext-2-raw-v1"),
        "test",
    ),
}


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The explicit option, else $ZPRUNER_DATA_DIR, else None (use the hub)."""
    chosen = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or None
    if chosen is None:
        return None
    option = "--data-dir" if data_dir is not None else f"${DATA_DIR_ENV}"
    path = Path(chosen).expanduser()
    if path.exists() and not path.is_dir():
        raise ZprunerError(f"data directory {path} ({option}) is a file, not a folder; give the folder with the "
                           "layout of shared/data")
    if not path.is_dir():
        raise ZprunerError(f"data directory {path} does not exist; fix {option}")
    return path


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ZprunerError(f"{path} is not UTF-8 text (byte {exc.start} cannot be decoded); "
                           "convert it, e.g. iconv -f latin1 -t utf-8") from None
    except OSError as exc:
        raise ZprunerError(f"cannot read {path}: {exc.strerror}") from None


def read_jsonl_texts(path: Path) -> list[str]:
    texts = []
    for lineno, line in enumerate(_read_utf8(path).split("\n"), 1):  # only \n ends a JSON line
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ZprunerError(f'{path}:{lineno} is not a JSON object with a "text" field') from None
        if not isinstance(text, str):
            raise ZprunerError(f'{path}:{lineno}: "text" must be a string, got {type(text).__name__}')
        texts.append(text)
    return texts


def load_texts(source: str, data_dir: str | os.PathLike | None = None) -> list[str]:
    """Documents (rows) of a named dataset ('c4', 'wikitext2') or a local file.

    A .jsonl file gives one document per line (its "text" field); a .txt file is one document.
    """
    if source not in DATASETS:
        path = Path(source).expanduser()
        if not path.is_file():
            raise ZprunerError(
                f"text source '{source}' is neither a dataset name ({', '.join(DATASETS)}) nor an existing file"
            )
        if path.suffix == ".jsonl":
            return read_jsonl_texts(path)
        if path.suffix == ".txt":
            return [_read_utf8(path)]
        raise ZprunerError(f"text file {path} must end in .txt or .jsonl")
    relative, hub_args, split = DATASETS[source]
    local = resolve_data_dir(data_dir)
    if local is not None:
        path = local / relative
        if not path.is_file():
            raise ZprunerError(f"data directory {local} has no {relative}; see the data-directory layout in the README")
        return read_jsonl_texts(path)
    return _load_from_hub(source, hub_args, split)


def _load_from_hub(source: str, hub_args: dict, split: str) -> list[str]:
    import datasets  # heavy import, needed only online

    try:
        return list(datasets.load_dataset(**hub_args, split=split)["text"])
    except Exception as exc:  # the hub client raises many unrelated types; all mean "not reachable"
        raise ZprunerError(
            f"could not load '{source}' from the Hugging Face hub ({type(exc).__name__}); offline, pass "
            f"--data-dir (or set ${DATA_DIR_ENV}) to a folder with the layout of shared/data"
        ) from exc


def _encode(tokenizer, text: str) -> torch.Tensor:
    # verbose=False: long texts are fine here, they are cut into windows afterwards.
    return tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]


def calibration_windows(tokenizer, texts: list[str], nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """[nsamples, seqlen] token ids, drawn exactly as the reference implementations do.

    ``random.seed(seed)``; per sample, draw document indices with ``randint(0, n - 1)`` until
    one tokenises to more than ``seqlen`` tokens, then a start with
    ``randint(0, len - seqlen - 1)``. Same file, tokenizer and seed: same windows.
    """
    lengths = [len(ids) for ids in tokenizer(texts, verbose=False).input_ids] if texts else []
    eligible = sum(n > seqlen for n in lengths)
    if eligible == 0:
        longest = max(lengths, default=0)
        raise ZprunerError(
            f"calibration text too short: no document is longer than seqlen={seqlen} tokens "
            f"(longest: {longest}); lower --seqlen or give a longer calibration text"
        )
    rng = random.Random(seed)
    encoded: dict[int, torch.Tensor] = {}
    windows = []
    for _ in range(nsamples):
        while True:
            i = rng.randint(0, len(texts) - 1)
            if lengths[i] > seqlen:
                break
        ids = encoded[i] if i in encoded else encoded.setdefault(i, _encode(tokenizer, texts[i]))
        start = rng.randint(0, len(ids) - seqlen - 1)
        windows.append(ids[start : start + seqlen])
    return torch.stack(windows)


def calibration(tokenizer, config, data_dir: str | os.PathLike | None = None) -> torch.Tensor | None:
    """The calibration windows a ``PruneConfig`` asks for: ``config.nsamples`` windows of
    ``config.seqlen`` tokens of ``config.calibration`` drawn with ``config.seed``, read from
    ``data_dir`` (None: $ZPRUNER_DATA_DIR, else the hub); None when its method reads no data."""
    if not config.needs_calibration:
        return None
    texts = load_texts(config.calibration, data_dir)
    return calibration_windows(tokenizer, texts, config.nsamples, config.seqlen, config.seed)


def eval_tokens(tokenizer, texts: list[str]) -> torch.Tensor:
    """The evaluation corpus as one sequence [1, N]: rows joined by blank lines, tokenised once."""
    return _encode(tokenizer, "\n\n".join(texts))[None]


def token_digest(tokens: torch.Tensor) -> str:
    """Short content hash of token ids, recorded so two runs can prove they saw the same data."""
    return hashlib.sha256(tokens.to(torch.int64).cpu().numpy().tobytes()).hexdigest()[:16]
