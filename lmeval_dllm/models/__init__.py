"""Model families, keyed by the ``model_type`` of their config.json.

``load_model(pretrained)`` reads config.json itself (no ``trust_remote_code``), builds our compact module on the
meta device and fills it from the official safetensors shards.
"""

from __future__ import annotations

from types import ModuleType
from typing import Optional

import torch

from lmeval_dllm.models import dream, llada
from lmeval_dllm.models.common import DiffusionLM, ModelArgs, load_weights, read_config, resolve_checkpoint_dir

FAMILIES: dict[str, ModuleType] = {
    llada.MODEL_TYPE: llada,  # GSAI-ML/LLaDA-8B-Base, GSAI-ML/LLaDA-8B-Instruct, GSAI-ML/LLaDA-1.5
    dream.MODEL_TYPE: dream,  # Dream-org/Dream-v0-Base-7B, Dream-org/Dream-v0-Instruct-7B
}


def family_of(config: dict, source: str = "config.json") -> ModuleType:
    model_type = config.get("model_type")
    family = FAMILIES.get(model_type) or {k.lower(): v for k, v in FAMILIES.items()}.get(str(model_type).lower())
    if family is None:
        raise ValueError(
            f"unsupported model_type {model_type!r} in {source}; supported: "
            "'llada' (LLaDA-8B-Base/Instruct, LLaDA-1.5), 'Dream' (Dream-v0-Base/Instruct-7B)"
        )
    return family


def parse_args(config: dict, source: str = "config.json") -> ModelArgs:
    return family_of(config, source).parse_config(config)


def load_model(
    pretrained: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    revision: Optional[str] = None,
) -> DiffusionLM:
    """Load a LLaDA or Dream checkpoint (hub id or local directory) into our module, in eval mode."""
    directory = resolve_checkpoint_dir(pretrained, revision)
    config = read_config(directory)
    family = family_of(config, f"{directory}/config.json")
    args = family.parse_config(config)
    with torch.device("meta"):
        model = DiffusionLM(args)
    load_weights(model, directory, family.weight_names(args), device=torch.device(device), dtype=dtype,
                 ignore=family.ignore)
    return model.eval().requires_grad_(False)


__all__ = ["DiffusionLM", "ModelArgs", "FAMILIES", "load_model", "parse_args"]
