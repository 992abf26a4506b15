"""LoRA adapters (``load_model(..., peft=PATH)``, lmeval_dllm/models/lora.py): an adapter made with ``peft`` over a
module tree named like the release's HF model loads merged into our fused weights, and gives exactly the logits
of the checkpoint that ``peft``'s own ``merge_and_unload`` writes; what we cannot merge is an error naming it."""

from __future__ import annotations

import glob
import os

import pytest
import torch
import torch.nn as nn

from lmeval_dllm.models import load_model
from lmeval_dllm.tiny import write_checkpoint

peft = pytest.importorskip("peft")


def official(directory: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for path in glob.glob(os.path.join(directory, "*.safetensors")):
        out.update(load_file(path))
    return out


def mirror(tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A module tree whose Linear modules carry the official 2-D weights under their official names (what the
    release's HF class looks like to peft)."""
    root = nn.Module()
    for name, tensor in tensors.items():
        if tensor.dim() != 2:
            continue
        *path, leaf = name.split(".")
        assert leaf == "weight"
        module = root
        for part in path[:-1]:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        linear = nn.Linear(tensor.shape[1], tensor.shape[0], bias=False)
        linear.weight.data = tensor.clone()
        module.add_module(path[-1], linear)
    return root


def make_adapter(ckpt: str, out: str, targets, **lora) -> dict[str, torch.Tensor]:
    """Save a random LoRA adapter over ``ckpt`` to ``out``; returns peft's merged official weights."""
    tensors = official(ckpt)
    torch.manual_seed(0)
    model = peft.get_peft_model(mirror(tensors), peft.LoraConfig(target_modules=targets, **lora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: make the update non-trivial
                p.normal_(0.0, 0.2)
    model.save_pretrained(out)
    merged = model.merge_and_unload()
    params = dict(merged.named_parameters())
    return {k: (params[k].detach().clone() if k in params else v) for k, v in tensors.items()}


FAMILIES = {
    "llada": (["q_proj", "k_proj", "v_proj", "ff_proj", "up_proj", "attn_out"], {}),
    "dream": (["q_proj", "v_proj", "gate_proj", "down_proj"], {}),
    "llada_moe": (["q_proj", "o_proj", "gate_proj"], {}),  # gate_proj: the dense layer's and every expert's
    "llada2": (["query_key_value", "dense", "up_proj"], {}),  # fused q/k/v; up_proj: dense, experts, shared
    "fast_dllm_v2": (["q_proj", "v_proj", "gate_proj", "down_proj"], {}),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("rslora", [False, True])
def test_adapter_merges_as_peft_merges(tmp_path, family, rslora):
    kw = {"llada_moe": {"moe_layer_freq": [0, 1]}, "llada2": {"num_hidden_layers": 2}}.get(family, {})
    ckpt = write_checkpoint(str(tmp_path / "ckpt"), family, seed=2, **kw)
    targets, extra = FAMILIES[family]
    merged = make_adapter(ckpt, str(tmp_path / "adapter"), targets, r=4, lora_alpha=8, use_rslora=rslora, **extra)
    reference = write_checkpoint(str(tmp_path / "merged"), family, weights=merged, **kw)
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(11)[None].expand(2, 11)
    ours = load_model(ckpt, peft=str(tmp_path / "adapter"))(ids, pos)
    theirs = load_model(reference)(ids, pos)
    base = load_model(ckpt)(ids, pos)
    assert (ours - base).abs().max().item() > 1e-2  # the adapter changes the model
    assert (ours - theirs).abs().max().item() < 1e-5


def test_unmapped_target_modules_are_named(tmp_path):
    ckpt = write_checkpoint(str(tmp_path / "ckpt"), "llada", seed=2)
    tensors = official(ckpt)
    tree = mirror(tensors)
    tree.add_module("vision_proj", nn.Linear(64, 64, bias=False))  # a module the checkpoint does not have
    model = peft.get_peft_model(tree, peft.LoraConfig(target_modules=["q_proj", "vision_proj"], r=2))
    model.save_pretrained(str(tmp_path / "adapter"))
    with pytest.raises(ValueError, match=r"adapts modules that are not linear weights of this checkpoint: "
                                         r"vision_proj; target_modules=\['q_proj', 'vision_proj'\]"):
        load_model(ckpt, peft=str(tmp_path / "adapter"))


@pytest.mark.parametrize("field,value,msg", [
    ("use_dora", True, "use_dora=True; only use_dora=False"),
    ("bias", "lora_only", "bias='lora_only'; only bias='none'"),
])
def test_adapters_beyond_a_plain_merge_are_refused(tmp_path, field, value, msg):
    ckpt = write_checkpoint(str(tmp_path / "ckpt"), "llada", seed=2)
    model = peft.get_peft_model(mirror(official(ckpt)), peft.LoraConfig(target_modules=["q_proj"], r=2,
                                                                         **{field: value}))
    model.save_pretrained(str(tmp_path / "adapter"))
    with pytest.raises(ValueError, match=msg):
        load_model(ckpt, peft=str(tmp_path / "adapter"))


def test_missing_adapter_is_a_clear_error(tmp_path):
    ckpt = write_checkpoint(str(tmp_path / "ckpt"), "llada", seed=2)
    with pytest.raises(OSError, match=r"peft='/nonexistent/adapter': could not read a PEFT adapter there"):
        load_model(ckpt, peft="/nonexistent/adapter")


def test_without_the_peft_package_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    import sys

    ckpt = write_checkpoint(str(tmp_path / "ckpt"), "llada", seed=2)
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    with pytest.raises(ImportError, match=r"peft=\.\.\. needs the `peft` package to read the adapter: pip install "
                                          r"'lmeval-dllm\[peft\]'"):
        load_model(ckpt, peft=str(tmp_path / "adapter"))


def test_peft_through_the_lm_eval_model(tmp_path):
    """``--model_args pretrained=...,peft=...``: the adapter is merged (the logits of peft's merged checkpoint)."""
    from lmeval_dllm.lm import DLLM

    ckpt = write_checkpoint(str(tmp_path / "ckpt"), "dream", seed=2)
    merged = make_adapter(ckpt, str(tmp_path / "adapter"), ["q_proj", "up_proj"], r=2, lora_alpha=4)
    reference = write_checkpoint(str(tmp_path / "merged"), "dream", weights=merged)
    lm = DLLM(pretrained=ckpt, peft=str(tmp_path / "adapter"))
    for (name, ours), theirs in zip(lm.model.named_parameters(), load_model(reference).parameters()):
        assert (ours - theirs).abs().max().item() < 1e-6, name
