"""Fast-dLLM v2 family (Efficient-Large-Model/Fast_dLLM_v2_1.5B, _7B): HF ``model_type`` "Fast_dLLM_Qwen",
architecture ``Fast_dLLM_QwenForCausalLM``.

Fast-dLLM v2 (Wu et al., "Fast-dLLM v2: Efficient Block-Diffusion LLM", arXiv:2509.26328) fine-tunes Qwen2.5
(-1.5B / -7B-Instruct) into a *block* diffusion LM. The network is Qwen2's, unchanged (q/k/v bias, GQA, RoPE in the
model dtype, tied embeddings on the 1.5B), and it keeps the autoregressive alignment as Dream does: output row t-1
carries the distribution of position t (``logit_shift = 1``; the release's generation shifts the logits with
``cat([logits[:, :1], logits[:, :-1]])``). What differs from Dream is the attention at inference: block-causal
over blocks of ``bd_size`` = 32 positions counted from the first prompt token (``eval_block_diff_mask`` in the
release's ``modeling.py``: query q sees key k iff ``k // 32 <= q // 32``). ``parse_config`` puts that block size in
``ModelArgs.block_size``; the attention applies it (the block-causal seam of ``models/transformer.py``).

Names, shapes and the network are Dream's (``dream.weight_names``): only the family, the config layout, the mask
token ``|<MASK>|`` (151665, a constant of the release's code: its config.json has no mask id) and the block size
are Fast-dLLM v2's own.
"""

from __future__ import annotations

from lmeval_dllm.models import dream
from lmeval_dllm.models.family import Family, TinyTokenizer
from lmeval_dllm.models.loading import hf_model_args
from lmeval_dllm.models.transformer import ModelArgs

MASK_TOKEN = "|<MASK>|"
MASK_TOKEN_ID = 151665  # generation_functions.py FAST_DLLM_MASK_ID, eval.py mask_id=151665
BLOCK_SIZE = 32  # config.json bd_size (and the block_size default of the release's forward and eval.py's bd_size)

# config.json keys of the release (Fast_dLLM_v2_7B; Qwen2.5's keys plus the Fast-dLLM ones) that we either read
# or that do not change inference; any other key is an error naming it.
_KNOWN = {
    "architectures", "attention_dropout", "auto_map", "bd_size", "bos_token_id", "eos_token_id", "hidden_act",
    "hidden_size", "initializer_range", "intermediate_size", "layer_types", "max_position_embeddings",
    "max_window_layers", "model_type", "num_attention_heads", "num_hidden_layers", "num_key_value_heads",
    "pad_token_id", "rms_norm_eps", "rope_scaling", "rope_theta", "sliding_window", "tie_word_embeddings",
    "torch_dtype", "transformers_version", "use_cache", "use_sliding_window", "vocab_size", "head_dim",
    "mask_token_id", "_name_or_path",
    # training only: the complementary-mask objective (the release's spelling, and the corrected one)
    "conplemenrary_mask", "complementary_mask",
}


def parse_config(cfg: dict) -> ModelArgs:
    unknown = sorted(set(cfg) - _KNOWN)
    if unknown:
        raise ValueError(f"Fast-dLLM v2 config.json has {', '.join(unknown)}, which this module does not reproduce "
                         f"(known: the release's Qwen2.5 keys and bd_size)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"Fast-dLLM v2 config.json has hidden_act={cfg['hidden_act']!r}; only 'silu' is supported")
    if cfg.get("rope_scaling"):
        raise ValueError(f"Fast-dLLM v2 config.json has rope_scaling={cfg['rope_scaling']!r}; only null (plain RoPE) "
                         "is supported")
    if cfg.get("use_sliding_window"):
        raise ValueError("Fast-dLLM v2 config.json has use_sliding_window=true; only full attention is supported")
    layer_types = cfg.get("layer_types")
    if layer_types is not None and set(layer_types) != {"full_attention"}:
        raise ValueError(f"Fast-dLLM v2 config.json has layer_types={sorted(set(layer_types))}; only "
                         "'full_attention' is supported")
    dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    if cfg.get("head_dim") not in (None, dim // n_heads):
        raise ValueError(f"Fast-dLLM v2 config.json has head_dim={cfg['head_dim']}; only hidden_size / "
                         f"num_attention_heads = {dim // n_heads} is supported")
    block_size = cfg.get("bd_size", BLOCK_SIZE)
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"Fast-dLLM v2 config.json has bd_size={block_size!r}; expected a positive integer")
    return hf_model_args(
        cfg,
        family="fast_dllm_v2",
        rope_theta=10000.0,
        qkv_bias=True,
        rope_fp32=False,  # HF Qwen2: cos/sin cast to the model dtype, q/k rotated in it
        mask_token_id=int(cfg.get("mask_token_id", MASK_TOKEN_ID)),
        eos_token_id=cfg.get("eos_token_id", 151645),
        pad_token_id=cfg.get("pad_token_id", 151645),
        logit_shift=1,
        block_size=block_size,
    )


# Qwen2.5-Instruct's chat template as the release ships it (Fast_dLLM_v2_7B chat_template.jinja), without its
# tool-calling branches: the same text for messages without tools or tool calls.
QWEN25_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
    "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}{%- for message in messages %}{%- if (message.role == 'user') "
    "or (message.role == 'system' and not loop.first) or (message.role == 'assistant') %}{{- '<|im_start|>' + "
    "message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}{%- if "
    "add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def tiny_config(ids: dict[str, int], *, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=True, rope_theta=1000000.0,
                 bd_size=BLOCK_SIZE) -> dict:
    """A config.json with the keys and values of Efficient-Large-Model/Fast_dLLM_v2_7B, only smaller (tied
    embeddings by default, as the 1.5B has). One key is added: ``mask_token_id``, because the release's mask id is
    a constant of its code (151665) that a tiny vocabulary does not reach."""
    return {
        "architectures": ["Fast_dLLM_QwenForCausalLM"], "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration.Fast_dLLM_QwenConfig", "AutoModel": "modeling.Fast_dLLM_QwenModel",
                     "AutoModelForCausalLM": "modeling.Fast_dLLM_QwenForCausalLM"},
        "bd_size": bd_size, "bos_token_id": ids["bos"], "conplemenrary_mask": True, "eos_token_id": ids["eos"],
        "hidden_act": "silu", "hidden_size": hidden_size, "initializer_range": 0.02,
        "intermediate_size": intermediate_size, "layer_types": ["full_attention"] * num_hidden_layers,
        "mask_token_id": ids["mask"], "max_position_embeddings": 32768, "max_window_layers": num_hidden_layers,
        "model_type": "Fast_dLLM_Qwen", "num_attention_heads": num_attention_heads,
        "num_hidden_layers": num_hidden_layers, "num_key_value_heads": num_key_value_heads,
        "pad_token_id": ids["eos"], "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": rope_theta,
        "sliding_window": None, "tie_word_embeddings": tie_word_embeddings, "torch_dtype": "float32",
        "transformers_version": "4.53.1", "use_cache": True, "use_sliding_window": False,
        "vocab_size": ((ids["vocab"] + 7) // 8) * 8,
    }


FAMILY = Family(
    name="fast_dllm_v2",
    checkpoints="Efficient-Large-Model/Fast_dLLM_v2_1.5B, Efficient-Large-Model/Fast_dLLM_v2_7B",
    model_types=("Fast_dLLM_Qwen",),
    architectures=("Fast_dLLM_QwenForCausalLM",),
    block_causal=True,
    # The release (v2/generation_functions.py, batch_sample) commits each block's first token greedily in the pass
    # that stores the previous block's K/V, decodes the rest in sub-blocks of small_block_size=8 with threshold 0.9
    # (v2/eval.py's defaults), and appends one greedy token after the last block.
    autoregressive_block_start=True,
    decoding_defaults={"vanilla": {"threshold": 0.9, "block_length": 8}},
    parse_config=parse_config,
    weight_names=dream.weight_names,  # the HF Qwen2 names, q/k/v with bias
    # The release's loglikelihood (v2/eval.py get_loglikelihood) scores only the first target token, masked, in
    # one forward; not one of our Monte-Carlo schemes, so only generation tasks run.
    likelihood=None,
    end_of_turn=("<|im_end|>",),
    tiny_config=tiny_config,
    # Qwen2.5's specials in their order (151643 <|endoftext|>, 151644 <|im_start|>, 151645 <|im_end|>), then the
    # release's added mask token (151665). EOS is <|im_end|> (special_tokens_map.json), padding <|endoftext|>;
    # Qwen2.5 has no BOS token (config.json's bos_token_id is <|endoftext|>).
    tiny_tokenizer=TinyTokenizer(
        specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>", MASK_TOKEN),
        roles=dict(bos="<|endoftext|>", eos="<|im_end|>", eot="<|im_end|>", mask=MASK_TOKEN, pad="<|endoftext|>"),
        chat_template=QWEN25_CHAT_TEMPLATE,
    ),
    ignore=dream.ignore,
)
