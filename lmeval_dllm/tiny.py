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

from lmeval_dllm.models import FAMILIES, DiffusionLM, TinyTokenizer, family_for, family_named


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


def write_tokenizer(directory: str, family: str, spec: Optional[TinyTokenizer] = None) -> dict[str, int]:
    """Write a byte-level tokenizer with the family's special tokens and chat template (its
    ``Family.tiny_tokenizer``, or ``spec``: a release's own, e.g. ``models.dream.DIFFUCODER_TOKENIZER``).

    Returns the special-token ids by role (``bos``, ``eos``, ``eot``, ``mask``, ``pad``) and ``vocab``, the
    tokenizer's size.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    spec = spec or family_named(family).tiny_tokenizer
    byte_map = _bytes_to_unicode()
    vocab = {byte_map[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(spec.specials))
    kw = dict(bos_token=spec.roles["bos"], eos_token=spec.roles["eos"], pad_token=spec.roles["pad"],
              mask_token=spec.roles["mask"], chat_template=spec.chat_template)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **kw)
    fast.padding_side = "left"
    fast.save_pretrained(directory)
    # Like the official checkpoints, keep the class and the chat template inside tokenizer_config.json:
    # transformers 4.x knows neither the "TokenizersBackend" class name nor chat_template.jinja that 5.x writes.
    config_path = os.path.join(directory, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as f:
        tok_config = json.load(f)
    tok_config.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=spec.chat_template,
                      padding_side="left")
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(tok_config, f, indent=2)
    template_path = os.path.join(directory, "chat_template.jinja")
    if os.path.exists(template_path):
        os.remove(template_path)
    ids = {s: 256 + i for i, s in enumerate(spec.specials)}
    return {**{role: ids[token] for role, token in spec.roles.items()}, "vocab": 256 + len(spec.specials)}


def random_official_weights(config: dict, *, seed: int = 0, std: float = 0.5) -> dict[str, torch.Tensor]:
    """Random weights under the official names for ``config`` (norm weights near 1)."""
    family = family_for(config)
    args = family.parse_config(config)
    with torch.device("meta"):
        params = dict(DiffusionLM(args, fuse=False).named_parameters())
    params.setdefault("output.weight", params["tok_embeddings.weight"])  # a tied head is listed once
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, slot in family.weight_names(args).items():
        shape = _official_shape(params[slot.name], slot)
        if "norm" in name:
            tensors[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = shape[-1] if len(shape) > 1 else 1
            scale = std if "embed" in name or "wte" in name else std / fan_in ** 0.5 * 2
            tensors[name] = scale * torch.randn(shape, generator=g)
    return tensors


def _official_shape(param: torch.Tensor, slot) -> tuple[int, ...]:
    """Shape of the official tensor that fills ``slot`` of ``param`` (a piece of it, when fused along dim 0)."""
    return tuple(param.shape) if slot.parts == 1 else (slot.rows,) + tuple(param.shape[1:])


def official_state_dict(model, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """The inverse of loading: our module's parameters under the official checkpoint names.

    Fused parameters (``wqkv``, ``w13``) are cut back into the official pieces along dim 0, in the order and
    row counts the family's weight map gives, so ``write_checkpoint(weights=official_state_dict(m))`` writes
    what ``load_model`` reads back into an identical module.
    """
    family = family_named(model.args.family)
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
                     weights: Optional[dict[str, torch.Tensor]] = None, tokenizer: Optional[TinyTokenizer] = None,
                     **config_overrides) -> str:
    """Write a tiny random (or given) checkpoint of ``family`` (a name in ``lmeval_dllm.models.FAMILIES``) to
    ``directory``: config.json from the family's ``tiny_config`` with ``config_overrides``, its tokenizer (or a
    release's own, ``tokenizer``), sharded safetensors under the official names."""
    spec = family_named(family)
    os.makedirs(directory, exist_ok=True)
    ids = write_tokenizer(directory, family, tokenizer)
    config = spec.tiny_config(ids, **config_overrides)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    save_sharded(directory, weights if weights is not None else random_official_weights(config, seed=seed), shards)
    return directory


def llada_config(ids: dict[str, int], **overrides) -> dict:
    """config.json of a tiny LLaDA checkpoint (``lmeval_dllm.models.llada.tiny_config``)."""
    return FAMILIES["llada"].tiny_config(ids, **overrides)


def dream_config(ids: dict[str, int], **overrides) -> dict:
    """config.json of a tiny Dream checkpoint (``lmeval_dllm.models.dream.tiny_config``)."""
    return FAMILIES["dream"].tiny_config(ids, **overrides)
