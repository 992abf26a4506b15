"""Hand-built decode states and logits for the sampler tests (a plain module: test files import it)."""

from __future__ import annotations

import math
import os

import torch

from lmeval_dllm.state import DecodeState

MASK = 9
PROMPT = (1, 2)
# The papers' published data (../shared/data), as tests/conftest.py's SHARED_DATA.
SHARED_DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


def state_with(rows, prompt=PROMPT, block=None, mask_token_id=MASK) -> DecodeState:
    """A decode state whose generation region is ``rows`` (B lists of ids; MASK = undecided), current block = all
    of it unless ``block`` (start, stop) in generation coordinates is given; every row active."""
    x = torch.tensor([list(prompt) + list(r) for r in rows])
    P = len(prompt)
    s = DecodeState(x=x, position_ids=torch.arange(x.shape[1]).expand(x.shape[0], -1), attention_mask=None,
                    prompt_len=P, mask_token_id=mask_token_id, stop_token_ids=torch.tensor([8]))
    start, stop = block if block is not None else (0, len(rows[0]))
    s.block = slice(P + start, P + stop)
    s.active = torch.ones(x.shape[0], dtype=torch.bool)
    return s


def peaked(confidences, tokens, vocab=10) -> torch.Tensor:
    """(B, L, V) logits whose argmax is tokens[b][i] with softmax probability confidences[b][i] (rest uniform).

    Accepts one row (lists of floats / ints) or B rows (lists of lists)."""
    if not isinstance(confidences[0], (list, tuple)):
        confidences, tokens = [confidences], [tokens]
    out = []
    for conf_row, tok_row in zip(confidences, tokens):
        rows = []
        for c, t in zip(conf_row, tok_row):
            rest = math.log((1 - c) / (vocab - 1))
            rows.append([math.log(c) if v == t else rest for v in range(vocab)])
        out.append(rows)
    return torch.tensor(out)


def entropy_of_peaked(c: float, vocab: int = 10) -> float:
    """Shannon entropy (nats) of the distribution ``peaked`` builds: c on one token, the rest uniform."""
    rest = (1 - c) / (vocab - 1)
    return -c * math.log(c) - (vocab - 1) * rest * math.log(rest)
