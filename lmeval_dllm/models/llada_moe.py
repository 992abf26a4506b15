"""LLaDA-MoE family (inclusionAI/LLaDA-MoE-7B-A1B-Base, -Instruct, -Instruct-TD): HF ``model_type`` "llada" like
dense LLaDA, but architecture ``LLaDAMoEModelLM`` with its own ``configuration_lladamoe.py``.

LLaDA-MoE (inclusionAI, 2025) is an OLMoE-shaped mask predictor: 16 layers, 64 SwiGLU experts of
which each token runs the top 8 (7B total, 1.4B active), a softmax router, per-head q/k RMSNorm before RoPE and
bidirectional attention. Output row i is the distribution of position i (no shift), as in LLaDA. Names follow
the release's ``modeling_lladamoe.py`` (``model.layers.N.mlp.experts.E.gate_proj`` ...), read for the
architecture, not imported (no remote code).

Release details reproduced here (``modeling_lladamoe.py``):

- the router's top-k probabilities are *not* renormalised: ``LLaDAMoESparseMoeBlock`` sets
  ``norm_topk_prob = False`` whatever config.json says;
- RoPE is HF's: cos/sin cast to the model dtype, rotation in the model dtype (``rope_fp32=False``);
- q/k RMSNorm has one weight of ``head_dim`` shared by all heads, applied to q and k before RoPE;
- a shared expert (``model.layers.N.shared_expert``), when ``shared_expert_intermediate_size`` is set, is added
  to the experts' sum; a layer with ``moe_layer_freq[i] == 0`` has a dense MLP of ``dense_intermediate_size``.
"""

from __future__ import annotations

from lmeval_dllm.models.family import Family, TinyTokenizer
from lmeval_dllm.models.loading import Slot, config_checks, hf_decoder_names, moe_mlp_names
from lmeval_dllm.models.transformer import ModelArgs, MoEArgs

MASK_TOKEN_ID = 156895  # <|mask|>: the release's generate(mask_id=156895); config.json has no mask_token_id
EOS_TOKEN_ID = 156892  # <|endoftext|>


_NEEDED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "num_experts",
           "num_experts_per_tok", "expert_intermediate_size")


def parse_config(cfg: dict) -> ModelArgs:
    unsupported = config_checks(cfg, _NEEDED, label="LLaDA-MoE", architecture="LLaDAMoEModelLM")
    if cfg.get("hidden_act", "silu") != "silu":
        unsupported("hidden_act", "'silu'")
    if cfg.get("moe_router_score_function", "softmax") not in (None, "softmax"):
        unsupported("moe_router_score_function", "'softmax'")
    if cfg.get("moe_router_enable_expert_bias"):
        unsupported("moe_router_enable_expert_bias", "false (no expert bias)")
    if cfg.get("attention_bias"):
        unsupported("attention_bias", "false")
    if cfg.get("clip_qkv") is not None:
        unsupported("clip_qkv", "null")
    if cfg.get("rope_scaling"):
        unsupported("rope_scaling", "null (plain RoPE)")
    if float(cfg.get("partial_rotary_factor", 1.0)) not in (1.0, -1.0):  # -1: the config class's "unset"
        unsupported("partial_rotary_factor", "1.0")
    if cfg.get("routed_scaling_factor", 1) != 1:
        unsupported("routed_scaling_factor", "1 (the release's block does not read it)")
    n_layers = cfg["num_hidden_layers"]
    freq = cfg.get("moe_layer_freq") or [1] * n_layers
    if len(freq) != n_layers or any(f not in (0, 1) for f in freq):
        raise ValueError(f"LLaDA-MoE config.json has moe_layer_freq={freq!r}; expected {n_layers} entries of 0 "
                         f"(dense MLP) or 1 (MoE)")
    dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    return ModelArgs(
        family="llada_moe",
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        intermediate_size=cfg.get("dense_intermediate_size") or 0,  # the dense layers' MLP (none in the release)
        vocab_size=cfg["vocab_size"],
        rope_theta=float(cfg.get("rope_theta", 50000.0)),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        qkv_bias=False,
        rope_fp32=False,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position=int(cfg.get("max_position_embeddings", 8192)),
        mask_token_id=int(cfg.get("mask_token_id") or MASK_TOKEN_ID),
        eos_token_id=cfg.get("eos_token_id", EOS_TOKEN_ID),
        pad_token_id=cfg.get("pad_token_id", EOS_TOKEN_ID),
        logit_shift=0,
        qk_norm=bool(cfg.get("qk_layernorm", True)),
        moe=MoEArgs(
            num_experts=cfg["num_experts"],
            top_k=cfg["num_experts_per_tok"],
            expert_intermediate_size=cfg["expert_intermediate_size"],
            shared_intermediate_size=cfg.get("shared_expert_intermediate_size") or None,
            norm_topk_prob=False,  # hard-coded in LLaDAMoESparseMoeBlock.__init__, config.json is not read
            layers=tuple(bool(f) for f in freq),
        ),
    )


def weight_names(args: ModelArgs) -> dict[str, Slot]:
    """{official checkpoint name: where it goes in our module}: the HF layout (no q/k/v bias), q/k norms, and per
    layer either the dense MLP or the router, the stacked experts and the shared expert."""
    names = hf_decoder_names(args, qkv_bias=False)
    for i in range(args.n_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        if args.qk_norm:
            names[f"{src}self_attn.q_norm.weight"] = Slot(f"{dst}q_norm.weight")
            names[f"{src}self_attn.k_norm.weight"] = Slot(f"{dst}k_norm.weight")
        names.update(moe_mlp_names(args, i, shared="shared_expert."))
    return names


# LLaDA-MoE-7B-A1B-Instruct's chat format (Ling / Bailing): <role>HUMAN</role>...<|role_end|><role>ASSISTANT</role>.
LLADA_MOE_CHAT_TEMPLATE = (
    "{% for message in messages %}{% set role = {'system': 'SYSTEM', 'user': 'HUMAN', 'assistant': 'ASSISTANT'}"
    "[message['role']] %}{{ '<role>' + role + '</role>' + message['content'] + '<|role_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<role>ASSISTANT</role>' }}{% endif %}"
)


def tiny_config(ids: dict[str, int], *, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, expert_intermediate_size=32,
                 dense_intermediate_size=128, shared_expert_intermediate_size=None, moe_layer_freq=None,
                 tie_word_embeddings=False, rope_theta=50000.0) -> dict:
    """A config.json with the keys and values of inclusionAI/LLaDA-MoE-7B-A1B-Instruct, only smaller."""
    return {
        "architectures": ["LLaDAMoEModelLM"], "attention_bias": False, "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_lladamoe.LLaDAConfig",
                     "AutoModel": "modeling_lladamoe.LLaDAMoEModelLM",
                     "AutoModelForCausalLM": "modeling_lladamoe.LLaDAMoEModelLM"},
        "clip_qkv": None, "dense_intermediate_size": dense_intermediate_size, "eos_token_id": ids["eos"],
        "expert_intermediate_size": expert_intermediate_size, "hidden_act": "silu", "hidden_size": hidden_size,
        "initializer_range": 0.02, "max_position_embeddings": 8192, "model_type": "llada",
        "moe_layer_freq": moe_layer_freq or [1] * num_hidden_layers, "moe_router_enable_expert_bias": False,
        "moe_router_score_function": "softmax", "norm_topk_prob": False,
        "num_attention_heads": num_attention_heads, "num_experts": num_experts,
        "num_experts_per_tok": num_experts_per_tok, "num_hidden_layers": num_hidden_layers,
        "num_key_value_heads": num_key_value_heads, "output_router_logits": False, "pad_token_id": ids["pad"],
        "partial_rotary_factor": 1, "qk_layernorm": True, "rms_norm_eps": 1e-05, "rope_scaling": None,
        "rope_theta": rope_theta, "routed_scaling_factor": 1, "router_aux_loss_coef": 0.01,
        "router_num_group": None, "router_topk_group": None,
        "shared_expert_intermediate_size": shared_expert_intermediate_size,
        "tie_word_embeddings": tie_word_embeddings, "torch_dtype": "float32", "use_cache": False,
        "vocab_size": ((ids["vocab"] + 7) // 8) * 8, "mask_token_id": ids["mask"],
    }


FAMILY = Family(
    name="llada_moe",
    checkpoints="inclusionAI/LLaDA-MoE-7B-A1B-Base, inclusionAI/LLaDA-MoE-7B-A1B-Instruct, "
                "inclusionAI/LLaDA-MoE-7B-A1B-Instruct-TD",
    model_types=("llada",),
    architectures=("LLaDAMoEModelLM", "LLaDAMoEModel"),
    parse_config=parse_config,
    weight_names=weight_names,
    likelihood="llada",  # a LLaDA mask predictor: LLaDA's Monte-Carlo estimate
    end_of_turn=("<|role_end|>",),
    tiny_config=tiny_config,
    tiny_tokenizer=TinyTokenizer(
        specials=("<|endoftext|>", "<role>", "</role>", "<|role_end|>", "<|mask|>"),
        roles=dict(bos="<|endoftext|>", eos="<|endoftext|>", eot="<|role_end|>", mask="<|mask|>",
                   pad="<|endoftext|>"),
        chat_template=LLADA_MOE_CHAT_TEMPLATE,
    ),
)
