"""Our LLaDA and Dream modules (lmeval_dllm/models/) loaded from tiny official-layout checkpoints."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmeval_dllm.models import load_model
from lmeval_dllm.tiny import write_checkpoint


def full_logits(model, ids):
    return model(ids, torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1))


def test_loads_both_families_with_official_names(llada_dir, dream_dir):
    llada, dream = load_model(llada_dir), load_model(dream_dir)
    assert (llada.args.family, llada.logit_shift, llada.args.n_kv_heads) == ("llada", 0, 4)
    assert (dream.args.family, dream.logit_shift, dream.args.n_kv_heads) == ("dream", 1, 2)
    assert llada.dtype == torch.float32 and not any(p.requires_grad for p in llada.parameters())
    with open(os.path.join(llada_dir, "model.safetensors.index.json")) as f:
        names = json.load(f)["weight_map"]
    assert "model.transformer.blocks.1.up_proj.weight" in names and "model.transformer.ff_out.weight" in names


def test_fused_weights_equal_the_official_ones(llada_dir):
    model = load_model(llada_dir)
    tensors = {}
    for f in sorted(os.listdir(llada_dir)):
        if f.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(llada_dir, f)))
    q, k, v = (tensors[f"model.transformer.blocks.0.{n}_proj.weight"] for n in "qkv")
    assert torch.equal(model.layers[0].wqkv.weight, torch.cat([q, k, v]))
    gate, up = tensors["model.transformer.blocks.0.ff_proj.weight"], tensors["model.transformer.blocks.0.up_proj.weight"]
    assert torch.equal(model.layers[0].w13.weight, torch.cat([gate, up]))


def test_predict_hides_dreams_logit_shift(llada_dir, dream_dir):
    ids = torch.randint(0, 250, (2, 12))
    pos = torch.arange(12)[None].expand(2, -1)
    llada, dream = load_model(llada_dir), load_model(dream_dir)
    # LLaDA: column t from row t
    # (computing the LM head on fewer rows may change the last float bit: compare to 1e-6)
    assert torch.allclose(llada.predict(ids, pos, slice(5, 9)), full_logits(llada, ids)[:, 5:9], atol=1e-6)
    # Dream: column t from row t - 1
    assert torch.allclose(dream.predict(ids, pos, slice(5, 9)), full_logits(dream, ids)[:, 4:8], atol=1e-6)
    assert not torch.allclose(dream.predict(ids, pos, slice(5, 9)), full_logits(dream, ids)[:, 5:9], atol=1e-2)
    with pytest.raises(ValueError, match="Dream predicts column t from row t-1"):
        dream.predict(ids, pos, slice(0, 4))


def test_left_padding_does_not_change_the_prompt(tiny_dir):
    """With the key-padding mask and mask-derived positions, a padded row computes what it computes alone."""
    model = load_model(tiny_dir)
    short = torch.randint(0, 250, (1, 7))
    padded = torch.cat([torch.full((1, 5), 0), short], 1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.bool), torch.ones(1, 7, dtype=torch.bool)], 1)
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    alone = full_logits(model, short)
    batched = model(padded, pos, mask)[:, 5:]
    assert torch.allclose(alone, batched, atol=1e-5, rtol=0)


def test_logits_only_where_asked(llada_dir):
    model = load_model(llada_dir)
    ids = torch.randint(0, 250, (1, 10))
    pos = torch.arange(10)[None]
    assert torch.allclose(model(ids, pos, logits_index=slice(3, 6)), full_logits(model, ids)[:, 3:6], atol=1e-6)


def test_tied_embeddings(tmp_path):
    d = write_checkpoint(str(tmp_path / "tied"), "llada", weight_tying=True)
    model = load_model(d)
    assert model.output.weight is model.tok_embeddings.weight


def _copy(src, tmp_path):
    dst = str(tmp_path / "ckpt")
    shutil.copytree(src, dst)
    return dst


def _edit_shard(d, fn):
    shard = os.path.join(d, "model-00001-of-00002.safetensors")
    tensors = load_file(shard)
    fn(tensors)
    save_file(tensors, shard)


def test_missing_weight_is_named(llada_dir, tmp_path):
    d = _copy(llada_dir, tmp_path)
    _edit_shard(d, lambda t: t.pop("model.transformer.wte.weight"))
    with pytest.raises(ValueError, match="missing weight 'model.transformer.wte.weight'"):
        load_model(d)


def test_unexpected_weight_is_named(llada_dir, tmp_path):
    d = _copy(llada_dir, tmp_path)
    _edit_shard(d, lambda t: t.update({"model.transformer.blocks.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match="unexpected weight 'model.transformer.blocks.0.extra.weight' in "
                                         "model-00001-of-00002.safetensors"):
        load_model(d)


def test_shape_mismatch_is_named(llada_dir, tmp_path):
    d = _copy(llada_dir, tmp_path)
    _edit_shard(d, lambda t: t.update({"model.transformer.wte.weight": torch.zeros(3, 64)}))
    with pytest.raises(ValueError, match=r"weight 'model.transformer.wte.weight' has shape \(3, 64\), but config.json "
                                         r"implies \(264, 64\)"):
        load_model(d)


def test_unsupported_model_type_lists_supported(llada_dir, tmp_path):
    d = _copy(llada_dir, tmp_path)
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["model_type"] = "llama"
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(ValueError) as e:
        load_model(d)
    assert str(e.value) == (
        f"unsupported checkpoint in {d}/config.json (model_type 'llama', architectures ['LLaDAModelLM']); supported: "
        "llada (model_type 'llada', architectures LLaDAModelLM: GSAI-ML/LLaDA-8B-Base, GSAI-ML/LLaDA-8B-Instruct, "
        "GSAI-ML/LLaDA-1.5, Zigeng/dParallel-LLaDA-8B-instruct, d3LLM/d3LLM_LLaDA, UltraLLaDA); dream (model_type "
        "'Dream', architectures DreamModel: Dream-org/Dream-v0-Base-7B, Dream-org/Dream-v0-Instruct-7B, "
        "Dream-org/Dream-Coder-v0-Base-7B, Dream-org/Dream-Coder-v0-Instruct-7B, apple/DiffuCoder-7B-Base, "
        "apple/DiffuCoder-7B-Instruct, apple/DiffuCoder-7B-cpGRPO, d3LLM/d3LLM_Dream); llada_moe (model_type 'llada', architectures LLaDAMoEModelLM, "
        "LLaDAMoEModel: inclusionAI/LLaDA-MoE-7B-A1B-Base, inclusionAI/LLaDA-MoE-7B-A1B-Instruct, "
        "inclusionAI/LLaDA-MoE-7B-A1B-Instruct-TD); llada2 (model_type 'llada2_moe', architectures "
        "LLaDA2MoeModelLM, LLaDA2MoeModel: inclusionAI/LLaDA2.0-mini, inclusionAI/LLaDA2.0-mini-preview, "
        "inclusionAI/LLaDA2.1-mini); sdar (model_type 'sdar', architectures SDARForCausalLM, SDARModel: "
        "JetLM/SDAR-1.7B-Chat, JetLM/SDAR-4B-Chat, JetLM/SDAR-8B-Chat (and their -b8/-b16/-b32/-b64 block variants), "
        "Gen-Verse/TraDo-4B-Instruct, Gen-Verse/TraDo-8B-Instruct, Gen-Verse/TraDo-8B-Thinking)")


def test_same_model_type_other_architecture_is_not_loaded_as_the_dense_family(llada_dir, tmp_path):
    """LLaDA-MoE's config.json also says model_type "llada": its architecture decides, not the string. A dense
    LLaDA config labelled LLaDAMoEModelLM is read as LLaDA-MoE (never as dense LLaDA) and fails naming what it
    lacks; an architecture no family reads is unsupported."""
    d = _copy(llada_dir, tmp_path)
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["architectures"] = ["LLaDAMoEModelLM"]
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(ValueError, match=r"^LLaDA-MoE config.json \(architectures \['LLaDAMoEModelLM'\]\) lacks "
                                         r"hidden_size, num_hidden_layers, "):
        load_model(d)
    cfg["architectures"] = ["LLaDA2MoeModelLM"]
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(ValueError, match=r"^unsupported checkpoint in .*config.json \(model_type 'llada', "
                                         r"architectures \['LLaDA2MoeModelLM'\]\); supported: llada "):
        load_model(d)


def test_unsupported_config_field_is_named(llada_dir, tmp_path):
    d = _copy(llada_dir, tmp_path)
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["block_type"] = "sequential"
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(ValueError, match="block_type='sequential'; only block_type='llama' is supported"):
        load_model(d)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(tmp_path))


def test_long_context_llada_reads_rope_theta_and_length(llada_dir, tmp_path):
    """UltraLLaDA-style long context: the same layout with a larger rope_theta and max_sequence_length (the
    release's eval scales config.rope_theta). Both are read, and the theta changes the logits; a rope_scaling dict,
    which modeling_llada.py does not implement, is refused by name."""
    d = _copy(llada_dir, tmp_path)
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg.update(rope_theta=cfg["rope_theta"] * 16, max_sequence_length=131072)
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    base, long = load_model(llada_dir), load_model(d)
    assert long.args.rope_theta == base.args.rope_theta * 16 and long.args.max_position == 131072
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    assert not torch.allclose(full_logits(base, ids), full_logits(long, ids))
    cfg["rope_scaling"] = {"type": "dynamic", "factor": 4.0}
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(ValueError, match=r"LLaDA config.json has rope_scaling=\{'type': 'dynamic', 'factor': 4.0\}"):
        load_model(d)
