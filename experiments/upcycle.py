"""A mixture-of-experts model with real weights, made from a dense one by sparse upcycling
(Komatsuzaki et al. 2023): every block's MLP copied into E experts of a Mixtral model, a
small random router, the top-k routing weights renormalised to sum to one. Its function is
the dense model's (the k chosen experts are copies whose weights sum to one), while each
expert sees different tokens, so that pruning the experts on their own tokens makes them
differ. No real small MoE checkpoint is reachable offline; this one is honest about what
it is: SmolLM2's weights, reshaped.

    .venv/bin/python experiments/upcycle.py --out /tmp/smollm2-moe4   # SmolLM2, 4 experts, top-2

The folder loads with ``AutoModelForCausalLM.from_pretrained`` and with ``--model`` of
every zpruner command.
"""
from __future__ import annotations

import argparse

import torch
from transformers import LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

# Mixtral's fields a LLaMA config carries over as they are
SHARED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
          "rope_parameters", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")


def upcycle(dense: LlamaForCausalLM, experts: int = 4, top_k: int = 2, seed: int = 0,
            router_std: float = 0.02) -> MixtralForCausalLM:
    """A Mixtral model computing ``dense``'s function with ``experts`` copies of each MLP."""
    source = dense.config
    if getattr(source, "attention_bias", False) or getattr(source, "mlp_bias", False):
        raise ValueError("Mixtral has no biases in attention or MLP; this dense model has some")
    config = MixtralConfig(**{name: getattr(source, name) for name in SHARED if hasattr(source, name)},
                           num_local_experts=experts, num_experts_per_tok=top_k, router_jitter_noise=0.0,
                           sliding_window=None, dtype=dense.dtype)
    moe = MixtralForCausalLM(config).to(dense.dtype).eval()
    state = dense.state_dict()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in moe.state_dict().items():
            if name in state:  # embeddings, norms, attention, LM head
                tensor.copy_(state[name])
        for i, layer in enumerate(moe.model.layers):
            mlp = dense.model.layers[i].mlp
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            layer.mlp.experts.gate_up_proj.copy_(gate_up.expand(experts, *gate_up.shape))
            layer.mlp.experts.down_proj.copy_(mlp.down_proj.weight.expand(experts, *mlp.down_proj.weight.shape))
            router = torch.randn(layer.mlp.gate.weight.shape, generator=generator) * router_std
            layer.mlp.gate.weight.copy_(router)
    moe.tie_weights()
    return moe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="a dense LLaMA-family model (zpruner --model)")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="the router's random weights")
    parser.add_argument("--out", required=True, help="a new folder for the model")
    args = parser.parse_args()

    import zpruner

    dense, tokenizer = zpruner.load_model(zpruner.ModelConfig(args.model, device="cpu"))
    moe = upcycle(dense, args.experts, args.top_k, args.seed)
    ids = torch.randint(100, 1000, (1, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        gap = (moe(ids).logits - dense(ids).logits).abs().max().item()
    moe.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"{args.out}: {args.experts} experts, top-{args.top_k}; max |logit difference| to {args.model}: {gap:.2e}")


if __name__ == "__main__":
    main()
