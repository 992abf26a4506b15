"""SDAR / TraDo (lmeval_dllm/models/sdar.py) and the block-causal seam (transformer.block_causal, the block-aligned
canvas of generate.py): the family is chosen by its config.json and loads from a tiny checkpoint in the release's
layout; the attention mask has the exact block pattern; the logits equal a reference of the release's math
written here from the official tensors (block-causal mask, q/k norm, head_dim != hidden / heads); a later block
never changes an earlier block's logits; a batch of prompts ending at different offsets inside a block decodes
exactly as each prompt alone; the release's decoder rules are our strategies on hand-built logits; every setting a
block-causal model cannot use is refused before any model work, with its reason; and ``lm_eval --model dllm``
runs a tiny SDAR checkpoint.

The logits and greedy tokens were also compared with the release's own ``modeling_sdar.py`` and
``block_diffusion_generate`` in a scratch environment (never committed): docs/models.md has the figures."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from batches import assert_block_cache_exact_and_rows_alone, pad_left
from models_support import official, rms_norm, rope_tables, rotate, swiglu

from lmeval_dllm.caches import CACHES, build_cache
from lmeval_dllm.caches.block import BlockCache
from lmeval_dllm.decoding import resolve
from lmeval_dllm.generate import GenerationConfig, answer_columns, block_aligned_canvas, check_block_causal, generate
from lmeval_dllm.models import family_for, load_model
from lmeval_dllm.models.sdar import parse_config, tiny_config
from lmeval_dllm.models.transformer import block_causal
from lmeval_dllm.samplers import SAMPLERS, Proposal, build_sampler
from lmeval_dllm.state import DecodeState
from lmeval_dllm.tiny import write_checkpoint

IDS = {"bos": 256, "eos": 256, "eot": 258, "mask": 259, "pad": 256, "vocab": 260}


@pytest.fixture(scope="module")
def sdar_dir(tmp_path_factory) -> str:
    return write_checkpoint(str(tmp_path_factory.mktemp("tiny-sdar")), "sdar", seed=1)


@pytest.fixture(scope="module")
def sdar_model(sdar_dir):
    return load_model(sdar_dir)


def reference_logits(cfg: dict, w: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """modeling_sdar.py's inference forward for one unpadded row at positions 0..T-1, written from the official
    tensors: Qwen3 layers (q/k RMSNorm over head_dim before RoPE, GQA, head_dim from config.json) under the
    release generate.py's block-lower-triangular mask."""
    H, Hkv, Dh, bs = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["block_size"]
    norm = partial(rms_norm, eps=cfg["rms_norm_eps"])
    B, T = ids.shape
    cos, sin = rope_tables(cfg["rope_theta"], Dh, T)
    blocks = torch.arange(T) // bs
    allowed = blocks[None, :] <= blocks[:, None]  # (T, T): key block <= query block
    h = w["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = norm(h, w[p + "input_layernorm.weight"])
        q = norm((x @ w[p + "self_attn.q_proj.weight"].T).view(B, T, H, Dh), w[p + "self_attn.q_norm.weight"])
        k = norm((x @ w[p + "self_attn.k_proj.weight"].T).view(B, T, Hkv, Dh), w[p + "self_attn.k_norm.weight"])
        v = (x @ w[p + "self_attn.v_proj.weight"].T).view(B, T, Hkv, Dh)
        q, k, v = rotate(q.transpose(1, 2), cos, sin), rotate(k.transpose(1, 2), cos, sin), v.transpose(1, 2)
        k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
        scores = (q @ k.transpose(-1, -2) / Dh ** 0.5).masked_fill(~allowed, float("-inf"))
        att = torch.softmax(scores, -1) @ v
        h = h + att.transpose(1, 2).reshape(B, T, -1) @ w[p + "self_attn.o_proj.weight"].T
        x = norm(h, w[p + "post_attention_layernorm.weight"])
        h = h + swiglu(w, x, p + "mlp.")
    return norm(h, w["model.norm.weight"]) @ w["lm_head.weight"].T


# -- the family ---------------------------------------------------------------------------------------------------

def test_config_chooses_sdar_and_reads_block_size_and_head_dim(sdar_dir):
    cfg, tensors = official(sdar_dir)
    assert family_for(cfg).name == "sdar"
    args = parse_config(cfg)
    assert (args.block_size, args.head_dim, args.dim // args.n_heads, args.qk_norm, args.logit_shift) == (4, 32, 16,
                                                                                                         True, 0)
    assert args.mask_token_id == 259 and args.eos_token_id == 256
    names = set(tensors)
    for i in range(2):
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "self_attn.q_norm", "self_attn.k_norm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
                     "input_layernorm", "post_attention_layernorm"):
            assert f"model.layers.{i}.{part}.weight" in names
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= names
    assert tensors["model.layers.0.self_attn.q_proj.weight"].shape == (4 * 32, 64)  # head_dim 32, not 64 / 4


@pytest.mark.parametrize("key, value, message", [
    ("hidden_act", "gelu", "SDAR config.json has hidden_act='gelu'; only 'silu' is supported"),
    ("attention_bias", True, "SDAR config.json has attention_bias=True; only false is supported"),
    ("rope_scaling", {"type": "yarn"}, "SDAR config.json has rope_scaling={'type': 'yarn'}; only null (plain RoPE) "
                                       "is supported"),
    ("use_sliding_window", True, "SDAR config.json has use_sliding_window=True; only false (full attention) is "
                                 "supported"),
    ("num_experts", 128, "SDAR config.json has num_experts=128; only a dense MLP (the SDAR-30B-A3B MoE checkpoints "
                         "are not supported) is supported"),
    ("block_size", 0, "SDAR config.json has block_size=0; only an integer >= 1 is supported"),
])
def test_config_fields_we_do_not_reproduce_are_errors(key, value, message):
    cfg = tiny_config(IDS)
    cfg[key] = value
    with pytest.raises(ValueError) as e:
        parse_config(cfg)
    assert str(e.value) == message


def test_config_without_block_size_is_an_error():
    cfg = tiny_config(IDS)
    del cfg["block_size"]
    with pytest.raises(ValueError, match=r"lacks block_size; an SDARForCausalLM config has .*block_size"):
        parse_config(cfg)


# -- block-causal attention ---------------------------------------------------------------------------------------

def test_block_causal_mask_pattern_by_hand():
    # blocks of 2 over 6 columns; the queries are columns 2, 3, 4; key 1 is padding
    padding = torch.tensor([[True, False, True, True, True, True]])[:, None, None, :]
    mask = block_causal(torch.tensor([[2, 3, 4]]), 6, 2, padding)
    assert mask.shape == (1, 1, 3, 6)
    assert mask[0, 0].int().tolist() == [
        [1, 0, 1, 1, 0, 0],  # column 2 (block 1): block 0 (minus the pad) and its own block
        [1, 0, 1, 1, 0, 0],  # column 3: the same
        [1, 0, 1, 1, 1, 1],  # column 4 (block 2): every block up to its own
    ]
    # a padding query whose block holds only padding keys keeps its own column (else SDPA gives NaN)
    alone = block_causal(torch.tensor([[0, 1]]), 4, 2, torch.tensor([[False, False, True, True]])[:, None, None, :])
    assert alone[0, 0].int().tolist() == [[1, 0, 0, 0], [0, 1, 0, 0]]


def test_logits_equal_the_release_math(sdar_dir, sdar_model):
    cfg, w = official(sdar_dir)
    ids = torch.randint(0, 256, (1, 11), generator=torch.Generator().manual_seed(0))
    ours = sdar_model(ids, torch.arange(11)[None])
    torch.testing.assert_close(ours, reference_logits(cfg, w, ids), rtol=1e-4, atol=1e-4)


def test_a_later_block_never_changes_an_earlier_block(sdar_model):
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 256, (1, 12), generator=g)
    b = a.clone()
    b[:, 8:] = torch.randint(0, 256, (1, 4), generator=g)  # block 2 differs
    pos = torch.arange(12)[None]
    la, lb = sdar_model(a, pos), sdar_model(b, pos)
    assert torch.equal(la[:, :8], lb[:, :8])
    assert not torch.allclose(la[:, 8:], lb[:, 8:])
    b[:, 5] = 7 if int(a[0, 5]) != 7 else 8  # a change inside block 1 reaches all of block 1
    assert not torch.allclose(sdar_model(b, pos)[:, 4], la[:, 4])


def test_a_cached_step_gives_the_full_forward_logits(sdar_model):
    # the block cache's forward (the rows of [0, block end) written, only the block's logits) vs a full forward
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[True] * 7, [False, False, True, True, True, True, True]])
    x, att, pos, P, start, width = block_aligned_canvas(ids, mask, 8, 4, 259, 256)
    state = DecodeState(x=x, position_ids=pos, attention_mask=att, prompt_len=P, mask_token_id=259,
                        stop_token_ids=torch.tensor([256]))
    cache = BlockCache(cuda_graphs=False)
    cache.setup(sdar_model, state)
    state.block = slice(P, P + 4)
    cached = cache.forward(sdar_model, state, state.block).logits
    full = sdar_model(x, pos, att)[:, P:P + 4]
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


# -- the block-aligned canvas -------------------------------------------------------------------------------------

def test_block_aligned_canvas_by_hand():
    # prompts of 6 and 3 tokens (left-padded to 6), blocks of 4, 4 generated: the release lays a 6-token prompt
    # in 8 + 4 columns (block 0 prompt, block 1 its 2-token tail + 2 masks, block 2 masks), a 3-token one in 4 + 4;
    # the second row is padded by one block so that both tails start canvas block 1
    ids = torch.tensor([[1, 2, 3, 4, 5, 6], [0, 0, 0, 7, 8, 9]])
    mask = ids != 0
    x, att, pos, P, start, width = block_aligned_canvas(ids, mask, 4, 4, 99, 50)
    M, F_ = 99, 50
    assert P == 4  # the most full prompt blocks is 1: generation starts at canvas block 1
    assert x.tolist() == [[1, 2, 3, 4, 5, 6, M, M, M, M, M, M],
                          [F_, F_, F_, F_, 7, 8, 9, M, M, M, M, M]]
    assert att.int().tolist() == [[1] * 12, [0] * 4 + [1] * 8]
    assert pos.tolist() == [list(range(12)), [0] * 4 + list(range(8))]
    assert start.tolist() == [2, 3] and width.tolist() == [6, 5]  # answers: 12 - 6 and 8 - 3 masks
    assert answer_columns(x[:, P:], start, width, fill=-1).tolist() == [[M] * 6 + [-1] * 2, [M] * 5 + [-1] * 3]
    # a row whose prompt fills whole blocks is left-padded by whole blocks
    x, att, pos, P, start, width = block_aligned_canvas(torch.tensor([[1, 2, 3, 4, 5], [0, 0, 0, 0, 6]]),
                                                        torch.tensor([[1] * 5, [0, 0, 0, 0, 1]]).bool(), 4, 4, M, F_)
    assert P == 4 and x[1].tolist() == [F_, F_, F_, F_, 6, M, M, M, M, M, M, M] and pos[1, 4:].tolist() == \
        list(range(8)) and start.tolist() == [1, 1] and width.tolist() == [7, 7]
    # prompts that fill whole blocks: no block more than gen_length, and a row that ends mid-block gets one
    x, att, pos, P, start, width = block_aligned_canvas(torch.tensor([[1, 2, 3, 4], [0, 0, 0, 5]]),
                                                        torch.tensor([[1] * 4, [0, 0, 0, 1]]).bool(), 4, 4, M, F_)
    assert P == 4 and x.tolist() == [[1, 2, 3, 4, M, M, M, M, F_, F_, F_, F_], [F_, F_, F_, F_, 5, M, M, M, M, M, M, M]]
    assert att[0].int().tolist() == [1] * 8 + [0] * 4 and width.tolist() == [4, 7] and start.tolist() == [0, 1]


PROMPT_LENGTHS = (1, 3, 4, 6, 9, 12)  # every remainder mod 4, and whole blocks


@pytest.mark.parametrize("strategy, kw", [("vanilla", {}), ("vanilla", {"threshold": 0.3}),
                                          ("vanilla", {"num_transfer_tokens": 2}), ("ar", {}),
                                          ("eb_sampler", {})])
@pytest.mark.parametrize("cache", ["block", "none"])
def test_batch_equals_each_prompt_alone(sdar_model, strategy, kw, cache):
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]
    stops = torch.tensor([256, 258])

    def run(batch):
        ids, mask = pad_left(256, batch)
        sampler = build_sampler(strategy, Proposal.from_params(), **kw)
        return generate(sdar_model, ids, mask, sampler, GenerationConfig(8, 4), stop_token_ids=stops,
                        cache=build_cache(cache, cuda_graphs=False))

    out = run(prompts)
    for i, p in enumerate(prompts):
        alone = run([p])
        n = int(alone.answer_length[0])
        assert int(out.answer_length[i]) == n, (i, len(p))
        assert out.tokens[i, :n].tolist() == alone.tokens[0, :n].tolist(), (i, len(p))
        assert int(out.gen_lengths[i]) == int(alone.gen_lengths[0]) == -(-(len(p) + 8) // 4) * 4 - len(p)
        assert int(out.nfe[i]) == int(alone.nfe[0]), (i, len(p))


def test_answers_start_after_the_prompt_tail(sdar_model):
    # one token per step: every generation column is decoded once; the answer holds exactly the masks
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(4))
    out = generate(sdar_model, ids, None, build_sampler("vanilla", Proposal.from_params()), GenerationConfig(8, 4),
                   stop_token_ids=torch.zeros(0, dtype=torch.long), cache=build_cache("block", cuda_graphs=False))
    assert out.gen_lengths.tolist() == [10] and out.nfe.tolist() == [10] and out.steps == 10
    assert sorted(out.decoded_at[0, :10].tolist()) == list(range(10)) and out.decoded_at[0, 10:].tolist() == [-1, -1]
    assert (out.tokens[0, :10] != 259).all() and out.tokens[0, 10:].tolist() == [259, 259]  # masks after it


# -- the release decoder's rules on hand-built logits ------------------------------------------------------------

def _state(x: list[int], block: slice) -> DecodeState:
    x = torch.tensor([x])
    return DecodeState(x=x, position_ids=torch.arange(x.shape[1])[None], attention_mask=None, prompt_len=block.start,
                       mask_token_id=9, stop_token_ids=torch.tensor([8]), block=block,
                       active=torch.tensor([True]))


def _logits(confidences: list[float]) -> torch.Tensor:
    """(1, L, 10) logits whose argmax is token i + 1 at position i with softmax probability ``confidences[i]``."""
    L = len(confidences)
    logits = torch.zeros(1, L, 10)
    for i, c in enumerate(confidences):  # the other 9 tokens share 1 - c evenly (each below c for c > 0.1)
        logits[0, i] = float(torch.log(torch.tensor((1 - c) / 9 / c)))
        logits[0, i, i + 1] = 0.0
    return logits


@pytest.mark.parametrize("kw, expected", [
    # low_confidence_dynamic (threshold 0.85, 1 token per step): 2 above the threshold >= 1 -> both
    ({"threshold": 0.85, "num_transfer_tokens": 1}, [False, True, False, True]),
    # low_confidence_dynamic with a floor of 3: only 2 above -> the top 3 (the release's else branch)
    ({"threshold": 0.85, "num_transfer_tokens": 3}, [True, True, False, True]),
    # low_confidence_static, 2 per step: the top 2
    ({"num_transfer_tokens": 2}, [False, True, False, True]),
])
def test_release_remasking_rules_are_vanilla(kw, expected):
    # block of 4 masks (column 4..7) after a 4-token prompt; confidences 0.6, 0.95, 0.3, 0.9
    state = _state([1, 2, 3, 4, 9, 9, 9, 9], slice(4, 8))
    out = build_sampler("vanilla", Proposal.from_params(), **kw).step(_logits([0.6, 0.95, 0.3, 0.9]), state)
    assert out.commit[0].tolist() == expected
    assert out.tokens[0].tolist() == [1, 2, 3, 4]


def test_release_sequential_is_ar():
    # the prompt tail (columns 4, 5) is not a mask: sequential commits the leftmost masks 6, 7 (2 per step)
    state = _state([1, 2, 3, 4, 5, 6, 9, 9, 9, 9, 9, 9], slice(4, 12))
    out = build_sampler("ar", Proposal.from_params(), num_transfer_tokens=2).step(
        _logits([0.5] * 8), state)
    assert out.commit[0].tolist() == [False, False, True, True, False, False, False, False]


# -- what a block-causal model refuses, before any model work -----------------------------------------------------

@pytest.mark.parametrize("strategy, cache, kw, message", [
    ("vanilla", None, {"block_length": 8, "gen_length": 16},
     "block_length=8 does not divide the model's block size 4 (config.json block_size)"),
    ("vanilla", None, {"block_length": 3, "gen_length": 12},
     "block_length=3 does not divide the model's block size 4 (config.json block_size)"),
    ("vanilla", "dllm", {}, "cache='dllm' cannot serve a block-causal (block-diffusion) model: it reuses stale"),
    ("vanilla", "d2cache", {}, "cache='d2cache' cannot serve a block-causal (block-diffusion) model: its row"),
    ("vanilla", "vicinity", {}, "cache='vicinity' cannot serve a block-causal (block-diffusion) model: it refreshes"),
    ("vanilla", "sparse", {}, "cache='sparse' cannot serve a block-causal (block-diffusion) model: it keeps an"),
    ("vanilla", "elastic", {}, "cache='elastic' cannot serve a block-causal (block-diffusion) model: its drift"),
    ("vanilla", "dkv", {}, "cache='dkv' cannot serve a block-causal (block-diffusion) model: it delays and"),
    ("wino", None, {}, "strategy 'wino' cannot decode a block-causal (block-diffusion) model: it changes the canvas "
                       "or runs extra rows (extra_rows)"),
    ("daedal", None, {}, "strategy 'daedal' cannot decode a block-causal (block-diffusion) model: it reads logits "
                         "past the current block"),
    ("prophet", None, {}, "strategy 'prophet' cannot decode a block-causal (block-diffusion) model: it reads logits"),
    ("klass", None, {}, "strategy 'klass' cannot decode a block-causal (block-diffusion) model: it reads logits"),
])
def test_refused_settings_name_the_reason(strategy, cache, kw, message):
    with pytest.raises(ValueError) as e:
        resolve(strategy, cache, kw, {"max_gen_toks": 16}, max_length=512, block_size=4)
    assert str(e.value).startswith(message), str(e.value)


def test_exactly_the_exact_caches_serve_a_block_causal_model():
    """A new cache must say whether it serves block-causal models (``Cache.block_causal``): only the caches that are
    exact there do."""
    assert sorted(n for n, c in CACHES.items() if c.block_causal is True) == ["block", "dual", "prefix"]


def test_block_length_defaults_to_the_block_size():
    d = resolve("vanilla", "block", {}, {"max_gen_toks": 16}, max_length=512, block_size=4)
    assert (d.config.gen_length, d.config.block_length) == (16, 4)
    # a divisor decodes sub-blocks of the model's blocks (Fast-dLLM v2's scheme)
    assert resolve("vanilla", "block", {"block_length": 2}, {"max_gen_toks": 16}, block_size=4).config.block_length == 2
    for cache in ("none", "prefix", "dual"):  # exact on a block-causal model (the block sees no key right of it)
        assert resolve("vanilla", cache, {}, {"max_gen_toks": 16}, block_size=4).config.block_length == 4


def test_cache_block_needs_a_block_causal_model():

    with pytest.raises(ValueError, match=r"^cache='block' serves block-causal \(block-diffusion\) models only"):
        check_block_causal(None, SAMPLERS["vanilla"], CACHES["block"], None)
    resolve("vanilla", "block", {}, {"max_gen_toks": 16})  # the model not known yet: nothing to say


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_prefix_and_dual_are_exact_on_a_block_causal_model(sdar_model, cache):
    g = torch.Generator().manual_seed(5)
    ids, mask = pad_left(256, [torch.randint(0, 256, (n,), generator=g).tolist() for n in (2, 7, 8)])

    def run(name):
        return generate(sdar_model, ids, mask, build_sampler("vanilla", Proposal.from_params(), threshold=0.3),
                        GenerationConfig(12, 4), stop_token_ids=torch.tensor([256]),
                        cache=build_cache(name, cuda_graphs=False))

    a, b = run(cache), run("none")
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.nfe, b.nfe)


# -- lm_eval --model dllm ----------------------------------------------------------------------------------------

def test_lm_eval_runs_a_tiny_sdar_checkpoint(tmp_path):
    from cli_run import run_lm_eval

    # the CLI tasks carry block_length=8: a checkpoint trained with blocks of 8 (as SDAR's -b8 variants)
    directory = write_checkpoint(str(tmp_path / "tiny-sdar-b8"), "sdar", seed=2, block_size=8)
    results, samples, stats = run_lm_eval(tmp_path, f"pretrained={directory},threshold=0.5")
    assert (results["config"]["dllm_cache"], results["config"]["dllm_strategy"]) == ("block", "vanilla")
    assert [len(samples[t]) for t in ("smoke_three", "smoke_one")] == [3, 1]
    assert len(stats) == 4
    for s in stats:  # the release's canvas: ceil((L + 8) / 8) * 8 positions, L of them the prompt
        L = s["prompt_tokens"]
        assert s["gen_length"] == -(-(L + 8) // 8) * 8 - L, s
        assert 1 <= s["nfe"] <= s["gen_length"], s


# -- every strategy with its defaults -----------------------------------------------------------------------------

REFUSED_STRATEGIES = {"wino", "daedal", "prophet", "klass", "d3llm"}  # extra rows / a growing canvas / logits past the block


@pytest.mark.parametrize("strategy", sorted(SAMPLERS))
def test_every_strategy_with_its_defaults_decodes_or_is_refused(sdar_model, strategy):

    if strategy in REFUSED_STRATEGIES:
        with pytest.raises(ValueError, match=rf"^strategy {strategy!r} cannot decode a block-causal"):
            check_block_causal(4, SAMPLERS[strategy], CACHES["block"], 4)
        return
    kw = {"debias": False} if strategy == "pc_sampler" else {}
    assert_block_cache_exact_and_rows_alone(sdar_model, strategy, kw, (2, 4, 7), GenerationConfig(8, 4), [256, 258])


def test_the_lm_eval_model_defaults_and_refuses_loglikelihood(sdar_dir):
    from lm_eval.api.instance import Instance

    from lmeval_dllm.lm import DLLM

    lm = DLLM(pretrained=sdar_dir, gen_length=8)
    assert (lm.cache_name, type(lm.cache).__name__, lm.block_size) == ("block", "BlockCache", 4)
    config, sampler, _ = lm._decoding_for({"until": ["\n\n"], "max_gen_toks": 8})
    assert (config.gen_length, config.block_length) == (8, 4)
    (answer,) = lm.generate_until([Instance("generate_until", {}, ("Hi", {"until": ["\n\n"]}), 0)],
                                  disable_tqdm=True)
    assert isinstance(answer, str)
    assert DLLM(pretrained=sdar_dir, gen_length=8, cache="none").cache_name is None  # cache= given: kept
    with pytest.raises(ValueError, match=r"^model family 'sdar' has no likelihood scheme \(Family.likelihood is "
                                         r"None\): loglikelihood / multiple-choice tasks cannot run on it"):
        lm.loglikelihood([Instance("loglikelihood", {}, ("Hello", " world"), 0)])
    with pytest.raises(ValueError, match=r"^block_length=8 does not divide the model's block size 4"):
        DLLM(pretrained=sdar_dir, gen_length=8, block_length=8)
