"""LoRA adapters (``peft=PATH_OR_ID``, as lm-eval's ``hf`` model takes them) merged into the official weights at
load, before q/k/v and gate/up are fused.

The ``peft`` package reads the adapter (``PeftConfig.from_pretrained``, ``load_peft_weights``); we do not parse
its format. An adapter trained on the release's HF module (``LLaDAModelLM``, ``DreamModel``, ``LLaDAMoEModelLM``)
names each LoRA pair after the module it adapts, ``base_model.model.<module>.lora_A.weight``; that module's
``<module>.weight`` is an official checkpoint tensor, and the merge is ``W + (lora_B @ lora_A) * scaling`` with
``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` under rsLoRA), as ``peft``'s ``merge_and_unload`` computes
it. A pair whose module is not an official tensor of the checkpoint, or an adapter that is more than plain LoRA
on linear layers (DoRA, trained biases, fully saved modules), is an error naming what is not mapped.
"""

from __future__ import annotations

import math
import re

import torch

_PREFIX = "base_model.model."
_PAIR = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")  # ".default" when not stripped


def _peft():
    try:
        import peft
        from peft.utils import load_peft_weights
    except ImportError as e:
        raise ImportError(
            "peft=... needs the `peft` package to read the adapter: pip install 'lmeval-dllm[peft]' (or pip install "
            "peft)"
        ) from e
    return peft, load_peft_weights


def lora_deltas(adapter: str, official_names: set[str], *, revision=None) -> dict[str, torch.Tensor]:
    """{official tensor name: float32 delta to add} of the LoRA adapter at ``adapter`` (local directory or hub id).

    Raises ValueError naming the adapter's target modules that are not official tensors of the checkpoint, and
    any adapter feature that is not a plain merge (DoRA, bias, modules_to_save, alpha_pattern, embeddings)."""
    peft, load_peft_weights = _peft()
    try:
        config = peft.PeftConfig.from_pretrained(adapter, revision=revision)
        weights = load_peft_weights(adapter, device="cpu", revision=revision)
    except (OSError, ValueError) as e:
        raise OSError(f"peft={adapter!r}: could not read a PEFT adapter there ({type(e).__name__}: {e})") from e
    kind = str(getattr(config, "peft_type", ""))
    if not kind.endswith("LORA") or kind.endswith("ADALORA"):
        raise ValueError(f"peft={adapter!r} is a {kind} adapter; only LoRA adapters are supported")
    for field, allowed in (("use_dora", False), ("bias", "none"), ("fan_in_fan_out", False)):
        if getattr(config, field, allowed) != allowed:
            raise ValueError(f"peft={adapter!r} has {field}={getattr(config, field)!r}; only {field}={allowed!r} "
                             f"(a plain LoRA merge) is supported")
    for field in ("modules_to_save", "alpha_pattern", "trainable_token_indices"):
        if getattr(config, field, None):
            raise ValueError(f"peft={adapter!r} has {field}={getattr(config, field)!r}; only adapters without "
                             f"{field} are supported")

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    other = []
    for key, tensor in weights.items():
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        match = _PAIR.match(name)
        if match is None:
            other.append(key)
            continue
        pairs.setdefault(match["module"], {})[match["which"]] = tensor
    if other:
        raise ValueError(f"peft={adapter!r} holds tensors that are not LoRA pairs of linear layers: "
                         f"{', '.join(sorted(other)[:5])}" + (f" (and {len(other) - 5} more)" if len(other) > 5 else ""))
    unmapped = sorted(m for m in pairs if f"{m}.weight" not in official_names)
    if unmapped:
        raise ValueError(
            f"peft={adapter!r} adapts modules that are not linear weights of this checkpoint: "
            f"{', '.join(unmapped[:8])}" + (f" (and {len(unmapped) - 8} more)" if len(unmapped) > 8 else "")
            + f"; target_modules={sorted(config.target_modules) if config.target_modules else None}"
        )
    deltas = {}
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"peft={adapter!r}: module {module!r} has lora_{''.join(pair)} without its partner")
        a, b = pair["A"].float(), pair["B"].float()  # (r, in), (out, r)
        r = a.shape[0]
        scaling = config.lora_alpha / (math.sqrt(r) if getattr(config, "use_rslora", False) else r)
        deltas[f"{module}.weight"] = (b @ a) * scaling
    return deltas
