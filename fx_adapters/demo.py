"""A one-minute tour on a tiny Llama built from a config (no downloads): ``python -m fx_adapters demo``."""

from __future__ import annotations

import time

import torch


def tiny_llama():
    """A small random Llama (2 layers, hidden 64) in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def run(print_=print) -> float:
    """Compile two RoAd adapters, run a mixed batch, check it sample by sample; returns the max abs diff."""
    import fx_adapters as fxa

    model = tiny_llama()
    start = time.perf_counter()
    am = fxa.compile_with_road(model, fxa.RoadConfig(variant="road_1", group_size=16, init_weights=False,
                                                     target_modules="all-linear"), adapter_name="math")
    am.add_adapter("code", fxa.RoadConfig(variant="road_4", group_size=8, init_weights=False,
                                          target_modules=["q_proj", "v_proj"]))
    print_(f"captured and rewrote {type(model).__name__} in {time.perf_counter() - start:.1f} s")
    print_(f"{'module':<36} {'kind':<7} {'in':>5} {'out':>5}  adapters")
    for t in am.targets:
        users = [name for name in am.adapters if t in am.adapter_targets(name)]
        print_(f"{t.name:<36} {t.kind:<7} {t.in_features:>5} {t.out_features:>5}  {', '.join(users)}")

    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(0))
    names = ["math", "code", "__base__"]
    with torch.inference_mode():
        mixed = am(input_ids=ids, adapter_names=names).logits
        worst = 0.0
        for i, name in enumerate(names):
            if name == "__base__":
                with am.disable_adapters():
                    alone = am(input_ids=ids[i:i + 1]).logits
            else:
                am.set_adapter(name)
                alone = am(input_ids=ids[i:i + 1]).logits
            worst = max(worst, (mixed[i:i + 1] - alone).abs().max().item())
    print_(f"mixed batch {names}: max abs diff to one-adapter runs = {worst:.2e}")
    return worst
