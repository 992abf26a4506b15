"""SDAR family (JetLM/SDAR-1.7B-Chat, -4B-Chat, -8B-Chat and the -b8 ... -b64 block variants) and TraDo
(Gen-Verse/TraDo-4B-Instruct, -8B-Instruct, -8B-Thinking, trained from SDAR in its layout): HF ``model_type`` "sdar",
architecture ``SDARForCausalLM``.

SDAR ("SDAR: A Synergistic Diffusion-AutoRegression Paradigm for Scalable Sequence Generation",
arXiv:2510.06303) turns a Qwen3 checkpoint into a *block diffusion* model: attention is bidirectional inside a
block of ``block_size`` positions and causal across blocks, so the K/V of finished blocks is exact and is kept
(``cache=block``). TraDo (Wang et al., arXiv:2509.06949; Gen-Verse/dLLM-RL) is SDAR further trained with RL.
Architecture and names follow the release's ``modeling_sdar.py`` (Qwen3: no q/k/v bias, GQA, per-head q/k
RMSNorm before RoPE, ``head_dim`` from config.json, which need not be ``hidden_size / num_attention_heads``;
RoPE cos/sin in the model dtype), read for the architecture, not imported (no remote code). Output row i is the
distribution of position i (no shift). The block size is config.json's ``block_size``
(:attr:`ModelArgs.block_size`).

Release details: the attention mask of ``generate.py``'s ``block_diffusion_generate`` is block-lower-triangular
over blocks counted from position 0 (the mask of :func:`~lmeval_dllm.models.transformer.block_causal`);
``SDARRMSNorm`` is flash-attn's ``rms_norm_fn``, which multiplies by the weight in float32 before casting back
(ours casts back first, like HF Qwen3: equal in float32, within one rounding in bfloat16).
"""

from __future__ import annotations

from lmeval_dllm.models.family import Family, TinyTokenizer
from lmeval_dllm.models.loading import Slot, config_checks, hf_decoder_names, hf_model_args, swiglu_names
from lmeval_dllm.models.transformer import ModelArgs

MASK_TOKEN_ID = 151669  # <|MASK|> (config.json mask_token_id)
EOS_TOKEN_ID = 151643  # <|endoftext|>

_NEEDED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
           "block_size")


def parse_config(cfg: dict) -> ModelArgs:
    unsupported = config_checks(cfg, _NEEDED, label="SDAR", architecture="SDARForCausalLM")
    if cfg.get("hidden_act", "silu") != "silu":
        unsupported("hidden_act", "'silu'")
    if cfg.get("attention_bias"):
        unsupported("attention_bias", "false")
    if cfg.get("rope_scaling"):
        unsupported("rope_scaling", "null (plain RoPE)")
    if cfg.get("use_sliding_window"):
        unsupported("use_sliding_window", "false (full attention)")
    for key in ("num_experts", "moe_intermediate_size"):
        if cfg.get(key):
            unsupported(key, "a dense MLP (the SDAR-30B-A3B MoE checkpoints are not supported)")
    block = cfg["block_size"]
    if not isinstance(block, int) or block < 1:
        unsupported("block_size", "an integer >= 1")
    dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or dim // n_heads
    return hf_model_args(
        cfg,
        family="sdar",
        rope_theta=1000000.0,
        qkv_bias=False,
        rope_fp32=False,  # SDARRotaryEmbedding returns cos/sin in the model dtype
        mask_token_id=int(cfg.get("mask_token_id") or MASK_TOKEN_ID),
        eos_token_id=cfg.get("eos_token_id", EOS_TOKEN_ID),
        pad_token_id=cfg.get("pad_token_id", cfg.get("eos_token_id", EOS_TOKEN_ID)),
        logit_shift=0,
        qk_norm=True,
        block_size=block,
        head_dim_override=head_dim if head_dim != dim // n_heads else None,
    )


def weight_names(args: ModelArgs) -> dict[str, Slot]:
    """{official checkpoint name: where it goes in our module}: the HF Qwen3 layout (no q/k/v bias, q/k norms)."""
    names = hf_decoder_names(args, qkv_bias=False)
    for i in range(args.n_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        names[f"{src}self_attn.q_norm.weight"] = Slot(f"{dst}q_norm.weight")
        names[f"{src}self_attn.k_norm.weight"] = Slot(f"{dst}k_norm.weight")
        names.update(swiglu_names(f"{src}mlp.", f"{dst}w13.weight", f"{dst}w2.weight", args.intermediate_size))
    return names


def ignore(name: str) -> bool:
    return name.endswith("rotary_emb.inv_freq")  # a recomputable buffer some exports carry


# The chat format of SDAR-*-Chat (Qwen3's template without its tool-call and thinking branches; the tiny
# checkpoints' prompts use only system / user / assistant turns).
SDAR_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'"
    " + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tiny_config(ids: dict[str, int], *, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, intermediate_size=128, block_size=4,
                 tie_word_embeddings=False, rope_theta=1000000.0) -> dict:
    """A config.json with the keys and values of JetLM/SDAR-4B-Chat, only smaller (``head_dim`` != hidden /
    heads, as in SDAR-4B: 128 vs 2560 / 32)."""
    return {
        "architectures": ["SDARForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_sdar.SDARConfig", "AutoModel": "modeling_sdar.SDARModel",
                     "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM"},
        "attention_bias": False, "attention_dropout": 0.0, "attn_implementation": "flex_attention",
        "bos_token_id": ids["bos"], "debug": False, "eos_token_id": ids["eos"], "block_size": block_size,
        "mask_token_id": ids["mask"], "ep_size": 1, "fuse_cross_entropy": True, "head_dim": head_dim,
        "hidden_act": "silu", "hidden_size": hidden_size, "initializer_range": 0.02,
        "intermediate_size": intermediate_size, "max_position_embeddings": 32768,
        "max_window_layers": num_hidden_layers, "micro_forward": False, "model_type": "sdar",
        "num_attention_heads": num_attention_heads, "num_hidden_layers": num_hidden_layers,
        "num_key_value_heads": num_key_value_heads, "rms_norm_eps": 1e-06, "rope_scaling": None,
        "rope_theta": rope_theta, "skip_checkpoint": False, "sliding_window": None,
        "tie_word_embeddings": tie_word_embeddings, "torch_dtype": "float32", "transformers_version": "4.52.4",
        "use_cache": False, "use_deepep": False, "use_sliding_window": False,
        "vocab_size": ((ids["vocab"] + 7) // 8) * 8,
    }


FAMILY = Family(
    name="sdar",
    checkpoints="JetLM/SDAR-1.7B-Chat, JetLM/SDAR-4B-Chat, JetLM/SDAR-8B-Chat (and their -b8/-b16/-b32/-b64 "
                "block variants), Gen-Verse/TraDo-4B-Instruct, Gen-Verse/TraDo-8B-Instruct, "
                "Gen-Verse/TraDo-8B-Thinking",
    model_types=("sdar",),
    architectures=("SDARForCausalLM", "SDARModel"),
    parse_config=parse_config,
    weight_names=weight_names,
    likelihood=None,  # the release evaluates generation only (OpenCompass gen tasks); no likelihood scheme
    block_causal=True,
    end_of_turn=("<|im_end|>",),
    tiny_config=tiny_config,
    tiny_tokenizer=TinyTokenizer(
        specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|MASK|>"),
        roles=dict(bos="<|endoftext|>", eos="<|endoftext|>", eot="<|im_end|>", mask="<|MASK|>",
                   pad="<|endoftext|>"),
        chat_template=SDAR_CHAT_TEMPLATE,
    ),
    ignore=ignore,
)
