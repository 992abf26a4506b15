"""LLaDA2.0 / LLaDA2.1 family (inclusionAI/LLaDA2.0-mini, -mini-preview, LLaDA2.1-mini): HF ``model_type``
"llada2_moe", architecture ``LLaDA2MoeModelLM`` (``modeling_llada2_moe.py`` / ``configuration_llada2_moe.py``).

LLaDA2.0 (inclusionAI, arXiv:2512.15745) converts the Ling-mini-2.0 (BailingMoeV2) MoE into a block-diffusion mask
predictor: 20 layers, the first dense (``first_k_dense_replace``), the others 256 SwiGLU experts of which each
token runs 8 plus one shared expert, DeepSeek-V3-style routing (float32 sigmoid scores, an expert score-correction
bias that only chooses, group-limited top-k: 8 groups, 4 kept, weights renormalised and scaled by 2.5); 16
query / 4 KV heads of 128 with q/k RMSNorm and RoPE on the first half of each head (``partial_rotary_factor``
0.5); attention block-causal over blocks of 32 canvas columns. Output row i is the distribution of position i (no
shift). Names follow the release's file (``model.word_embeddings``, ``attention.query_key_value``, fused q/k/v,
``attention.dense``, ``mlp.gate.expert_bias`` ...), read for the architecture, not imported (no remote code).

Release details reproduced here (``modeling_llada2_moe.py``):

- ``LLaDA2MoeGate`` always scores with a sigmoid and always has ``expert_bias`` (a persistent buffer, so in the
  checkpoint); it renormalises the top-k scores whenever top_k > 1 (``+ 1e-20``) whatever ``norm_topk_prob``
  says, then multiplies by ``routed_scaling_factor``; the router's matmul runs in float32;
- ``moe_infer`` weights and sums the k expert outputs in float32 and casts back;
- the shared expert is one SwiGLU of ``moe_intermediate_size * num_shared_experts`` (``mlp.shared_experts``);
- RoPE: transformers' default frequencies over ``int(head_dim * partial_rotary_factor)`` dims, cos/sin cast to
  the model dtype, the rotated dims first (``q[..., :rotary_dim]``), each split in halves (``rotate_half``);
- q/k RMSNorm (``use_qk_norm``) over head_dim before RoPE; ``attention.dense`` has a bias when ``use_bias``
  (the config class defaults it to True); q/k/v bias when ``use_qkv_bias``;
- the block-causal attention of ``generate`` (``block_length`` 32, blocks counted from canvas column 0):
  ``ModelArgs.block_size``.

Fields the release does not read (``norm_head``, ``router_dtype``, ``moe_router_enable_expert_bias``,
``norm_topk_prob``, ``score_function`` when "sigmoid", dropouts) are accepted and have no effect here either.
"""

from __future__ import annotations

from lmeval_dllm.models.family import Family, TinyTokenizer
from lmeval_dllm.models.loading import Slot, config_checks, hf_model_args, moe_mlp_names
from lmeval_dllm.models.transformer import ModelArgs, MoEArgs

MASK_TOKEN_ID = 156895  # <|mask|>: the release's generate(mask_id=156895); config.json has no mask_token_id
EOS_TOKEN_ID = 156892  # <|endoftext|>: generate(eos_id=156892), also the pad token
BLOCK_SIZE = 32  # generate(block_length=32): the block of the block-causal attention the model was trained with

_NEEDED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "num_experts",
           "num_experts_per_tok", "moe_intermediate_size", "intermediate_size")


def parse_config(cfg: dict) -> ModelArgs:
    unsupported = config_checks(cfg, _NEEDED, label="LLaDA2", architecture="LLaDA2MoeModelLM", null_is_missing=True)
    if cfg.get("hidden_act", "silu") != "silu":
        unsupported("hidden_act", "'silu'")
    if cfg.get("score_function", "sigmoid") not in (None, "sigmoid"):
        unsupported("score_function", "'sigmoid' (LLaDA2MoeGate always scores with a sigmoid)")
    if cfg.get("rope_scaling"):
        unsupported("rope_scaling", "null (plain RoPE)")
    if cfg.get("use_sliding_window"):
        unsupported("use_sliding_window", "false")
    if cfg.get("num_nextn_predict_layers"):
        unsupported("num_nextn_predict_layers", "0 (no multi-token-prediction layers)")
    dim, n_heads, n_layers = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
    if cfg.get("head_dim") not in (None, dim // n_heads):
        unsupported("head_dim", f"hidden_size / num_attention_heads = {dim // n_heads}")
    factor = float(cfg.get("partial_rotary_factor", 1.0))
    rope_dim = int(dim // n_heads * factor)
    if not 0.0 < factor <= 1.0 or rope_dim % 2:
        unsupported("partial_rotary_factor", f"a value in (0, 1] giving an even number of rotated dims of "
                                             f"head_dim {dim // n_heads}")
    if cfg.get("rotary_dim") not in (None, rope_dim):
        unsupported("rotary_dim", f"partial_rotary_factor * head_dim = {rope_dim} (the release reads the factor)")
    E, k = cfg["num_experts"], cfg["num_experts_per_tok"]
    n_group, topk_group = cfg.get("n_group") or 1, cfg.get("topk_group") or 1
    if E % n_group or not 1 <= topk_group <= n_group or (topk_group < n_group and E // n_group < 2):
        raise ValueError(f"LLaDA2 config.json has num_experts={E}, n_group={n_group}, topk_group={topk_group}; "
                         f"expected n_group dividing num_experts, 1 <= topk_group <= n_group and, when groups "
                         f"limit the choice, at least 2 experts per group")
    if topk_group * (E // n_group) < k:
        raise ValueError(f"LLaDA2 config.json has num_experts_per_tok={k} but its topk_group={topk_group} groups "
                         f"hold only {topk_group * (E // n_group)} experts")
    shared = cfg.get("num_shared_experts")
    shared_size = cfg["moe_intermediate_size"] * shared if shared else None
    if cfg.get("moe_shared_expert_intermediate_size") not in (None, shared_size):
        unsupported("moe_shared_expert_intermediate_size",
                    f"moe_intermediate_size * num_shared_experts = {shared_size} (the release's shared expert)")
    first_dense = int(cfg.get("first_k_dense_replace") or 0)
    # intermediate_size is the MLP of the first_k_dense_replace dense layers
    return hf_model_args(
        cfg,
        family="llada2",
        rope_theta=10000.0,
        norm_eps=1e-5,
        max_position=16384,
        qkv_bias=bool(cfg.get("use_qkv_bias", False)),
        rope_fp32=False,  # HF's: cos/sin cast to the model dtype, rotation in the model dtype
        mask_token_id=int(cfg.get("mask_token_id") or MASK_TOKEN_ID),
        eos_token_id=cfg.get("eos_token_id", EOS_TOKEN_ID),
        pad_token_id=cfg.get("pad_token_id", EOS_TOKEN_ID),
        logit_shift=0,
        qk_norm=bool(cfg.get("use_qk_norm", False)),
        partial_rotary_factor=factor,
        attn_out_bias=bool(cfg.get("use_bias", True)),  # LLaDA2MoeConfig's default is True
        block_size=BLOCK_SIZE,
        moe=MoEArgs(
            num_experts=E,
            top_k=k,
            expert_intermediate_size=cfg["moe_intermediate_size"],
            shared_intermediate_size=shared_size,
            norm_topk_prob=k > 1,  # LLaDA2MoeGate: renormalised iff top_k > 1, norm_topk_prob is not read
            layers=tuple(i >= first_dense for i in range(n_layers)),
            score_function="sigmoid",
            expert_bias=True,
            n_group=n_group,
            topk_group=topk_group,
            routed_scaling_factor=float(cfg.get("routed_scaling_factor", 2.5)),
            norm_topk_eps=1e-20,
            weights_fp32=True,
            router_fp32=True,
        ),
    )


def weight_names(args: ModelArgs) -> dict[str, Slot]:
    """{official checkpoint name: where it goes in our module}: the release's names, fused q/k/v as one tensor
    ([q heads; k heads; v heads] along dim 0, our ``wqkv`` layout), per layer the dense MLP or the router with its
    bias, the stacked experts and the shared expert."""
    names = {"model.word_embeddings.weight": Slot("tok_embeddings.weight"), "model.norm.weight": Slot("norm.weight")}
    if not args.tie_embeddings:
        names["lm_head.weight"] = Slot("output.weight")
    for i in range(args.n_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        attn = f"{src}attention."
        names.update({
            f"{src}input_layernorm.weight": Slot(f"{dst}attn_norm.weight"),
            f"{src}post_attention_layernorm.weight": Slot(f"{dst}mlp_norm.weight"),
            f"{attn}query_key_value.weight": Slot(f"{dst}wqkv.weight"),
            f"{attn}dense.weight": Slot(f"{dst}wo.weight"),
        })
        if args.qkv_bias:
            names[f"{attn}query_key_value.bias"] = Slot(f"{dst}wqkv.bias")
        if args.attn_out_bias:
            names[f"{attn}dense.bias"] = Slot(f"{dst}wo.bias")
        if args.qk_norm:
            names[f"{attn}query_layernorm.weight"] = Slot(f"{dst}q_norm.weight")
            names[f"{attn}key_layernorm.weight"] = Slot(f"{dst}k_norm.weight")
        names.update(moe_mlp_names(args, i, shared="mlp.shared_experts."))
    return names


# The Ling 2.0 chat format LLaDA2.0-mini is prompted with (dInfer's benchmarks/benchmark.py writes it by hand):
# <role>SYSTEM</role>detailed thinking off<|role_end|><role>HUMAN</role>...<|role_end|><role>ASSISTANT</role>.
# A system message replaces the default system text.
LLADA2_CHAT_TEMPLATE = (
    "{% if messages and messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = 'detailed thinking off' %}{% endif %}"
    "{{ '<role>SYSTEM</role>' + system + '<|role_end|>' }}"
    "{% for message in messages %}{% set role = {'user': 'HUMAN', 'assistant': 'ASSISTANT'}[message['role']] %}"
    "{{ '<role>' + role + '</role>' + message['content'] + '<|role_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<role>ASSISTANT</role>' }}{% endif %}"
)


def tiny_config(ids: dict[str, int], *, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=96, moe_intermediate_size=16, num_experts=16,
                 num_experts_per_tok=4, num_shared_experts=1, n_group=4, topk_group=2, first_k_dense_replace=1,
                 routed_scaling_factor=2.5, partial_rotary_factor=0.5, use_qk_norm=True, use_qkv_bias=False,
                 use_bias=False, tie_word_embeddings=False, rope_theta=600000.0) -> dict:
    """A config.json with the keys and values of inclusionAI/LLaDA2.0-mini, only smaller (plus ``mask_token_id``
    and ``eos_token_id`` for the tiny tokenizer's ids)."""
    return {
        "architectures": ["LLaDA2MoeModelLM"], "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
                     "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
                     "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM"},
        "embedding_dropout": 0.0, "eos_token_id": ids["eos"], "first_k_dense_replace": first_k_dense_replace,
        "head_dim": hidden_size // num_attention_heads, "hidden_act": "silu", "hidden_size": hidden_size,
        "initializer_range": 0.02, "intermediate_size": intermediate_size, "max_position_embeddings": 32768,
        "max_window_layers": num_hidden_layers, "model_type": "llada2_moe",
        "moe_intermediate_size": moe_intermediate_size, "moe_router_enable_expert_bias": True,
        "n_group": n_group, "norm_head": False, "norm_topk_prob": True,
        "num_attention_heads": num_attention_heads, "num_experts": num_experts,
        "num_experts_per_tok": num_experts_per_tok, "num_hidden_layers": num_hidden_layers,
        "num_key_value_heads": num_key_value_heads, "num_shared_experts": num_shared_experts,
        "output_dropout": 0.0, "output_router_logits": False, "pad_token_id": ids["pad"],
        "partial_rotary_factor": partial_rotary_factor, "rms_norm_eps": 1e-06, "rope_scaling": None,
        "rope_theta": rope_theta, "routed_scaling_factor": routed_scaling_factor, "router_dtype": "fp32",
        "score_function": "sigmoid", "tie_word_embeddings": tie_word_embeddings, "topk_group": topk_group,
        "torch_dtype": "float32", "use_bias": use_bias, "use_cache": False, "use_qk_norm": use_qk_norm,
        "use_qkv_bias": use_qkv_bias, "use_sliding_window": False,
        "vocab_size": ((ids["vocab"] + 7) // 8) * 8, "mask_token_id": ids["mask"],
    }


FAMILY = Family(
    name="llada2",
    checkpoints="inclusionAI/LLaDA2.0-mini, inclusionAI/LLaDA2.0-mini-preview, inclusionAI/LLaDA2.1-mini",
    model_types=("llada2_moe",),
    architectures=("LLaDA2MoeModelLM", "LLaDA2MoeModel"),
    parse_config=parse_config,
    weight_names=weight_names,
    likelihood=None,  # the release has no likelihood code; LLaDA's estimate assumes bidirectional attention
    block_causal=True,
    # LLaDA2.0's generate: threshold 0.95 with a floor of one token per step (steps=32 = block_length) is
    # vanilla's threshold rule (docs/models.md); LLaDA2.1's editing decoder has its release defaults built in.
    decoding_defaults={"vanilla": {"threshold": 0.95}},
    end_of_turn=("<|role_end|>",),
    tiny_config=tiny_config,
    tiny_tokenizer=TinyTokenizer(
        specials=("<|endoftext|>", "<role>", "</role>", "<|role_end|>", "<|mask|>"),
        roles=dict(bos="<|endoftext|>", eos="<|endoftext|>", eot="<|role_end|>", mask="<|mask|>",
                   pad="<|endoftext|>"),
        chat_template=LLADA2_CHAT_TEMPLATE,
    ),
)
