"""Dream family (Dream-v0-Base-7B, Dream-v0-Instruct-7B, and the releases in its layout: Dream-Coder-v0,
DiffuCoder, d3LLM-Dream): HF ``model_type`` "Dream", architecture ``DreamModel``.

Dream (Ye et al., "Dream 7B: Diffusion Large Language Models", arXiv:2508.15487) is initialised from Qwen2.5 and
keeps its autoregressive alignment: output row i-1 carries the distribution of position i. ``logit_shift = 1``
tells :meth:`DiffusionLM.predict` to read target column t from row t-1, so samplers never see the shift.
Architecture and names follow the official ``modeling_dream.py`` (Qwen2: q/k/v bias, GQA, RoPE in model dtype).
"""

from __future__ import annotations

from lmeval_dllm.models.family import Family, TinyTokenizer
from lmeval_dllm.models.loading import Slot, hf_decoder_names, hf_model_args, swiglu_names
from lmeval_dllm.models.transformer import ModelArgs


def parse_config(cfg: dict) -> ModelArgs:
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"Dream config.json has hidden_act={cfg['hidden_act']!r}; only 'silu' is supported")
    if cfg.get("rope_scaling"):
        raise ValueError(f"Dream config.json has rope_scaling={cfg['rope_scaling']!r}; only plain RoPE is supported")
    if cfg.get("use_sliding_window"):
        raise ValueError("Dream config.json has use_sliding_window=true; only full attention is supported")
    return hf_model_args(
        cfg,
        family="dream",
        rope_theta=10000.0,
        qkv_bias=True,
        rope_fp32=False,
        mask_token_id=int(cfg.get("mask_token_id", 151666)),
        eos_token_id=cfg.get("eos_token_id", 151643),
        pad_token_id=cfg.get("pad_token_id", 151643),
        logit_shift=1,
    )


def weight_names(args: ModelArgs) -> dict[str, Slot]:
    """{official checkpoint name: where it goes in our module}: the HF Qwen2 layout, q/k/v with bias."""
    names = hf_decoder_names(args, qkv_bias=True)
    for i in range(args.n_layers):
        names.update(swiglu_names(f"model.layers.{i}.mlp.", f"layers.{i}.w13.weight", f"layers.{i}.w2.weight",
                                  args.intermediate_size))
    return names


def ignore(name: str) -> bool:
    # Some Qwen2-derived exports carry the (recomputable) RoPE buffer.
    return name.endswith("rotary_emb.inv_freq")


# Dream-v0-Instruct's chat template (Qwen2 style, default system prompt).
DREAM_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_config(ids: dict[str, int], *, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=False,
                 rope_theta=1000000.0) -> dict:
    """A config.json with the keys and values of Dream-org/Dream-v0-Instruct-7B, only smaller."""
    return {
        "architectures": ["DreamModel"], "attention_dropout": 0.0, "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"], "hidden_act": "silu", "hidden_size": hidden_size, "initializer_range": 0.02,
        "intermediate_size": intermediate_size, "mask_token_id": ids["mask"], "max_position_embeddings": 131072,
        "max_window_layers": num_hidden_layers, "model_type": "Dream", "num_attention_heads": num_attention_heads,
        "num_hidden_layers": num_hidden_layers, "num_key_value_heads": num_key_value_heads,
        "pad_token_id": ids["pad"], "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": rope_theta,
        "sliding_window": None, "tie_word_embeddings": tie_word_embeddings, "torch_dtype": "float32",
        "use_cache": False, "use_sliding_window": False, "vocab_size": ((ids["vocab"] + 7) // 8) * 8,
    }


FAMILY = Family(
    name="dream",
    checkpoints="Dream-org/Dream-v0-Base-7B, Dream-org/Dream-v0-Instruct-7B, Dream-org/Dream-Coder-v0-Base-7B, "
                "Dream-org/Dream-Coder-v0-Instruct-7B, apple/DiffuCoder-7B-Base, apple/DiffuCoder-7B-Instruct, "
                "apple/DiffuCoder-7B-cpGRPO, d3LLM/d3LLM_Dream",
    model_types=("Dream",),
    architectures=("DreamModel",),
    parse_config=parse_config,
    weight_names=weight_names,
    likelihood="dream",  # DreamLM/Dream eval/eval.py, _eval_target_nll_mc
    # DiffuCoder's tokenizer pads with <|dlm_pad|> (151667), which fills the tail of an answer; its README cuts the
    # answer there
    end_of_turn=("<|im_end|>", "<|dlm_pad|>"),
    tiny_config=tiny_config,
    tiny_tokenizer=TinyTokenizer(
        specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"),
        roles=dict(bos="<|endoftext|>", eos="<|endoftext|>", eot="<|im_end|>", mask="<|mask|>",
                   pad="<|endoftext|>"),
        chat_template=DREAM_CHAT_TEMPLATE,
    ),
    ignore=ignore,
)

# DiffuCoder's tokenizer (apple/DiffuCoder-7B-*): after Qwen2's specials, <|beginoftext|> 151665, <|mask|> 151666 and
# its own pad <|dlm_pad|> 151667, which fills the tail of an answer. For tiny checkpoints in its layout
# (``lmeval_dllm.tiny.write_checkpoint(dir, "dream", tokenizer=DIFFUCODER_TOKENIZER)``).
DIFFUCODER_TOKENIZER = TinyTokenizer(
    specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|beginoftext|>", "<|mask|>", "<|dlm_pad|>"),
    roles=dict(bos="<|beginoftext|>", eos="<|endoftext|>", eot="<|im_end|>", mask="<|mask|>", pad="<|dlm_pad|>"),
    chat_template=DREAM_CHAT_TEMPLATE,
)
