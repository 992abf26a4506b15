"""LLaDA family (LLaDA-8B-Base, LLaDA-8B-Instruct, LLaDA-1.5, and fine-tunes in its layout: dParallel,
d3LLM-LLaDA, UltraLLaDA): HF ``model_type`` "llada", architecture ``LLaDAModelLM``.

LLaDA (Nie et al., "Large Language Diffusion Models", arXiv:2502.09992) is a mask predictor: output row i is the
distribution of position i. Its checkpoints use OLMo-style names (``model.transformer.blocks.N.q_proj`` ...);
the official ``modeling_llada.py`` is read for the architecture, not imported (no remote code).
"""

from __future__ import annotations

from lmeval_dllm.models.family import Family, TinyTokenizer
from lmeval_dllm.models.loading import Slot
from lmeval_dllm.models.transformer import ModelArgs

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
    if cfg.get("rope_scaling"):
        # modeling_llada.py has no RoPE scaling; a long-context release (UltraLLaDA) extends the context through
        # rope_theta and max_sequence_length, which we read. A scaling dict would be another architecture.
        raise ValueError(f"LLaDA config.json has rope_scaling={cfg['rope_scaling']!r}; only plain RoPE (its "
                         f"rope_theta) is supported")
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


# LLaDA-8B-Instruct's chat template (Llama-3 style, BOS before the first message, content trimmed).
LLADA_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)


def tiny_config(ids: dict[str, int], *, d_model=64, n_layers=2, n_heads=4, n_kv_heads=None, mlp_hidden_size=128,
                 embedding_size=None, weight_tying=False, rope_theta=500000.0, max_sequence_length=4096) -> dict:
    """A config.json with the keys and values of GSAI-ML/LLaDA-8B-Instruct, only smaller."""
    vocab = ids["vocab"]
    return {
        "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
        "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": d_model,
        "embedding_dropout": 0.0, "embedding_size": embedding_size or ((vocab + 7) // 8) * 8,
        "eos_token_id": ids["eos"], "flash_attention": False, "include_bias": False, "include_qkv_bias": False,
        "init_device": "meta", "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False,
        "layer_norm_type": "rms", "layer_norm_with_affine": True, "mask_token_id": ids["mask"],
        "max_sequence_length": max_sequence_length, "mlp_hidden_size": mlp_hidden_size, "mlp_ratio": 4,
        "model_type": "llada", "multi_query_attention": None, "n_heads": n_heads,
        "n_kv_heads": n_kv_heads or n_heads, "n_layers": n_layers, "pad_token_id": ids["pad"],
        "precision": "amp_bf16", "residual_dropout": 0.0, "rms_norm_eps": 1e-05, "rope": True,
        "rope_full_precision": True, "rope_theta": rope_theta, "scale_logits": False, "use_cache": False,
        "vocab_size": vocab, "weight_tying": weight_tying,
    }


FAMILY = Family(
    name="llada",
    checkpoints="GSAI-ML/LLaDA-8B-Base, GSAI-ML/LLaDA-8B-Instruct, GSAI-ML/LLaDA-1.5, "
                "Zigeng/dParallel-LLaDA-8B-instruct, d3LLM/d3LLM_LLaDA, UltraLLaDA",
    model_types=("llada",),
    architectures=("LLaDAModelLM",),
    parse_config=parse_config,
    weight_names=weight_names,
    likelihood="llada",  # ML-GSAI/LLaDA get_log_likelihood.py
    end_of_turn=("<|eot_id|>",),
    tiny_config=tiny_config,
    tiny_tokenizer=TinyTokenizer(
        specials=("<|startoftext|>", "<|endoftext|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|mdm_mask|>"),
        roles=dict(bos="<|startoftext|>", eos="<|endoftext|>", eot="<|eot_id|>", mask="<|mdm_mask|>",
                   pad="<|endoftext|>"),
        chat_template=LLADA_CHAT_TEMPLATE,
    ),
)
