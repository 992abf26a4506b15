"""Model families, each one registered :class:`~lmeval_dllm.models.family.Family` object.

``load_model(pretrained)`` reads config.json itself (no ``trust_remote_code``), finds the family whose
architectures (or, for a config without any, ``model_type``) it names, builds our compact module on the meta
device and fills it from the official safetensors shards.

Adding a family: write ``models/<name>.py`` with its ``parse_config``, ``weight_names``, tiny checkpoint builder
and ``FAMILY = Family(...)``, and add it to :data:`FAMILIES` below (docs/architecture.md).
"""

from __future__ import annotations

from typing import Optional

import torch

from lmeval_dllm.models import dream, fast_dllm_v2, llada, llada2, llada_moe, sdar
from lmeval_dllm.models.family import Family, TinyTokenizer
from lmeval_dllm.models.loading import Slot, load_weights, read_config, resolve_checkpoint_dir
from lmeval_dllm.models.lora import lora_deltas
from lmeval_dllm.models.transformer import DiffusionLM, LayerHooks, ModelArgs, MoEArgs

FAMILIES: dict[str, Family] = {
    llada.FAMILY.name: llada.FAMILY,  # GSAI-ML/LLaDA-8B-Base, GSAI-ML/LLaDA-8B-Instruct, GSAI-ML/LLaDA-1.5
    dream.FAMILY.name: dream.FAMILY,  # Dream-org/Dream-v0-Base-7B, Dream-org/Dream-v0-Instruct-7B
    llada_moe.FAMILY.name: llada_moe.FAMILY,  # inclusionAI/LLaDA-MoE-7B-A1B-Base, -Instruct, -Instruct-TD
    llada2.FAMILY.name: llada2.FAMILY,  # inclusionAI/LLaDA2.0-mini, LLaDA2.0-mini-preview, LLaDA2.1-mini
    sdar.FAMILY.name: sdar.FAMILY,  # JetLM/SDAR-1.7B/4B/8B-Chat (-b8 ... -b64), Gen-Verse/TraDo-4B/8B-Instruct
    fast_dllm_v2.FAMILY.name: fast_dllm_v2.FAMILY,  # Efficient-Large-Model/Fast_dLLM_v2_1.5B, _7B
}


def supported() -> str:
    """One line per registered family, for error messages."""
    return "; ".join(f.describe() for f in FAMILIES.values())


def block_causal_families() -> str:
    """The block-causal (block-diffusion) families, for messages: "sdar (...), llada2 (...)"."""
    return ", ".join(f"{f.name} ({f.checkpoints})" for f in FAMILIES.values() if f.block_causal)


def family_named(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; registered: {', '.join(FAMILIES)}") from None


def family_for(config: dict, source: str = "config.json") -> Family:
    """The registered family that reads this config.json (by architectures, else by model_type)."""
    matches = [f for f in FAMILIES.values() if f.matches(config)]
    if len(matches) == 1:
        return matches[0]
    what = f"model_type {config.get('model_type')!r}"
    if config.get("architectures"):
        what += f", architectures {config['architectures']}"
    if not matches:
        raise ValueError(f"unsupported checkpoint in {source} ({what}); supported: {supported()}")
    raise ValueError(f"{source} ({what}) matches several families: {', '.join(f.name for f in matches)}")


def parse_args(config: dict, source: str = "config.json") -> ModelArgs:
    return family_for(config, source).parse_config(config)


def load_model(
    pretrained: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    revision: Optional[str] = None,
    fuse: bool = True,
    peft: Optional[str] = None,
) -> DiffusionLM:
    """Load a checkpoint of a registered family (hub id or local directory) into our module, in eval mode.
    ``fuse``: fused elementwise CUDA kernels (``models/kernels.py``). ``peft``: a LoRA adapter (local directory or
    hub id) merged into the official weights (``models/lora.py``; needs the ``peft`` package)."""
    directory = resolve_checkpoint_dir(pretrained, revision)
    config = read_config(directory)
    family = family_for(config, f"{directory}/config.json")
    args = family.parse_config(config)
    names = family.weight_names(args)
    deltas = lora_deltas(peft, set(names), revision=revision) if peft else None
    with torch.device("meta"):
        model = DiffusionLM(args, fuse=fuse)
    load_weights(model, directory, names, device=torch.device(device), dtype=dtype, ignore=family.ignore,
                 deltas=deltas)
    return model.eval().requires_grad_(False)


__all__ = ["DiffusionLM", "FAMILIES", "Family", "LayerHooks", "ModelArgs", "MoEArgs", "Slot", "TinyTokenizer",
           "block_causal_families", "family_for",
           "family_named", "load_model", "parse_args", "read_config", "resolve_checkpoint_dir", "supported"]
