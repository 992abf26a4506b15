"""LLaDA family (LLaDA-8B-Base, LLaDA-8B-Instruct, LLaDA-1.5): HF ``model_type`` "llada".

LLaDA (Nie et al., "Large Language Diffusion Models", arXiv:2502.09992) is a mask predictor: output row i is the
distribution of position i. Its checkpoints use OLMo-style names (``model.transformer.blocks.N.q_proj`` ...);
the official ``modeling_llada.py`` is read for the architecture, not imported (no remote code).
"""

from __future__ import annotations

from lmeval_dllm.models.common import ModelArgs, Slot

MODEL_TYPE = "llada"

# config.json values our module reproduces; anything else is an error naming the field.
_REQUIRED = {
    "block_type": "llama",
    "rope": True,
    "alibi": False,
    "layer_norm_type": "rms",
    "attention_layer_norm": False,
    "include_bias": False,
    "scale_logits": False,
    "input_emb_norm": False,
}


def parse_config(cfg: dict) -> ModelArgs:
    for key, want in _REQUIRED.items():
        if key in cfg and cfg[key] != want:
            raise ValueError(f"LLaDA config.json has {key}={cfg[key]!r}; only {key}={want!r} is supported")
    if cfg.get("activation_type", "silu") != "silu":
        raise ValueError(f"LLaDA config.json has activation_type={cfg['activation_type']!r}; only 'silu' is supported")
    d_model, n_heads = cfg["d_model"], cfg["n_heads"]
    return ModelArgs(
        family="llada",
        dim=d_model,
        n_layers=cfg["n_layers"],
        n_heads=n_heads,
        n_kv_heads=cfg.get("n_kv_heads") or n_heads,
        intermediate_size=cfg.get("mlp_hidden_size") or cfg.get("mlp_ratio", 4) * d_model,
        vocab_size=cfg.get("embedding_size") or cfg["vocab_size"],
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        qkv_bias=bool(cfg.get("include_qkv_bias", False)),
        rope_fp32=bool(cfg.get("rope_full_precision", True)),
        tie_embeddings=bool(cfg.get("weight_tying", False)),
        max_position=int(cfg.get("max_sequence_length", 4096)),
        mask_token_id=int(cfg.get("mask_token_id", 126336)),
        eos_token_id=cfg.get("eos_token_id", 126081),
        pad_token_id=cfg.get("pad_token_id", 126081),
        logit_shift=0,
    )


def weight_names(args: ModelArgs) -> dict[str, Slot]:
    """{official checkpoint name: where it goes in our module}."""
    q_rows, kv_rows = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    names = {
        "model.transformer.wte.weight": Slot("tok_embeddings.weight"),
        "model.transformer.ln_f.weight": Slot("norm.weight"),
    }
    if not args.tie_embeddings:
        names["model.transformer.ff_out.weight"] = Slot("output.weight")
    for i in range(args.n_layers):
        src, dst = f"model.transformer.blocks.{i}.", f"layers.{i}."
        kinds = ("weight", "bias") if args.qkv_bias else ("weight",)
        for kind in kinds:
            for part, (proj, rows) in enumerate((("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows))):
                names[f"{src}{proj}.{kind}"] = Slot(f"{dst}wqkv.{kind}", part, 3, rows)
        names.update({
            f"{src}attn_norm.weight": Slot(f"{dst}attn_norm.weight"),
            f"{src}attn_out.weight": Slot(f"{dst}wo.weight"),
            f"{src}ff_norm.weight": Slot(f"{dst}mlp_norm.weight"),
            f"{src}ff_proj.weight": Slot(f"{dst}w13.weight", 0, 2, args.intermediate_size),  # gate
            f"{src}up_proj.weight": Slot(f"{dst}w13.weight", 1, 2, args.intermediate_size),
            f"{src}ff_out.weight": Slot(f"{dst}w2.weight"),
        })
    return names


def ignore(name: str) -> bool:
    return False
