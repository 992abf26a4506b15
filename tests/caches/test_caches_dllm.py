"""dLLM-Cache against an independent, dense restatement of the released hooks (maomaocun/dLLM-cache
``cache_hook_LLaDA.py``): every layer computes every row, then keeps fresh or cached values row by row.

The reference follows the release: per layer, refresh the prompt when ``n % kp == 0``, the response when
``n % kr == 0`` (layer 0 always both); otherwise recompute the ``int(rou * G)`` response rows whose fresh values
are least similar (cosine) to the cached ones, take every fresh response value, and keep cached keys, attention
and FFN outputs of the rows not recomputed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from caches_support import PROMPTS, decode_logged, left_pad, tiny

from lmeval_dllm.caches.base import Cache, target_rows
from lmeval_dllm.state import StepLogits


class DenseDLLM(Cache):
    """Reference: batch size 1, no padding, dense computation."""

    def __init__(self, kp, kr, rou):
        super().__init__()
        self.kp, self.kr, self.rou, self.n = kp, kr, rou, 0
        self.store = None

    def forward(self, model, state, targets, extra=None):
        x, pos, P = state.x, state.position_ids, state.prompt_len
        T = x.shape[1]
        G = T - P
        cos, sin = model.rope(pos)
        h = model.tok_embeddings(x)
        if self.store is None:
            self.store = [dict() for _ in model.layers]
        for i, layer in enumerate(model.layers):
            c = self.store[i]
            q, k, v = layer.qkv(h, cos, sin)  # every row, fresh
            rp = self.n % self.kp == 0 or i == 0
            rg = self.n % self.kr == 0 or i == 0
            rows = torch.zeros(T, dtype=torch.bool)
            if not c:  # first pass: everything
                rows[:] = True
            else:
                rows[:P] = rp
                if rg:
                    rows[P:] = True
                elif self.rou > 0:
                    sim = F.cosine_similarity(v[0, :, P:].transpose(0, 1).flatten(1),
                                              c["v"][0, :, P:].transpose(0, 1).flatten(1), dim=-1)
                    pick = torch.topk(sim, int(G * self.rou), largest=False).indices
                    rows[P + pick] = True
                    c["v"][:, :, P:] = v[:, :, P:]  # every fresh response value
            sel = rows[None, None, :, None]
            k_used = k if not c else torch.where(sel, k, c["k"])
            v_used = v if not c else torch.where(sel, v, c["v"])
            attn = layer.attend(q, k_used, v_used, None)
            attn = attn if not c else torch.where(rows[None, :, None], attn, c["attn"])
            h = h + attn
            ffn = layer.mlp(h)
            ffn = ffn if not c else torch.where(rows[None, :, None], ffn, c["ffn"])
            h = h + ffn
            c.update(k=k_used, v=v_used, attn=attn, ffn=ffn)
        self.n += 1
        return StepLogits(model.head(h[:, target_rows(model, targets, 0, T)]))


@pytest.mark.parametrize("kp, kr, rou", [(3, 2, 0.25), (4, 3, 0.5), (2, 5, 0.0)])
def test_matches_the_dense_reference(tiny_dir, kp, kr, rou):
    model, tok = tiny(tiny_dir)
    enc, _, _ = left_pad(tok, PROMPTS[:1])
    ids = torch.tensor(enc)
    ref, ref_logits, _ = decode_logged(model, ids, None, DenseDLLM(kp, kr, rou), gen_length=16, block_length=8)
    out, logits, _ = decode_logged(model, ids, None, ("dllm", {"kp": kp, "kr": kr, "rou": rou}), gen_length=16,
                                   block_length=8)
    assert out.tokens.tolist() == ref.tokens.tolist() and len(logits) == len(ref_logits) == 16
    assert max((a - b).abs().max().item() for a, b in zip(logits, ref_logits)) < 1e-4


def test_parameters_are_checked():
    from lmeval_dllm.caches import build_cache

    with pytest.raises(ValueError, match=r"^kp must be an integer >= 1, got 0$"):
        build_cache("dllm", kp=0)
    with pytest.raises(ValueError, match=r"^kr must be an integer >= 1, got -1$"):
        build_cache("dllm", kr=-1)
    with pytest.raises(ValueError, match=r"^rou must be in \[0, 1\], got 1.5$"):
        build_cache("dllm", rou=1.5)
    cache = build_cache("dllm")
    assert (cache.kp, cache.kr, cache.rou) == (50, 7, 0.25)
