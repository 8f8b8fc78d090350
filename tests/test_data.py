"""Calibration sampling and evaluation text."""
import json
import random

import pytest
import torch

from zpruner.data import calibration_windows, eval_tokens, load_texts, resolve_data_dir
from zpruner.errors import ZprunerError


def reference_windows(tokenizer, texts, nsamples, seqlen, seed):
    """The SparseGPT/Wanda reference loop, written out as the data README describes it."""
    random.seed(seed)
    out = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(texts) - 1)
            enc = tokenizer(texts[i], return_tensors="pt")
            if enc.input_ids.shape[1] > seqlen:
                break
        start = random.randint(0, enc.input_ids.shape[1] - seqlen - 1)
        out.append(enc.input_ids[:, start : start + seqlen])
    return torch.cat(out)


def test_windows_match_the_reference_draw_order(tiny_tokenizer, tiny_data_dir):
    texts = load_texts("c4", tiny_data_dir)
    got = calibration_windows(tiny_tokenizer, texts, 6, 64, seed=3)
    assert got.shape == (6, 64)
    assert torch.equal(got, reference_windows(tiny_tokenizer, texts, 6, 64, 3))
    assert torch.equal(got, calibration_windows(tiny_tokenizer, texts, 6, 64, seed=3))
    assert not torch.equal(got, calibration_windows(tiny_tokenizer, texts, 6, 64, seed=4))


def test_too_short_text_is_a_clear_error(tiny_tokenizer):
    with pytest.raises(ZprunerError, match="no document is longer than seqlen=64"):
        calibration_windows(tiny_tokenizer, ["a short text", "another"], 2, 64, 0)
    with pytest.raises(ZprunerError, match="calibration text too short"):
        calibration_windows(tiny_tokenizer, [], 2, 64, 0)


def test_local_text_files(tmp_path):
    (tmp_path / "a.txt").write_text("one document\n\nstill the same one")
    assert load_texts(str(tmp_path / "a.txt")) == ["one document\n\nstill the same one"]
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "x"}) + "\n\n" + json.dumps({"text": "y"}) + "\n")
    assert load_texts(str(tmp_path / "b.jsonl")) == ["x", "y"]
    (tmp_path / "c.jsonl").write_text('{"content": "no text field"}\n')
    with pytest.raises(ZprunerError, match=r"c.jsonl:1 .*\"text\" field"):
        load_texts(str(tmp_path / "c.jsonl"))
    (tmp_path / "d.csv").write_text("x")
    with pytest.raises(ZprunerError, match=r"\.txt or \.jsonl"):
        load_texts(str(tmp_path / "d.csv"))
    with pytest.raises(ZprunerError, match="neither a dataset name"):
        load_texts(str(tmp_path / "missing.txt"))


def test_data_dir_option_env_and_errors(tmp_path, tiny_data_dir, monkeypatch):
    monkeypatch.setenv("ZPRUNER_DATA_DIR", str(tiny_data_dir))
    assert resolve_data_dir(None) == tiny_data_dir
    assert load_texts("wikitext2") == load_texts("wikitext2", tiny_data_dir)
    with pytest.raises(ZprunerError, match="does not exist.*--data-dir"):
        resolve_data_dir(tmp_path / "nowhere")
    with pytest.raises(ZprunerError, match="has no c4/"):
        load_texts("c4", tmp_path)


def test_eval_tokens_join_rows_with_blank_lines(tiny_tokenizer):
    rows = ["first row", "", "second row"]
    expected = tiny_tokenizer("first row\n\n\n\nsecond row", return_tensors="pt").input_ids
    assert torch.equal(eval_tokens(tiny_tokenizer, rows), expected)
