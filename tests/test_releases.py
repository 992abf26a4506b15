"""Checkpoints released in an existing family's layout (docs/models.md): DiffuCoder's tokenizer, the Dream recipe
of Dream-Coder / DiffuCoder through the lm-eval model."""

from __future__ import annotations

import torch
from lm_eval.api.instance import Instance

from lmeval_dllm.lm import DLLM
from lmeval_dllm.models.dream import DIFFUCODER_TOKENIZER
from lmeval_dllm.tiny import write_checkpoint


def test_diffucoder_layout_loads_and_stops_at_its_pad(tmp_path):
    """DiffuCoder pads with <|dlm_pad|> (its README cuts answers there): with EOS and <|im_end|> it ends an answer.
    The Dream recipe (alg=entropy, schedule=dream, one block) runs through the lm-eval model, and the answer is
    the decode cut at the first of those tokens."""
    from transformers import AutoTokenizer

    from lmeval_dllm.generate import GenerationConfig, generate
    from lmeval_dllm.samplers import Proposal, build_sampler

    d = write_checkpoint(str(tmp_path / "diffucoder"), "dream", tokenizer=DIFFUCODER_TOKENIZER)
    tok = AutoTokenizer.from_pretrained(d)
    assert (tok.pad_token, tok.pad_token_id, tok.mask_token_id, tok.bos_token) == ("<|dlm_pad|>", 261, 260,
                                                                                 "<|beginoftext|>")
    lm = DLLM(pretrained=d, alg="entropy", schedule="dream", steps=8, gen_length=16, block_length=16)
    assert lm.stop_token_ids.tolist() == [256, 258, 261]  # <|endoftext|>, <|im_end|>, <|dlm_pad|>
    context = "def add(a, b):"
    (answer,) = lm.generate_until([Instance("generate_until", {}, (context, {"until": []}), 0)],
                                  disable_tqdm=True)
    ids = torch.tensor([tok(context)["input_ids"]])
    sampler = build_sampler("vanilla", Proposal.from_params(alg="entropy").bind(256, 258), steps=8,
                            schedule="dream")
    out = generate(lm.model, ids, None, sampler, GenerationConfig(16, 16), stop_token_ids=torch.tensor([10**6]))
    tokens = out.tokens[0].tolist()
    cut = next((i for i, t in enumerate(tokens) if t in (256, 258, 261)), len(tokens))
    assert answer == tok.decode(tokens[:cut], skip_special_tokens=True)
