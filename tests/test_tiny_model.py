"""The bundled tiny-llada (lmeval_dllm/assets/tiny-llada): behaviour only a trained model shows.

Problems are from tiny_gsm's test split (never trained on). Expected strings and forward-pass counts were
read off the shipped checkpoint in float32 on CPU (docs/tiny_model.md); a random or broken model, a changed
decode loop or a changed sampler fails them.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from batches import pad_left

from lmeval_dllm.generate import GenerationConfig, generate
from lmeval_dllm.lm import BUNDLED_MODELS
from lmeval_dllm.models import load_model
from lmeval_dllm.samplers.proposal import Proposal
from lmeval_dllm.samplers.vanilla import LowConfidenceSampler

TINY = BUNDLED_MODELS["tiny-llada"]
# tiny_gsm's generation settings (task_configs/tiny_gsm/tiny_gsm.yaml)
CONFIG = GenerationConfig(gen_length=64, block_length=32)

# test split, doc 89: the answer's two numbers must agree, which parallel decoding can break
SHARE_Q = "Raj shares 140 cookies equally among 5 friends. How many cookies does each friend get?"
SHARE_A = "140 / 5 = 28\n#### 28"
# test split, doc 2: the answer runs past the first 32-token block
TWO_STEP_Q = "Mia has 89 cookies. She buys 35 more, then gives 80 to Jack. How many cookies does Mia have now?"


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoTokenizer

    return load_model(TINY), AutoTokenizer.from_pretrained(TINY)


def decode(tiny, questions: list[str], **sampler_kw) -> list[tuple[str, int]]:
    """Greedy decode of chat-formatted questions (one left-padded batch) -> [(answer before EoT/EOS, NFE)]."""
    model, tok = tiny
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in questions]
    encoded = [tok.encode(t, add_special_tokens=False) for t in texts]
    prompt_ids, prompt_mask = pad_left(tok.pad_token_id, encoded)  # (B, P)
    stop = torch.tensor([tok.eos_token_id, tok.convert_tokens_to_ids("<|eot_id|>")])
    out = generate(model, prompt_ids, prompt_mask, LowConfidenceSampler(Proposal(), **sampler_kw), CONFIG,
                   stop_token_ids=stop)
    return [(tok.decode(row[:n]), nfe) for row, n, nfe in
            zip(out.tokens.tolist(), out.answer_length.tolist(), out.nfe.tolist())]


def test_bundled_checkpoint_is_small_and_in_the_official_llada_layout():
    files = sorted(os.listdir(TINY))
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    assert sum(os.path.getsize(os.path.join(TINY, f)) for f in files) <= 10 * 2**20
    with open(os.path.join(TINY, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    dims = (config["model_type"], config["d_model"], config["n_layers"], config["mask_token_id"])
    assert dims == ("llada", 256, 6, 261)
    with open(os.path.join(TINY, "model.safetensors.index.json"), encoding="utf-8") as f:
        names = json.load(f)["weight_map"]
    assert "model.transformer.blocks.5.q_proj.weight" in names and "model.transformer.ff_out.weight" in names


def test_vanilla_one_token_per_step_solves_a_test_problem(tiny):
    # Low-confidence remasking fills every position of the block, the EOS padding after the answer first (it
    # is the most confident), so one block costs 32 forward passes.
    assert decode(tiny, [SHARE_Q], num_transfer_tokens=1) == [(SHARE_A, 32)]


def test_threshold_decoding_is_right_in_fewer_forward_passes(tiny):
    assert decode(tiny, [SHARE_Q], threshold=0.9) == [(SHARE_A, 4)]  # vanilla: 32
    assert decode(tiny, [SHARE_Q], factor=1.0)[0][1] < 32


def test_aggressive_threshold_commits_inconsistent_tokens(tiny):
    """threshold 0.5 commits the quotient and the final answer in the same pass, and they disagree."""
    assert decode(tiny, [SHARE_Q], threshold=0.5) == [("140 / 5 = 20\n#### 6 ", 2)]


def test_end_to_end_through_lm_eval_with_the_short_name():
    """``pretrained=tiny-llada`` through the lm-eval model, with tiny_gsm's generation kwargs, in left-padded
    batches of two; test doc 2's answer spans both 32-token blocks."""
    from lm_eval.api.instance import Instance

    from lmeval_dllm.lm import DLLM

    lm = DLLM(pretrained="tiny-llada", threshold=0.9, batch_size=2)
    gen_kwargs = {"until": ["Question:"], "do_sample": False, "temperature": 0.0, "gen_length": 64,
                  "block_length": 32}
    questions = [SHARE_Q, TWO_STEP_Q,
                 "Omar shares 198 balloons equally among 9 friends. How many balloons does each friend get?"]
    contexts = [lm.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    requests = [Instance("generate_until", {}, (c, gen_kwargs), i) for i, c in enumerate(contexts)]
    assert lm.generate_until(requests, disable_tqdm=True) == [
        SHARE_A, "89 + 35 = 124\n124 - 80 = 44\n#### 44", "198 / 9 = 22\n#### 22"]
    stats = lm.get_model_info()["dllm_stats"]
    assert (stats["requests"], stats["batches"], stats["mean_nfe"]) == (3, 2, pytest.approx((4 + 2 + 2) / 3))
