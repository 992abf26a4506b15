"""LLaDA2.0 / 2.1 (lmeval_dllm/models/llada2.py, transformer.MoE's DeepSeek-V3-style routing, partial RoPE): its
config.json read into exact ModelArgs, unsupported fields named, the router's choice and weights on hand-built
scores, partial RoPE on a hand-built vector, the tiny checkpoint in the release's layout loaded through the real
loader with logits equal to a reference written here from the official tensors (per token, per expert), and
block-causal decoding (blocks of 32) with a batch equal to each prompt alone and exact caches equal to none.

The logits were also compared with the release's own ``modeling_llada2_moe.py``, and greedy decoding with its
``generate`` (LLaDA2.0: strategy=vanilla, threshold; LLaDA2.1: strategy=llada21_edit), in a scratch environment
(never committed): docs/models.md and docs/strategies.md have the figures."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from models_support import official, rms_norm, rope_tables, rotate, swiglu

from lmeval_dllm.generate import GenerationConfig, generate
from lmeval_dllm.models import family_for, load_model
from lmeval_dllm.models.kernels import rope_fp32, rope_native, rotary
from lmeval_dllm.models.transformer import MoE, ModelArgs, MoEArgs
from lmeval_dllm.samplers import Proposal, build_sampler
from lmeval_dllm.tiny import write_checkpoint

PROMPTS = ["What is 12+30?", "Hi", "A longer prompt, with punctuation!"]

# inclusionAI/LLaDA2.0-mini's config.json values (the fields this module reads)
MINI = {
    "architectures": ["LLaDA2MoeModelLM"], "model_type": "llada2_moe", "first_k_dense_replace": 1, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 5120, "max_position_embeddings": 32768,
    "moe_intermediate_size": 512, "moe_router_enable_expert_bias": True, "n_group": 8, "norm_head": False,
    "norm_topk_prob": True, "num_attention_heads": 16, "num_experts": 256, "num_experts_per_tok": 8,
    "num_hidden_layers": 20, "num_key_value_heads": 4, "num_shared_experts": 1, "output_router_logits": False,
    "pad_token_id": 156892, "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-06, "rope_theta": 600000,
    "routed_scaling_factor": 2.5, "score_function": "sigmoid", "tie_word_embeddings": False, "topk_group": 4,
    "use_bias": False, "use_qk_norm": True, "use_qkv_bias": False, "vocab_size": 157184,
}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    # the default tiny config: a dense first layer, 16 experts in 4 groups (2 kept), top 4, a shared expert
    return write_checkpoint(str(tmp_path_factory.mktemp("tiny-llada2")), "llada2", seed=1)


def test_mini_config_parses_to_exact_args():
    args = family_for(MINI).parse_config(MINI)
    assert args == ModelArgs(
        family="llada2", dim=2048, n_layers=20, n_heads=16, n_kv_heads=4, intermediate_size=5120,
        vocab_size=157184, rope_theta=600000.0, norm_eps=1e-6, qkv_bias=False, rope_fp32=False,
        tie_embeddings=False, max_position=32768, mask_token_id=156895, eos_token_id=156892, pad_token_id=156892,
        logit_shift=0, qk_norm=True, partial_rotary_factor=0.5, attn_out_bias=False, block_size=32,
        moe=MoEArgs(num_experts=256, top_k=8, expert_intermediate_size=512, shared_intermediate_size=512,
                    norm_topk_prob=True, layers=(False,) + (True,) * 19, score_function="sigmoid",
                    expert_bias=True, n_group=8, topk_group=4, routed_scaling_factor=2.5, norm_topk_eps=1e-20,
                    weights_fp32=True, router_fp32=True))
    assert args.head_dim == 128 and args.rope_dim == 64


def test_release_defaults_for_absent_fields():
    """LLaDA2MoeConfig's defaults: use_bias True (attention.dense has a bias), use_qk_norm False; top_k 1 is not
    renormalised (LLaDA2MoeGate); no shared expert without num_shared_experts; num_key_value_heads 0 = all."""
    cfg = {k: v for k, v in MINI.items() if k not in ("use_bias", "use_qk_norm", "num_shared_experts")}
    args = family_for(cfg).parse_config({**cfg, "num_experts_per_tok": 1, "num_key_value_heads": 0})
    assert (args.attn_out_bias, args.qk_norm, args.n_kv_heads) == (True, False, 16)
    assert (args.moe.norm_topk_prob, args.moe.shared_intermediate_size) == (False, None)


@pytest.mark.parametrize("key,value,msg", [
    ("score_function", "softmax", "LLaDA2 config.json has score_function='softmax'; only 'sigmoid' "
                                  r"\(LLaDA2MoeGate always scores with a sigmoid\) is supported"),
    ("head_dim", 64, "LLaDA2 config.json has head_dim=64; only hidden_size / num_attention_heads = 128 is supported"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, r"rope_scaling=\{'rope_type': 'yarn', 'factor': 4.0\}; "
                                                           r"only null \(plain RoPE\)"),
    ("hidden_act", "gelu", "hidden_act='gelu'; only 'silu' is supported"),
    ("use_sliding_window", True, "use_sliding_window=True; only false is supported"),
    ("num_nextn_predict_layers", 1, "num_nextn_predict_layers=1; only 0"),
    ("rotary_dim", 128, r"rotary_dim=128; only partial_rotary_factor \* head_dim = 64"),
    ("partial_rotary_factor", 0.0, r"partial_rotary_factor=0.0; only a value in \(0, 1\]"),
    ("moe_shared_expert_intermediate_size", 1024, "moe_shared_expert_intermediate_size=1024; only "
                                                  r"moe_intermediate_size \* num_shared_experts = 512"),
    ("topk_group", 9, "num_experts=256, n_group=8, topk_group=9; expected n_group dividing num_experts"),
    ("n_group", 7, "num_experts=256, n_group=7, topk_group=4; expected"),
])
def test_unsupported_config_fields_are_named(key, value, msg):
    with pytest.raises(ValueError, match=msg):
        family_for(MINI).parse_config({**MINI, key: value})


def test_missing_fields_are_named():
    cfg = {k: v for k, v in MINI.items() if k != "moe_intermediate_size"}
    with pytest.raises(ValueError, match=r"LLaDA2 config.json \(architectures \['LLaDA2MoeModelLM'\]\) lacks "
                                         r"moe_intermediate_size; an LLaDA2MoeModelLM config has"):
        family_for(cfg).parse_config(cfg)


def hand_moe(**over) -> MoE:
    """An 8-expert MoE on 8-dim tokens whose router is the identity: token x's router logits are x itself."""
    moe_args = dict(num_experts=8, top_k=2, expert_intermediate_size=4, shared_intermediate_size=None,
                    norm_topk_prob=True, layers=(True,), score_function="sigmoid", expert_bias=True, n_group=4,
                    topk_group=2, routed_scaling_factor=2.5, norm_topk_eps=1e-20, weights_fp32=True,
                    router_fp32=True)
    moe_args.update(over)
    args = ModelArgs(family="llada2", dim=8, n_layers=1, n_heads=1, n_kv_heads=1, intermediate_size=8,
                     vocab_size=16, rope_theta=1e4, norm_eps=1e-6, qkv_bias=False, rope_fp32=False,
                     tie_embeddings=False, max_position=64, mask_token_id=15, eos_token_id=14, pad_token_id=14,
                     logit_shift=0, moe=MoEArgs(**moe_args))
    moe = MoE(args)
    with torch.no_grad():
        moe.gate.weight.copy_(torch.eye(8))
        if moe.expert_bias is not None:
            moe.expert_bias.zero_()
    return moe


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_sigmoid_router_groups_bias_and_scaling_pick_exactly():
    """Groups {0,1} {2,3} {4,5} {6,7}, scored by the sum of their two best biased scores; the 2 best groups hold
    the candidates; the bias steers the choice, the unbiased sigmoid scores weight it, renormalised, x 2.5."""
    moe = hand_moe()
    s = [0.9, 0.1, 0.5, 0.4, 0.6, 0.6, 0.85, 0.05]  # group sums 1.0, 0.9, 1.2, 0.9: groups 0 and 2
    weights, experts = moe.route(torch.tensor([[logit(p) for p in s]]))
    # expert 6 (0.85) beats 4 and 5 (0.6) but its group (0.9) is not kept: group-limited. 4 and 5 tie; topk
    # takes the lower index first (as the release's torch.topk does)
    assert experts[0].tolist() == [0, 4]
    torch.testing.assert_close(weights[0], torch.tensor([0.9, 0.6]) / 1.5 * 2.5, rtol=0, atol=1e-6)
    assert weights.dtype == torch.float32
    # a bias of +0.55 on expert 1 lifts group 0 (1.55) and makes expert 1 the second choice (0.65 biased), but its
    # weight is its unbiased score 0.1
    with torch.no_grad():
        moe.expert_bias[1] = 0.55
    weights, experts = moe.route(torch.tensor([[logit(p) for p in s]]))
    assert experts[0].tolist() == [0, 1]
    torch.testing.assert_close(weights[0], torch.tensor([0.9, 0.1]) / 1.0 * 2.5, rtol=0, atol=1e-6)


def test_router_without_group_limit_and_top1():
    """topk_group == n_group: plain top-k of the biased scores; top_k 1: the raw score, not renormalised."""
    moe = hand_moe(n_group=1, topk_group=1, top_k=1, norm_topk_prob=False, routed_scaling_factor=1.0)
    s = [0.2, 0.3, 0.1, 0.7, 0.6, 0.4, 0.8, 0.5]
    weights, experts = moe.route(torch.tensor([[logit(p) for p in s]]))
    assert experts.tolist() == [[6]]
    torch.testing.assert_close(weights, torch.tensor([[0.8]]), rtol=0, atol=1e-6)


def test_softmax_router_is_llada_moe_unchanged():
    """The defaults (LLaDA-MoE): softmax probabilities, plain top-k, weights in the activations' dtype."""
    moe = hand_moe(score_function="softmax", expert_bias=False, n_group=1, topk_group=1, norm_topk_prob=False,
                   routed_scaling_factor=1.0, norm_topk_eps=0.0, weights_fp32=False, router_fp32=False)
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0, 0.5, 0.0, 0.0, 2.5]], dtype=torch.float64)
    moe = moe.double()
    weights, experts = moe.route(x)
    p = torch.softmax(x[0], -1)
    assert experts[0].tolist() == [3, 7] and weights.dtype == torch.float64
    torch.testing.assert_close(weights[0], p[[3, 7]].float().double(), rtol=0, atol=1e-7)


def test_partial_rotary_on_a_hand_built_vector():
    """Dh 8, R 4: dims (0, 2) and (1, 3) rotate by p * theta^(-0/4) and p * theta^(-2/4); dims 4..7 pass."""
    theta, p = 10000.0, 3.0
    inv = torch.tensor([1.0, theta ** -0.5])
    ang = torch.cat((p * inv, p * inv))  # (4,)
    cos, sin = ang.cos()[None, None, None], ang.sin()[None, None, None]  # (1, 1, 1, 4)
    x = torch.arange(1.0, 9.0)[None, None, None]  # (1, 1, 1, 8): 1..8
    out = rotary(x, cos, sin)[0, 0, 0]
    a, b = p * inv[0], p * inv[1]
    expected = torch.tensor([1 * math.cos(a) - 3 * math.sin(a), 2 * math.cos(b) - 4 * math.sin(b),
                             3 * math.cos(a) + 1 * math.sin(a), 4 * math.cos(b) + 2 * math.sin(b), 5, 6, 7, 8])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    q, k = rope_native(x, 2 * x, cos, sin)
    assert torch.equal(q, rotary(x, cos, sin)) and torch.equal(k[..., 4:], 2 * x[..., 4:])
    q32, _ = rope_fp32(x.bfloat16(), x.bfloat16(), cos, sin)
    assert q32.dtype == torch.bfloat16 and torch.equal(q32[..., 4:], x[..., 4:].bfloat16())


def test_model_rope_table_covers_the_rotated_dims_only(ckpt):
    model = load_model(ckpt)
    assert model.args.rope_dim == 8 and model.inv_freq.shape == (4,)
    cos, _ = model.rope(torch.arange(5)[None])
    assert cos.shape == (1, 1, 5, 8)
    torch.testing.assert_close(model.inv_freq, 1.0 / 600000.0 ** (torch.arange(0, 8, 2).float() / 8))


def test_official_layout_and_tokenizer(ckpt):
    cfg, w = official(ckpt)
    assert family_for(cfg).name == "llada2" and cfg["model_type"] == "llada2_moe"
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_llada2_moe.LLaDA2MoeModelLM"
    assert w["model.layers.0.attention.query_key_value.weight"].shape == ((4 + 2 * 2) * 16, 64)  # fused q/k/v
    assert "model.layers.0.mlp.gate_proj.weight" in w and "model.layers.0.mlp.gate.weight" not in w  # dense
    assert w["model.layers.1.mlp.gate.expert_bias"].shape == (16,)
    assert w["model.layers.2.mlp.experts.15.down_proj.weight"].shape == (64, 16)
    assert w["model.layers.2.mlp.shared_experts.up_proj.weight"].shape == (16, 64)
    assert w["model.layers.1.attention.query_layernorm.weight"].shape == (16,)
    assert "model.layers.1.attention.dense.bias" not in w  # use_bias false
    # embed/norm/head; per layer 2 norms + qkv + dense + q/k norms; dense MLP 3; MoE gate + bias + 16 * 3 + 3
    assert len(w) == 3 + 3 * 6 + 3 + 2 * (2 + 16 * 3 + 3)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<role>SYSTEM</role>detailed thinking off<|role_end|><role>HUMAN</role>Hi<|role_end|>" \
                   "<role>ASSISTANT</role>"
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == "<role>SYSTEM</role>Be brief.<|role_end|><role>HUMAN</role>Hi<|role_end|><role>ASSISTANT</role>"
    assert tok.convert_tokens_to_ids("<|mask|>") == load_model(ckpt).mask_token_id == cfg["mask_token_id"]


def test_export_round_trips_the_official_tensors(ckpt):
    """tiny.official_state_dict cuts our fused tensors back into the release's names and shapes, bit for bit."""
    from lmeval_dllm.tiny import official_state_dict

    _, w = official(ckpt)
    exported = official_state_dict(load_model(ckpt))
    assert sorted(exported) == sorted(w)
    assert all(torch.equal(exported[k], w[k]) for k in w)


def reference_logits(cfg: dict, w: dict[str, torch.Tensor], ids: torch.Tensor, allow: torch.Tensor) -> torch.Tensor:
    """The release's forward (modeling_llada2_moe.py) in float32 from the official tensors: fused q/k/v, q/k norm,
    RoPE on the first half of each head, attention under the (T, T) mask ``allow``, a dense first layer, then per
    token its group-limited top-k experts of sigmoid + bias, weighted by the renormalised scores x 2.5."""
    H, Hkv, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    Dh = D // H
    R = int(Dh * cfg["partial_rotary_factor"])
    norm = partial(rms_norm, eps=cfg["rms_norm_eps"])
    mlp = partial(swiglu, w)
    E, k, G, TG = cfg["num_experts"], cfg["num_experts_per_tok"], cfg["n_group"], cfg["topk_group"]

    def rope(x, cos, sin):
        return torch.cat((rotate(x[..., :R], cos, sin), x[..., R:]), -1)  # the first R dims rotated

    B, T = ids.shape
    cos, sin = rope_tables(cfg["rope_theta"], R, T)
    h = w["model.word_embeddings.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = norm(h, w[p + "input_layernorm.weight"])
        q, kk, v = (x @ w[p + "attention.query_key_value.weight"].T).view(B, T, H + 2 * Hkv, Dh).split([H, Hkv, Hkv], 2)
        q, kk = norm(q, w[p + "attention.query_layernorm.weight"]), norm(kk, w[p + "attention.key_layernorm.weight"])
        q, kk, v = rope(q.transpose(1, 2), cos, sin), rope(kk.transpose(1, 2), cos, sin), v.transpose(1, 2)
        kk, v = kk.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
        scores = (q @ kk.transpose(-1, -2) / Dh ** 0.5).masked_fill(~allow, float("-inf"))
        att = torch.softmax(scores, -1) @ v
        h = h + att.transpose(1, 2).reshape(B, T, -1) @ w[p + "attention.dense.weight"].T
        x = norm(h, w[p + "post_attention_layernorm.weight"])
        if i < cfg["first_k_dense_replace"]:
            h = h + mlp(x, p + "mlp.")
            continue
        out = mlp(x, p + "mlp.shared_experts.")
        for b in range(B):
            for t in range(T):
                s = torch.sigmoid(x[b, t] @ w[p + "mlp.gate.weight"].T)  # (E,)
                biased = s + w[p + "mlp.gate.expert_bias"]
                group = biased.view(G, -1).topk(2, -1).values.sum(-1)
                kept = set(group.topk(TG).indices.tolist())
                allowed = [e for e in range(E) if e // (E // G) in kept]
                chosen = sorted(allowed, key=lambda e: -biased[e].item())[:k]
                weight = s[chosen] / s[chosen].sum() * cfg["routed_scaling_factor"]
                for j, e in enumerate(chosen):
                    out[b, t] += weight[j] * mlp(x[b, t], f"{p}mlp.experts.{e}.")
        h = h + out
    return norm(h, w["model.norm.weight"]) @ w["lm_head.weight"].T


@pytest.mark.parametrize("block_causal", [False, True])
def test_logits_equal_the_per_token_reference(ckpt, block_causal):
    """Through the real loader; bidirectional, and block-causal over blocks of 8 given as a full mask."""
    cfg, w = official(ckpt)
    model = load_model(ckpt)
    T = 21
    ids = torch.randint(0, 261, (2, T), generator=torch.Generator().manual_seed(0))
    block = torch.arange(T) // 8
    allow = block[None, :] <= block[:, None] if block_causal else torch.ones(T, T, dtype=torch.bool)
    ours = model(ids, torch.arange(T)[None].expand(2, T), allow[None, None].expand(2, 1, T, T))
    ref = reference_logits(cfg, w, ids, allow)
    assert (ours - ref).abs().max().item() < 2e-5
    if block_causal:  # the mask matters: the first block does not see the later ones
        full = model(ids, torch.arange(T)[None].expand(2, T))
        assert (full[:, :8] - ours[:, :8]).abs().max().item() > 1e-3


def test_expert_paths_equal_the_loop(ckpt):
    """The GPU paths (pairs sorted by expert through torch._grouped_mm; every expert on every token) give the
    loop's sum, float32 combine included; run here on the CPU."""
    moe = load_model(ckpt).layers[1].moe
    x = torch.randn(37, 64, generator=torch.Generator().manual_seed(3))
    weights, experts = moe.route(x)
    assert len(set(experts.flatten().tolist())) > 8 and weights.dtype == torch.float32
    looped = moe._looped(x, weights, experts)
    torch.testing.assert_close(moe._dense(x, weights, experts), looped, rtol=0, atol=1e-6)
    if hasattr(torch, "_grouped_mm"):
        torch.testing.assert_close(moe._grouped(x, weights, experts), looped, rtol=0, atol=1e-6)


def test_bfloat16_combine_is_float32_over_the_slots(ckpt):
    """In bfloat16 each expert's output is rounded, then weighted and summed over the k slots in float32 and
    rounded once (moe_infer), not accumulated in bfloat16."""
    moe = load_model(ckpt, dtype=torch.bfloat16).layers[1].moe
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(4)).bfloat16()
    weights, experts = moe.route(x)
    D, I = 64, moe.inter
    w13, w2 = moe.w13.view(-1, 2 * I, D), moe.w2.view(-1, D, I)
    rows = []
    for n in range(9):
        outs = [F.linear(F.silu(F.linear(x[n], w13[e][:I])) * F.linear(x[n], w13[e][I:]), w2[e])
                for e in experts[n].tolist()]
        rows.append((torch.stack(outs).float() * weights[n, :, None]).sum(0).bfloat16())
    torch.testing.assert_close(moe._looped(x, weights, experts), torch.stack(rows), rtol=0, atol=0)


# Caches that serve a block-causal model exactly (``Cache.block_causal``); dllm, d2cache and vicinity refuse.
CACHES = [None, ("block", {}), ("prefix", {}), ("dual", {"refresh_interval": 3})]
REFUSED = [("dllm", {"kp": 3, "kr": 2}, "reuses stale attention"),
           ("d2cache", {"current_k": 3, "inflate_w": 2}, "full-attention scores"),
           ("vicinity", {"prefix_look": 4, "after_look": 4}, "never attends to")]
# One prompt longer than two blocks (full prompt blocks are prefilled), one of exactly one block (no prompt tail:
# its answer is one block shorter on the aligned canvas), the others end inside blocks 0 and 1.
LONG = "A much longer prompt that fills more than two blocks of thirty-two tokens each, by a margin!"
EXACT = "Thirty-two characters, exactly!!"  # a whole prompt block: its answer ends a block before LONG's


def encode(tok, prompts):
    enc = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    P = max(map(len, enc))
    ids = torch.tensor([[tok.pad_token_id] * (P - len(e)) + e for e in enc])
    mask = torch.tensor([[False] * (P - len(e)) + [True] * len(e) for e in enc])
    return enc, ids, mask


def decode(model, tok, ids, mask, cache, strategy="vanilla", gen_length=32, **kw):
    from lmeval_dllm.caches import build_cache

    sampler = build_sampler(strategy, Proposal.from_params().bind(tok.eos_token_id, None), **kw)
    return generate(model, ids, mask, sampler, GenerationConfig(gen_length, 32),
                    stop_token_ids=torch.tensor([tok.eos_token_id]),
                    cache=None if cache is None else build_cache(cache[0], **cache[1]))


@pytest.mark.parametrize("cache", CACHES, ids=lambda c: "none" if c is None else c[0])
@pytest.mark.parametrize("strategy,kw", [("vanilla", {"threshold": 0.04}),
                                         ("llada21_edit", {"threshold": 0.04, "editing_threshold": 0.03})],
                         ids=["vanilla", "llada21_edit"])
def test_decoding_batch_equals_each_prompt_alone(ckpt, cache, strategy, kw):
    """Block-causal (blocks of 32 from canvas column 0): a left-padded batch of prompts whose lengths differ mod 32
    (one with a full prompt block) decodes exactly as each prompt alone, tokens and forward passes; the thresholds
    are low enough for the tiny random model's flat distributions that steps commit (and edit) several tokens."""
    from transformers import AutoTokenizer

    model, tok = load_model(ckpt), AutoTokenizer.from_pretrained(ckpt)
    assert model.args.block_size == 32
    enc, ids, mask = encode(tok, PROMPTS + [EXACT, LONG])
    assert len(enc[-1]) > 64 and len(enc[-2]) == 32 and len({len(e) % 32 for e in enc}) >= 4
    batch = decode(model, tok, ids, mask, cache, strategy, **kw)
    for i, e in enumerate(enc):
        alone = decode(model, tok, torch.tensor([e]), None, cache, strategy, **kw)
        n = int(alone.gen_lengths[0])
        assert alone.tokens[0, :n].tolist() == batch.tokens[i, :n].tolist(), i
        assert alone.nfe[0] == batch.nfe[i], i
    assert (batch.committed > 0).all()


@pytest.mark.parametrize("cache,kw,why", REFUSED, ids=lambda c: c if isinstance(c, str) else "")
def test_full_attention_caches_refuse_before_decoding(ckpt, cache, kw, why):
    from transformers import AutoTokenizer

    model, tok = load_model(ckpt), AutoTokenizer.from_pretrained(ckpt)
    with pytest.raises(ValueError, match=f"cache={cache!r} cannot serve a block-causal .*{why}"):
        decode(model, tok, torch.tensor([[5, 6, 7]]), None, (cache, kw))


def test_block_length_other_than_the_block_is_refused(ckpt):
    from transformers import AutoTokenizer

    model, tok = load_model(ckpt), AutoTokenizer.from_pretrained(ckpt)
    sampler = build_sampler("vanilla", Proposal.from_params().bind(tok.eos_token_id, None))
    with pytest.raises(ValueError, match="block_length=12 does not divide the model.s block size 32"):
        generate(model, torch.tensor([[5, 6]]), None, sampler, GenerationConfig(24, 12),
                 stop_token_ids=torch.tensor([tok.eos_token_id]))


def test_through_the_lm_eval_model(ckpt):
    """``--model dllm`` on the checkpoint: no likelihood scheme (the release has none), <|role_end|> ends an
    answer, generate_until decodes."""
    from lm_eval.api.instance import Instance

    from lmeval_dllm.lm import DLLM

    lm = DLLM(pretrained=ckpt, batch_size=2)
    assert lm.tokenizer.convert_tokens_to_ids("<|role_end|>") in lm.stop_token_ids.tolist()
    reqs = [Instance("generate_until", {}, (p, {"until": ["\n\n"], "max_gen_toks": 16}), i)
            for i, p in enumerate(PROMPTS)]
    answers = lm.generate_until(reqs)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    with pytest.raises(ValueError, match="model family 'llada2' has no likelihood scheme"):
        lm.loglikelihood([Instance("loglikelihood", {}, ("Hi", " there"), 0)])


@pytest.mark.parametrize("cache", [("block", {}), ("prefix", {"refresh_interval": 1}),
                                   ("dual", {"refresh_interval": 1})], ids=lambda c: c[0])
@pytest.mark.parametrize("strategy,kw", [("vanilla", {"threshold": 0.04}),
                                         ("llada21_edit", {"threshold": 0.04, "editing_threshold": 0.03})],
                         ids=["vanilla", "llada21_edit"])
def test_exact_caches_equal_no_cache(ckpt, cache, strategy, kw):
    """cache=block (finished blocks' K/V kept) and the prefix / dual caches refreshed every step give the tokens
    and forward passes of the whole canvas recomputed every step (cache=none), with and without edits."""
    from transformers import AutoTokenizer

    model, tok = load_model(ckpt), AutoTokenizer.from_pretrained(ckpt)
    _, ids, _ = encode(tok, [LONG])
    plain, cached = (decode(model, tok, ids, None, c, strategy, gen_length=64, **kw) for c in (None, cache))
    assert cached.tokens.tolist() == plain.tokens.tolist() and cached.nfe.tolist() == plain.nfe.tolist()


def test_release_decoder_settings_are_the_family_defaults():
    """LLaDA2.0's generate (threshold 0.95, blocks of 32) when neither --model_args nor the task says otherwise; a
    gen_length that is not a multiple of the block is rounded up to whole blocks (notes say both)."""
    from lmeval_dllm.decoding import resolve
    from lmeval_dllm.models import FAMILIES

    defaults = FAMILIES["llada2"].decoding_defaults
    assert defaults == {"vanilla": {"threshold": 0.95}}
    d = resolve("vanilla", "block", {}, {"max_gen_toks": 40}, block_size=32, family_defaults=defaults)
    assert (d.config.gen_length, d.config.block_length, d.sampler.threshold) == (64, 32, 0.95)
    assert d.notes == ("strategy 'vanilla' on this model family: threshold=0.95 (the release's default)",
                       "gen_length=40 is not a multiple of the block-causal model's block 32: gen_length=64 "
                       "(whole blocks)")
    assert resolve("vanilla", None, {"threshold": 0.5}, {"max_gen_toks": 32}, block_size=32,
                   family_defaults=defaults).sampler.threshold == 0.5  # the user's value wins
    assert resolve("vanilla", None, {}, {"threshold": 0.7, "max_gen_toks": 32}, block_size=32,
                   family_defaults=defaults).sampler.threshold == 0.7  # and the task's
    edit = resolve("llada21_edit", None, {}, {"max_gen_toks": 32}, block_size=32, family_defaults=defaults)
    assert edit.sampler.threshold == 0.95 and edit.notes == ()  # its own release defaults, nothing to note
