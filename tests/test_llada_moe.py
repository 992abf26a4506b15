"""LLaDA-MoE (lmeval_dllm/models/llada_moe.py and transformer.MoE): chosen by its architecture although its
model_type is LLaDA's, loaded from a tiny checkpoint in the official layout, its logits equal to a dense reference
of the release's math written here from the official tensors, and every strategy x cache decodes a left-padded
batch exactly as each prompt alone.

The logits were also compared with the release's own ``modeling_lladamoe.py`` in a scratch environment (never
committed): docs/models.md has the figures."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from models_support import official, rms_norm, rope_tables, rotate, swiglu

from lmeval_dllm.caches import build_cache, check_compatible
from lmeval_dllm.generate import GenerationConfig, generate
from lmeval_dllm.models import family_for, load_model
from lmeval_dllm.samplers import Proposal, build_sampler, sampler_class
from lmeval_dllm.tiny import write_checkpoint

PROMPTS = ["What is 12+30?", "Hi", "A longer prompt, with punctuation!"]


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory) -> str:
    # a dense first layer and a shared expert, so every branch of the release's layer is exercised
    return write_checkpoint(str(tmp_path_factory.mktemp("tiny-llada-moe")), "llada_moe", seed=1, num_hidden_layers=3,
                            moe_layer_freq=[0, 1, 1], shared_expert_intermediate_size=48, num_key_value_heads=2)


def reference_logits(cfg: dict, w: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """The release's forward (modeling_lladamoe.py), written densely from the official tensors: every expert runs
    every token and the top-k (softmax, not renormalised) weights pick the sum."""
    H, Hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    Dh = cfg["hidden_size"] // H
    norm = partial(rms_norm, eps=cfg["rms_norm_eps"])
    mlp = partial(swiglu, w)
    B, T = ids.shape
    cos, sin = rope_tables(cfg["rope_theta"], Dh, T)
    h = w["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = norm(h, w[p + "input_layernorm.weight"])
        q = norm((x @ w[p + "self_attn.q_proj.weight"].T).view(B, T, H, Dh), w[p + "self_attn.q_norm.weight"])
        k = norm((x @ w[p + "self_attn.k_proj.weight"].T).view(B, T, Hkv, Dh), w[p + "self_attn.k_norm.weight"])
        v = (x @ w[p + "self_attn.v_proj.weight"].T).view(B, T, Hkv, Dh)
        q, k, v = rotate(q.transpose(1, 2), cos, sin), rotate(k.transpose(1, 2), cos, sin), v.transpose(1, 2)
        k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
        att = torch.softmax(q @ k.transpose(-1, -2) / Dh ** 0.5, -1) @ v  # bidirectional: no mask
        h = h + att.transpose(1, 2).reshape(B, T, -1) @ w[p + "self_attn.o_proj.weight"].T
        x = norm(h, w[p + "post_attention_layernorm.weight"])
        if cfg["moe_layer_freq"][i] == 0:
            h = h + mlp(x, p + "mlp.")
            continue
        probs = torch.softmax(x @ w[p + "mlp.gate.weight"].T, -1)  # (B, T, E)
        top, chosen = probs.topk(cfg["num_experts_per_tok"], -1)
        weight = torch.zeros_like(probs).scatter(-1, chosen, top)  # (B, T, E): the top-k probabilities, else 0
        every = torch.stack([mlp(x, f"{p}mlp.experts.{e}.") for e in range(cfg["num_experts"])], -2)  # (B,T,E,D)
        h = h + (weight[..., None] * every).sum(-2) + mlp(x, p + "shared_expert.")
    return norm(h, w["model.norm.weight"]) @ w["lm_head.weight"].T


def test_chosen_by_architecture_not_model_type(moe_dir):
    cfg, _ = official(moe_dir)
    assert cfg["model_type"] == "llada"
    assert family_for(cfg).name == "llada_moe"
    assert family_for({**cfg, "architectures": ["LLaDAModelLM"]}).name == "llada"
    with pytest.raises(ValueError, match=r"unsupported checkpoint in config.json \(model_type 'llada', "
                                         r"architectures \['LLaDAMoEForDiffusion'\]\); supported: llada"):
        family_for({**cfg, "architectures": ["LLaDAMoEForDiffusion"]})


def test_official_layout(moe_dir):
    cfg, w = official(moe_dir)
    assert "model.layers.0.mlp.gate_proj.weight" in w and "model.layers.0.mlp.gate.weight" not in w  # dense layer
    assert w["model.layers.1.mlp.experts.7.down_proj.weight"].shape == (64, 32)
    assert w["model.layers.2.shared_expert.up_proj.weight"].shape == (48, 64)
    assert w["model.layers.1.self_attn.q_norm.weight"].shape == (16,)  # one head_dim weight shared by the heads
    assert len(w) == 3 + 3 * 8 + 3 + 2 * (1 + 8 * 3 + 3)  # embed/norm/head, attention + 4 norms, dense MLP, MoE
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(moe_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<role>HUMAN</role>Hi<|role_end|><role>ASSISTANT</role>"
    assert tok.convert_tokens_to_ids("<|mask|>") == load_model(moe_dir).mask_token_id == cfg["mask_token_id"]


def test_logits_equal_the_dense_reference(moe_dir):
    cfg, w = official(moe_dir)
    model = load_model(moe_dir)
    ids = torch.randint(0, 261, (2, 13), generator=torch.Generator().manual_seed(0))
    ours = model(ids, torch.arange(13)[None].expand(2, 13))
    ref = reference_logits(cfg, w, ids)
    assert (ours - ref).abs().max().item() < 2e-5


def test_gpu_expert_paths_equal_the_loop(moe_dir):
    """The GPU paths (pairs sorted by expert through torch._grouped_mm; every expert on every token) compute the
    loop's sum; run here on the CPU."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no torch._grouped_mm")
    moe = load_model(moe_dir).layers[1].moe
    x = torch.randn(37, 64, generator=torch.Generator().manual_seed(3))
    weights, experts = moe.route(x)
    assert len(set(experts.flatten().tolist())) > 4  # many experts are hit
    looped = moe._looped(x, weights, experts)
    torch.testing.assert_close(moe._grouped(x, weights, experts), looped, rtol=0, atol=1e-6)
    torch.testing.assert_close(moe._dense(x, weights, experts), looped, rtol=0, atol=1e-6)


@pytest.mark.parametrize("key,value,msg", [
    ("moe_router_enable_expert_bias", True, "moe_router_enable_expert_bias=True; only false"),
    ("moe_router_score_function", "sigmoid", "moe_router_score_function='sigmoid'; only 'softmax'"),
    ("clip_qkv", 8.0, "clip_qkv=8.0; only null"),
    ("attention_bias", True, "attention_bias=True; only false"),
    ("moe_layer_freq", [1], r"moe_layer_freq=\[1\]; expected 3 entries of 0"),
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}, "rope_scaling=.*only null"),
])
def test_unsupported_config_fields_are_named(moe_dir, key, value, msg):
    cfg, _ = official(moe_dir)
    with pytest.raises(ValueError, match=msg):
        family_for(cfg).parse_config({**cfg, key: value})


STRATEGIES = {
    "vanilla": {"num_transfer_tokens": 2},
    "pc_sampler": {"debias": False},
    "eb_sampler": {"gamma": 0.5},
    "klass": {"threshold": 0.5},
    "ar": {"num_transfer_tokens": 2},
    "wino": {},
    "daedal": {"initial_gen_length": 8, "max_gen_length": 32, "num_check_last_eot": 4, "threshold": 0.5},
    "prophet": {"early_threshold": 1.0, "mid_threshold": 0.5, "late_threshold": 0.1, "answer_start": 8},
    "d3llm": {"threshold": 5.0, "block_add_threshold": 0.25, "decoded_token_threshold": 0.5, "early_stop": True},
}
CACHES = [None, ("prefix", {}), ("dual", {"refresh_interval": 3}), ("dllm", {"kp": 3, "kr": 2}),
          ("d2cache", {"current_k": 3, "inflate_w": 2})]


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_and_cache_batch_equals_each_prompt_alone(moe_dir, strategy):
    """The MoE changes the MLP only: every cache, reaching the model through Block / LayerHooks, works unchanged.
    Known exception (docs/caches.md): DAEDAL with the dual cache restarts the cache for the whole batch."""
    from transformers import AutoTokenizer

    model, tok = load_model(moe_dir), AutoTokenizer.from_pretrained(moe_dir)
    enc = [tok(p, add_special_tokens=False).input_ids for p in PROMPTS]
    P = max(map(len, enc))
    ids = torch.tensor([[tok.pad_token_id] * (P - len(e)) + e for e in enc])
    mask = torch.tensor([[False] * (P - len(e)) + [True] * len(e) for e in enc])

    def run(ids, mask, cache):
        sampler = build_sampler(strategy, Proposal.from_params().bind(tok.eos_token_id, None), **STRATEGIES[strategy])
        config = GenerationConfig(None if sampler.sizes_canvas else 16, 8)
        return generate(model, ids, mask, sampler, config, stop_token_ids=torch.tensor([tok.eos_token_id]),
                        cache=None if cache is None else build_cache(cache[0], **cache[1]))

    checked = 0
    for cache in CACHES:
        if cache is not None:
            try:
                check_compatible(sampler_class(strategy), build_cache(cache[0], **cache[1]))
            except ValueError:
                continue  # refused up front, as for LLaDA
        batch = run(ids, mask, cache)
        if strategy == "daedal" and cache is not None and cache[0] == "dual":
            continue
        for i, e in enumerate(enc):
            alone = run(torch.tensor([e]), None, cache)
            n = alone.tokens.shape[1]
            assert alone.tokens[0].tolist() == batch.tokens[i, :n].tolist(), (strategy, cache, i)
            assert alone.nfe[0] == batch.nfe[i], (strategy, cache, i)
        checked += 1
    assert checked >= 2


def test_through_the_lm_eval_model(moe_dir):
    """``--model dllm`` on the MoE checkpoint: LLaDA's likelihood scheme, <|role_end|> ends an answer, and a
    generate_until request decodes."""
    from lm_eval.api.instance import Instance

    from lmeval_dllm.lm import DLLM

    lm = DLLM(pretrained=moe_dir, batch_size=2)
    assert lm.estimator.scheme == "llada"
    assert lm.tokenizer.convert_tokens_to_ids("<|role_end|>") in lm.stop_token_ids.tolist()
    assert lm.tokenizer.eos_token_id in lm.stop_token_ids.tolist()
    reqs = [Instance("generate_until", {}, (p, {"until": ["\n\n"], "max_gen_toks": 16}), i)
            for i, p in enumerate(PROMPTS)]
    answers = lm.generate_until(reqs)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    assert lm.loglikelihood([Instance("loglikelihood", {}, ("Hi", " there"), 0)])[0][0] < 0
