"""A scripted stand-in for a DiffusionLM: its logits make a known answer confident, position by position.

Row b, generation position j gets logit ``scores[b, j]`` on token ``targets[b, j]`` and 0 on every other token,
so its confidence is ``e^s / (e^s + V - 1)``: tests choose the order in which positions are decoded.
Optionally the script reacts to the canvas (``on_canvas``), e.g. to make a token confident only after
another one is decoded.
"""

from __future__ import annotations

import torch

VOCAB = 32
MASK = 31
EOS = 30
EOT = 29


def conf_of(score: float, vocab: int = VOCAB) -> float:
    """Confidence (softmax probability) of the scripted token for a given score."""
    import math

    return math.exp(score) / (math.exp(score) + vocab - 1)


def logit_rows(confidences, tokens, vocab: int = VOCAB) -> torch.Tensor:
    """(L, V) logits whose softmax gives ``tokens[i]`` probability ``confidences[i]`` (the rest spread evenly):
    hand-built logits for a sampler's step."""
    import math

    rows = []
    for c, t in zip(confidences, tokens):
        rest = math.log((1 - c) / (vocab - 1))
        rows.append([math.log(c) if v == t else rest for v in range(vocab)])
    return torch.tensor(rows)


class ScriptedModel:
    def __init__(self, targets, scores, vocab: int = VOCAB, mask_token_id: int = MASK, logit_shift: int = 0,
                 on_canvas=None):
        self.targets = torch.as_tensor(targets, dtype=torch.long)  # (B, G)
        self.scores = torch.as_tensor(scores, dtype=torch.float32)  # (B, G)
        self.vocab, self.mask_token_id, self.logit_shift = vocab, mask_token_id, logit_shift
        self.block_size = None  # bidirectional (DiffusionLM.block_size)
        self.on_canvas = on_canvas
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.calls = 0

    def predict(self, input_ids, position_ids, targets: slice, *, attention_mask=None, cache=None, query_start=0):
        self.calls += 1
        B, T = input_ids.shape
        P = T - self.targets.shape[1]
        cols = torch.arange(targets.start - P, targets.stop - P)
        scores = self.scores[:, cols]
        if self.on_canvas is not None:
            scores = self.on_canvas(input_ids[:, P:], scores.clone(), cols)
        logits = torch.zeros(B, len(cols), self.vocab)
        logits.scatter_(-1, self.targets[:, cols, None], scores[..., None])
        return logits
