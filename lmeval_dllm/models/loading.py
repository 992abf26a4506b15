"""Loading an official checkpoint into our module: where each official tensor goes, and the loader that checks
every name and shape.

A family file (``llada.py``, ``dream.py``) says where each official weight goes (:class:`Slot`); the loader
reads the safetensors shards (sharded or not), checks every name and shape against what config.json implies,
fuses the pieces (q/k/v, gate/up) and assigns them to a module built on the meta device.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, NoReturn, Optional

import torch

from lmeval_dllm.models.transformer import ModelArgs

if TYPE_CHECKING:
    from lmeval_dllm.models.transformer import DiffusionLM


@dataclass(frozen=True)
class Slot:
    """Where an official weight goes: our parameter name, and its slice along dim 0 when fused."""

    name: str
    part: int = 0  # index among the tensors concatenated (dim 0) into `name`
    parts: int = 1
    rows: int = 0  # rows of this piece when fused (parts > 1)


def config_checks(cfg: dict, needed: tuple[str, ...], *, label: str, architecture: str,
                  null_is_missing: bool = False) -> Callable[[str, str], NoReturn]:
    """Check that config.json has every key of ``needed`` (``null_is_missing``: a null value counts as absent),
    else raise an error naming the family (``label``: "SDAR"), the config's architectures, the missing keys and
    what an ``architecture`` config has; return ``unsupported(key, allowed)``, which raises the error of a key
    whose value the family does not reproduce, naming the key, its value and what is allowed."""
    missing = [k for k in needed if (cfg.get(k) is None if null_is_missing else k not in cfg)]
    if missing:
        raise ValueError(f"{label} config.json (architectures {cfg.get('architectures')}) lacks "
                         f"{', '.join(missing)}; an {architecture} config has {', '.join(needed)}")

    def unsupported(key: str, allowed: str) -> NoReturn:
        raise ValueError(f"{label} config.json has {key}={cfg[key]!r}; only {allowed} is supported")

    return unsupported


def hf_model_args(cfg: dict, *, family: str, rope_theta: float, norm_eps: float = 1e-6, max_position: int = 32768,
                  **fields: Any) -> ModelArgs:
    """:class:`ModelArgs` from the config.json keys every HF Llama / Qwen-layout checkpoint names alike
    (``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads`` (absent or null: as
    many as the query heads), ``intermediate_size``, ``vocab_size``, ``rope_theta``, ``rms_norm_eps``,
    ``tie_word_embeddings`` (absent: untied), ``max_position_embeddings``).

    ``rope_theta``, ``norm_eps`` and ``max_position`` are the family's defaults for an absent key (its config
    class's); ``fields`` are the family's own :class:`ModelArgs` fields (q/k/v bias, token ids, logit shift ...).
    The family checks config.json before calling this, with messages that name it."""
    dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    return ModelArgs(
        family=family,
        dim=dim,
        n_layers=cfg["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        intermediate_size=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"],
        rope_theta=float(cfg.get("rope_theta", rope_theta)),
        norm_eps=float(cfg.get("rms_norm_eps", norm_eps)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position=int(cfg.get("max_position_embeddings", max_position)),
        **fields,
    )


def hf_decoder_names(args, *, qkv_bias: bool) -> dict[str, Slot]:
    """{official name: Slot} of the parts every HF Llama / Qwen2-layout checkpoint names alike (Dream, LLaDA-MoE):
    the embedding, the final norm, the LM head (unless tied) and, per layer, q/k/v (fused into ``wqkv``, with
    their biases when ``qkv_bias``), ``o_proj`` and the two layer norms. The family adds its MLP names."""
    q_rows, kv_rows = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    names = {"model.embed_tokens.weight": Slot("tok_embeddings.weight"), "model.norm.weight": Slot("norm.weight")}
    if not args.tie_embeddings:
        names["lm_head.weight"] = Slot("output.weight")
    for i in range(args.n_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        for kind in ("weight", "bias") if qkv_bias else ("weight",):
            for part, (proj, rows) in enumerate((("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows))):
                names[f"{src}self_attn.{proj}.{kind}"] = Slot(f"{dst}wqkv.{kind}", part, 3, rows)
        names.update({
            f"{src}input_layernorm.weight": Slot(f"{dst}attn_norm.weight"),
            f"{src}self_attn.o_proj.weight": Slot(f"{dst}wo.weight"),
            f"{src}post_attention_layernorm.weight": Slot(f"{dst}mlp_norm.weight"),
        })
    return names


def swiglu_names(src: str, w13: str, w2: str, rows: int) -> dict[str, Slot]:
    """{official name: Slot} of one HF SwiGLU MLP under prefix ``src`` (``gate_proj``, ``up_proj``, ``down_proj``):
    gate and up fused into ``w13`` ([gate; up], ``rows`` each), down into ``w2``."""
    return {f"{src}gate_proj.weight": Slot(w13, 0, 2, rows), f"{src}up_proj.weight": Slot(w13, 1, 2, rows),
            f"{src}down_proj.weight": Slot(w2)}


def moe_mlp_names(args: ModelArgs, i: int, *, shared: str) -> dict[str, Slot]:
    """{official name: Slot} of layer ``i``'s MLP in the HF MoE layout LLaDA-MoE and LLaDA2 share: the dense SwiGLU
    (``mlp.``) where ``args.moe.layers[i]`` is False; otherwise the router ``mlp.gate.weight`` (and its
    ``mlp.gate.expert_bias`` when ``args.moe.expert_bias``), the experts ``mlp.experts.E.*_proj`` stacked along
    dim 0 into ``moe.w13`` ([gate_0; up_0; gate_1; ...]) and ``moe.w2`` ([down_0; down_1; ...]), and the shared
    expert, when there is one, under the family's prefix ``shared`` (relative to the layer)."""
    moe = args.moe
    src, dst = f"model.layers.{i}.", f"layers.{i}."
    if not moe.layers[i]:
        return swiglu_names(f"{src}mlp.", f"{dst}w13.weight", f"{dst}w2.weight", args.intermediate_size)
    E, inter = moe.num_experts, moe.expert_intermediate_size
    names = {f"{src}mlp.gate.weight": Slot(f"{dst}moe.gate.weight")}
    if moe.expert_bias:
        names[f"{src}mlp.gate.expert_bias"] = Slot(f"{dst}moe.expert_bias")
    for e in range(E):
        expert = f"{src}mlp.experts.{e}."
        names[f"{expert}gate_proj.weight"] = Slot(f"{dst}moe.w13", 2 * e, 2 * E, inter)
        names[f"{expert}up_proj.weight"] = Slot(f"{dst}moe.w13", 2 * e + 1, 2 * E, inter)
        names[f"{expert}down_proj.weight"] = Slot(f"{dst}moe.w2", e, E, args.dim)
    if moe.shared_intermediate_size:
        names.update(swiglu_names(f"{src}{shared}", f"{dst}moe.shared_w13.weight", f"{dst}moe.shared_w2.weight",
                                  moe.shared_intermediate_size))
    return names


def resolve_checkpoint_dir(pretrained: str, revision: Optional[str] = None) -> str:
    """A local directory as is; otherwise a hub id, fetched (config, weights) into the HF cache."""
    if os.path.isdir(pretrained):
        return pretrained
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(pretrained, revision=revision, allow_patterns=["*.json", "*.safetensors"])
    except Exception as e:  # noqa: BLE001 - re-raised with the context a user needs
        raise OSError(
            f"pretrained={pretrained!r} is not a local directory and could not be fetched from the Hugging Face "
            f"hub ({type(e).__name__}: {e}). Give a local checkpoint directory (config.json + *.safetensors) "
            f"or check the id and your network / HF_HUB_OFFLINE setting."
        ) from e


def read_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in {directory!r}: not a Hugging Face checkpoint directory")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _safetensors_files(directory: str) -> list[str]:
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {directory!r} (only safetensors checkpoints load)")
    return [os.path.join(directory, n) for n in files]


def load_weights(
    model: "DiffusionLM",
    directory: str,
    weight_names: dict[str, Slot],
    *,
    device: torch.device,
    dtype: torch.dtype,
    ignore: Callable[[str], bool] = lambda name: False,
    deltas: Optional[dict[str, torch.Tensor]] = None,
) -> None:
    """Load an official checkpoint into ``model`` (built on the meta device), checking every name and shape.

    ``weight_names`` maps every official tensor name to the :class:`Slot` it fills. A tensor in the files that
    is not in the map (and not ``ignore``-d), a name of the map missing from the files, or a shape that differs
    from what config.json implies is an error naming the official key. ``deltas`` ({official name: tensor of
    its shape}, a merged LoRA adapter: ``models/lora.py``) are added to those tensors, in float32, before fusion.
    """
    from safetensors import safe_open

    params = dict(model.named_parameters())
    pieces: dict[str, dict[int, torch.Tensor]] = {}
    seen: set[str] = set()
    for path in _safetensors_files(directory):
        with safe_open(path, framework="pt", device=str(device)) as f:
            for key in f.keys():
                slot = weight_names.get(key)
                if slot is None:
                    if ignore(key):
                        continue
                    raise ValueError(
                        f"unexpected weight {key!r} in {os.path.basename(path)}: not part of the "
                        f"{model.args.family} architecture that config.json describes"
                    )
                tensor = f.get_tensor(key)
                if deltas and key in deltas:
                    if deltas[key].shape != tensor.shape:
                        raise ValueError(f"the adapter's update of {key!r} has shape {tuple(deltas[key].shape)}, "
                                         f"but the checkpoint's tensor has {tuple(tensor.shape)}")
                    tensor = tensor.float() + deltas[key].to(tensor.device)
                tensor = tensor.to(dtype)
                expected = _part_shape(params[slot.name], slot)
                if tuple(tensor.shape) != expected:
                    raise ValueError(
                        f"weight {key!r} has shape {tuple(tensor.shape)}, but config.json implies {expected}"
                    )
                pieces.setdefault(slot.name, {})[slot.part] = tensor
                seen.add(key)
    missing = [k for k in weight_names if k not in seen]
    if missing:
        raise ValueError(
            f"missing weight {missing[0]!r} in {directory!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    state = {}
    for name in params:  # named_parameters() lists a tied LM head once, under tok_embeddings
        parts = pieces[name]
        state[name] = parts[0] if len(parts) == 1 else torch.cat([parts[i] for i in range(len(parts))], dim=0)
    if model.args.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if model.args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.init_buffers(device)


def _part_shape(param: torch.Tensor, slot: Slot) -> tuple[int, ...]:
    """Shape of one piece of a (possibly fused) parameter. Fused pieces are given by their row counts."""
    if slot.parts == 1:
        return tuple(param.shape)
    return (slot.rows,) + tuple(param.shape[1:])
