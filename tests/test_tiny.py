"""lmeval_dllm/tiny.py: exporting a module to the official layout, and the tokenizer files it writes."""

from __future__ import annotations

import json
import os

import pytest
import torch

from lmeval_dllm.models import load_model
from lmeval_dllm.tiny import official_state_dict, write_checkpoint


@pytest.mark.parametrize("family", ["llada", "dream", "fast_dllm_v2"])  # fast_dllm_v2: a tied head
def test_official_state_dict_round_trips_through_the_loader(tmp_path, family):
    """Export (fused q/k/v and gate/up cut back into official pieces) then load = the same module."""
    src = load_model(write_checkpoint(str(tmp_path / "a"), family, seed=3))
    weights = official_state_dict(src)
    dst = load_model(write_checkpoint(str(tmp_path / "b"), family, weights=weights, shards=1))
    for (name, p), (name2, q) in zip(src.state_dict().items(), dst.state_dict().items()):
        assert name == name2 and torch.equal(p, q), name
    x = torch.randint(0, 256, (2, 9))
    pos = torch.arange(9).expand(2, -1)
    assert torch.equal(src(x, pos), dst(x, pos))


def test_official_state_dict_casts_for_storage(tmp_path):
    model = load_model(write_checkpoint(str(tmp_path), "llada"))
    weights = official_state_dict(model, dtype=torch.bfloat16)
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert weights["model.transformer.blocks.0.k_proj.weight"].shape == (64, 64)  # one third of fused wqkv


def test_tokenizer_config_keeps_class_and_chat_template_like_the_official_files(tmp_path):
    """transformers 4.x reads neither chat_template.jinja nor the 5.x class name TokenizersBackend."""
    write_checkpoint(str(tmp_path), "llada")
    with open(tmp_path / "tokenizer_config.json", encoding="utf-8") as f:
        config = json.load(f)
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["chat_template"].startswith("{% set loop_messages = messages %}")
    assert not os.path.exists(tmp_path / "chat_template.jinja")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    text = tok.apply_chat_template([{"role": "user", "content": " 2+2? "}], tokenize=False, add_generation_prompt=True)
    assert text == ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tok.encode(text, add_special_tokens=False)[:3] == [256, 259, ord("u")]
