"""Left-padded prompt batches for tests that decode several prompts at once, the tiny checkpoints they decode with,
and the seam check that a batch decodes each row as its prompt alone (a plain module: tests import it)."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def tiny(directory: str):
    """(model, tokenizer) of a tiny checkpoint, loaded once per session."""
    from transformers import AutoTokenizer

    from lmeval_dllm.models import load_model

    return load_model(directory), AutoTokenizer.from_pretrained(directory)


def pad_left(pad_token_id: int, encoded: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists -> ids (B, P) left-padded with ``pad_token_id``, mask (B, P) bool (False on padding)."""
    P = max(map(len, encoded))
    ids = torch.tensor([[pad_token_id] * (P - len(e)) + e for e in encoded])
    mask = torch.tensor([[False] * (P - len(e)) + [True] * len(e) for e in encoded])
    return ids, mask


def left_pad(tok, prompts: list[str]):
    """Each prompt's token ids (no special tokens), and the left-padded batch (ids (B, P), mask (B, P))."""
    enc = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    return (enc, *pad_left(tok.pad_token_id, enc))


def assert_each_row_as_alone(batch, encoded: list[list[int]], run_alone, label=None) -> None:
    """Each row i of ``batch`` (the output of decoding the left-padded ``encoded``) has exactly the tokens and the
    NFE of ``run_alone(ids)``, its prompt decoded alone (ids (1, P_i), no padding); ``label`` names the case in a
    failure."""
    for i, e in enumerate(encoded):
        alone = run_alone(torch.tensor([e]))
        assert alone.tokens[0].tolist() == batch.tokens[i].tolist(), (label, i)
        assert alone.nfe[0] == batch.nfe[i], (label, i)


def assert_block_cache_exact_and_rows_alone(model, strategy: str, kw: dict, lengths: tuple[int, ...], config,
                                            stops: list[int], seed: int = 6) -> None:
    """A block-causal model decoding random prompts of ``lengths`` (left-padded with 256) with ``strategy`` and
    ``config``: cache=block gives no cache's tokens and NFE, and each row the answer of its prompt alone."""
    from lmeval_dllm.caches import build_cache
    from lmeval_dllm.generate import generate
    from lmeval_dllm.samplers import Proposal, build_sampler

    g = torch.Generator().manual_seed(seed)
    batch = [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]

    def run(prompts, cache):
        ids, mask = pad_left(256, prompts)
        return generate(model, ids, mask, build_sampler(strategy, Proposal.from_params(), **kw), config,
                        stop_token_ids=torch.tensor(stops), cache=build_cache(cache, cuda_graphs=False))

    out, exact = run(batch, "block"), run(batch, "none")
    assert torch.equal(out.tokens, exact.tokens) and torch.equal(out.nfe, exact.nfe)
    for i, p in enumerate(batch):
        alone = run([p], "block")
        n = int(alone.answer_length[0])
        assert int(out.answer_length[i]) == n and out.tokens[i, :n].tolist() == alone.tokens[0, :n].tolist(), i
