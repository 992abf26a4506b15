"""Tiny checkpoints in the official LLaDA / Dream layouts, for tests, demos and the bundled small model.

Nothing here downloads anything. :func:`write_checkpoint` writes what the hub would give you for the real
models, only small: ``config.json`` with the official keys, sharded ``*.safetensors`` with the official weight
names plus ``model.safetensors.index.json``, and tokenizer files (byte-level, 256 byte tokens + the family's
special tokens, and the family's chat template). Loading it goes through exactly the code that loads
LLaDA-8B or Dream-7B.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

# Special tokens per family, in the order their ids follow the 256 byte tokens.
LLADA_SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|eot_id|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|mdm_mask|>"]
DREAM_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]

# LLaDA-8B-Instruct's chat template (Llama-3 style, BOS before the first message, content trimmed).
LLADA_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
# Dream-v0-Instruct's chat template (Qwen2 style, default system prompt).
DREAM_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (token id = byte value)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tokenizer(directory: str, family: str) -> dict[str, int]:
    """Write a byte-level tokenizer with the family's special tokens and chat template.

    Returns the special-token ids by name (``mask``, ``eos``, ``eot``, ``bos``, ``pad``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_map = _bytes_to_unicode()
    vocab = {byte_map[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    specials = LLADA_SPECIALS if family == "llada" else DREAM_SPECIALS
    tok.add_special_tokens(specials)
    if family == "llada":
        kw = dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                  mask_token="<|mdm_mask|>", chat_template=LLADA_CHAT_TEMPLATE)
    else:
        kw = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                  mask_token="<|mask|>", chat_template=DREAM_CHAT_TEMPLATE)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **kw)
    fast.padding_side = "left"
    fast.save_pretrained(directory)
    # Like the official checkpoints, keep the class and the chat template inside tokenizer_config.json:
    # transformers 4.x knows neither the "TokenizersBackend" class name nor chat_template.jinja that 5.x writes.
    config_path = os.path.join(directory, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as f:
        tok_config = json.load(f)
    tok_config.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=kw["chat_template"],
                      padding_side="left")
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(tok_config, f, indent=2)
    template_path = os.path.join(directory, "chat_template.jinja")
    if os.path.exists(template_path):
        os.remove(template_path)
    ids = {s: 256 + i for i, s in enumerate(specials)}
    if family == "llada":
        return dict(bos=ids["<|startoftext|>"], eos=ids["<|endoftext|>"], eot=ids["<|eot_id|>"],
                    mask=ids["<|mdm_mask|>"], pad=ids["<|endoftext|>"], vocab=256 + len(specials))
    return dict(bos=ids["<|endoftext|>"], eos=ids["<|endoftext|>"], eot=ids["<|im_end|>"],
                mask=ids["<|mask|>"], pad=ids["<|endoftext|>"], vocab=256 + len(specials))


def llada_config(ids: dict[str, int], *, d_model=64, n_layers=2, n_heads=4, n_kv_heads=None, mlp_hidden_size=128,
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


def dream_config(ids: dict[str, int], *, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
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


def random_official_weights(config: dict, *, seed: int = 0, std: float = 0.5) -> dict[str, torch.Tensor]:
    """Random weights under the official names for ``config`` (norm weights near 1)."""
    from lmeval_dllm.models import family_of

    family = family_of(config)
    args = family.parse_config(config)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, slot in family.weight_names(args).items():
        shape = _official_shape(args, name, slot)
        if "norm" in name:
            tensors[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = shape[-1] if len(shape) > 1 else 1
            scale = std if "embed" in name or "wte" in name else std / fan_in ** 0.5 * 2
            tensors[name] = scale * torch.randn(shape, generator=g)
    return tensors


def _official_shape(args, name: str, slot) -> tuple[int, ...]:
    dims = {
        "tok_embeddings.weight": (args.vocab_size, args.dim),
        "norm.weight": (args.dim,),
        "output.weight": (args.vocab_size, args.dim),
    }
    if slot.name in dims:
        return dims[slot.name]
    leaf = slot.name.split(".", 2)[2]  # e.g. "wqkv.weight"
    if slot.parts > 1:
        return (slot.rows, args.dim) if leaf.endswith("weight") else (slot.rows,)
    return {
        "attn_norm.weight": (args.dim,), "mlp_norm.weight": (args.dim,),
        "wo.weight": (args.dim, args.n_heads * args.head_dim),
        "w2.weight": (args.dim, args.intermediate_size),
    }[leaf]


def official_state_dict(model, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """The inverse of loading: our module's parameters under the official checkpoint names.

    Fused parameters (``wqkv``, ``w13``) are cut back into the official pieces along dim 0, in the order and
    row counts the family's weight map gives, so ``write_checkpoint(weights=official_state_dict(m))`` writes
    what ``load_model`` reads back into an identical module.
    """
    from lmeval_dllm.models import dream, llada

    family = {"llada": llada, "dream": dream}[model.args.family]
    params = dict(model.named_parameters())
    params.setdefault("output.weight", model.output.weight)  # a tied head is listed once, under the embedding
    offsets: dict[str, list[tuple[int, str, int]]] = {}
    for key, slot in family.weight_names(model.args).items():
        offsets.setdefault(slot.name, []).append((slot.part, key, slot.rows))
    out = {}
    for name, pieces in offsets.items():
        full = params[name].detach()
        start = 0
        for _, key, rows in sorted(pieces):
            piece = full if len(pieces) == 1 else full[start:start + rows]
            start += rows
            out[key] = (piece if dtype is None else piece.to(dtype)).contiguous().cpu()
    return out


def save_sharded(directory: str, tensors: dict[str, torch.Tensor], shards: int = 2) -> None:
    """Write ``tensors`` as ``model-0000k-of-0000n.safetensors`` plus the index, like hub checkpoints."""
    from safetensors.torch import save_file

    names = list(tensors)
    per = -(-len(names) // shards)
    weight_map = {}
    for k in range(shards):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        chunk = {n: tensors[n].contiguous() for n in names[k * per:(k + 1) * per]}
        save_file(chunk, os.path.join(directory, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in chunk})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(directory, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def write_checkpoint(directory: str, family: str = "llada", *, seed: int = 0, shards: int = 2,
                     weights: Optional[dict[str, torch.Tensor]] = None, **config_overrides) -> str:
    """Write a tiny random (or given) checkpoint of ``family`` ("llada" | "dream") to ``directory``."""
    if family not in ("llada", "dream"):
        raise ValueError(f"family must be 'llada' or 'dream', got {family!r}")
    os.makedirs(directory, exist_ok=True)
    ids = write_tokenizer(directory, family)
    config = (llada_config if family == "llada" else dream_config)(ids, **config_overrides)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    save_sharded(directory, weights if weights is not None else random_official_weights(config, seed=seed), shards)
    return directory
