"""Background token-frequency tables for PC-Sampler's calibrated confidence: load one, or build one.

Format (PC-Sampler's published ``data/baseline/reference_corpus_*.json``, NEUIR/PC-Sampler)::

    {"num_token": N, "p_baseline_dict": {"<token id>": <count>, ...}}

The frequency of a listed token is count / N; every other token of the vocabulary gets 1 / N (as in PC-Sampler's
``load_baseline``). The key ``token_frequency_dict`` (what PC-Sampler's own ``utils/calculate_p_baseline.py``
writes) is accepted as a synonym of ``p_baseline_dict``.

Build one for any model from any text with that model's tokenizer::

    python -m lmeval_dllm.samplers.frequency_table --tokenizer GSAI-ML/LLaDA-8B-Instruct \\
        --corpus corpus.jsonl --key text --out llada_table.json

(``.jsonl`` files: the ``--key`` fields of each record; other files: plain text, tokenised line by line with
the line breaks kept). Tokens are counted without special tokens, as PC-Sampler does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import urllib.request
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch

# PC-Sampler's published tables (NEUIR/PC-Sampler, data/baseline/), by the short names frequency_table accepts.
PUBLISHED_TABLES = {
    "llada": "https://raw.githubusercontent.com/NEUIR/PC-Sampler/master/data/baseline/reference_corpus_llada.json",
    "dream": "https://raw.githubusercontent.com/NEUIR/PC-Sampler/master/data/baseline/reference_corpus_dream.json",
}
COUNT_KEYS = ("p_baseline_dict", "token_frequency_dict")
HOW_TO_GET_ONE = (
    "pass frequency_table=llada or frequency_table=dream (PC-Sampler's published tables for those tokenizers, "
    "downloaded once from github.com/NEUIR/PC-Sampler), a local path or an http(s) URL of a JSON file "
    '{"num_token": N, "p_baseline_dict": {token_id: count}}, or build one for your model with '
    "`python -m lmeval_dllm.samplers.frequency_table --tokenizer <model> --corpus <text or jsonl files> "
    "--out table.json`"
)


def cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "lmeval_dllm", "frequency_tables")


def _download(url: str) -> str:
    """Fetch ``url`` once into the cache directory; return the local path."""
    name = hashlib.sha1(url.encode()).hexdigest()[:16] + "-" + os.path.basename(url.split("?")[0])
    path = os.path.join(cache_dir(), name)
    if not os.path.isfile(path):
        os.makedirs(cache_dir(), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.part"
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
                f.write(response.read())
        except OSError as e:
            raise ValueError(f"frequency_table: could not download {url} ({e}); download it yourself and pass "
                             f"its local path") from e
        os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class FrequencyTable:
    """Token counts of a reference corpus (CPU tensors)."""

    num_tokens: int  # N: corpus size in tokens
    token_ids: torch.Tensor  # (K,) long: listed token ids
    counts: torch.Tensor  # (K,) long: their counts
    source: str = ""

    @classmethod
    def from_json(cls, data: dict, source: str = "") -> "FrequencyTable":
        where = f"frequency table {source!r}" if source else "frequency table"
        key = next((k for k in COUNT_KEYS if k in data), None) if isinstance(data, dict) else None
        if key is None or "num_token" not in data or not isinstance(data[key], dict):
            raise ValueError(f'{where}: expected a JSON object {{"num_token": N, "p_baseline_dict": {{token_id: '
                             f"count}}}}, got keys {sorted(data) if isinstance(data, dict) else type(data).__name__}")
        num_tokens, raw = data["num_token"], data[key]
        if not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"{where}: num_token must be a positive integer, got {num_tokens!r}")
        try:
            ids = torch.tensor([int(k) for k in raw], dtype=torch.long)
            counts = torch.tensor([int(v) for v in raw.values()], dtype=torch.long)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {key} must map integer token ids to integer counts ({e})") from None
        if ids.numel() and (int(ids.min()) < 0 or int(counts.min()) < 0):
            raise ValueError(f"{where}: token ids and counts must be >= 0")
        return cls(num_tokens=num_tokens, token_ids=ids, counts=counts, source=source)

    @classmethod
    def load(cls, source: str) -> "FrequencyTable":
        """``source``: ``llada`` / ``dream`` (published tables), an http(s) URL, or a local JSON path."""
        location = PUBLISHED_TABLES.get(source, source)
        if location.startswith(("http://", "https://")):
            path = _download(location)
        else:
            path = os.path.expanduser(location)
            if not os.path.isfile(path):
                raise ValueError(f"frequency_table={source!r}: no such file. To get a table, {HOW_TO_GET_ONE}")
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"frequency_table={source!r}: not valid JSON ({e})") from None
        return cls.from_json(data, source)

    def frequencies(self, vocab_size: int) -> torch.Tensor:
        """(V,) float32: count / N for listed tokens, 1 / N for the rest of the vocabulary."""
        if self.token_ids.numel() and int(self.token_ids.max()) >= vocab_size:
            raise ValueError(
                f"frequency table {self.source!r} lists token id {int(self.token_ids.max())} but the model's "
                f"vocabulary has {vocab_size} entries: the table was built with another tokenizer. "
                f"To get a matching one, {HOW_TO_GET_ONE}"
            )
        freq = torch.full((vocab_size,), 1.0 / self.num_tokens, dtype=torch.float64)
        freq[self.token_ids] = self.counts.double() / self.num_tokens
        return freq.float()

    def to_json(self) -> dict:
        return {"num_token": self.num_tokens,
                "p_baseline_dict": {str(i): c for i, c in zip(self.token_ids.tolist(), self.counts.tolist())}}


def build_frequency_table(tokenizer, texts: Iterable[str], batch_size: int = 512) -> FrequencyTable:
    """Count the tokens of ``texts`` with ``tokenizer`` (a Hugging Face tokenizer; no special tokens)."""
    counts: Counter[int] = Counter()
    batch: list[str] = []

    def flush():
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            counts.update(ids)
        batch.clear()

    for text in texts:
        if text:
            batch.append(text)
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    total = sum(counts.values())
    if total == 0:
        raise ValueError("build_frequency_table: the corpus has no tokens")
    ids = sorted(counts)
    return FrequencyTable(num_tokens=total, token_ids=torch.tensor(ids, dtype=torch.long),
                          counts=torch.tensor([counts[i] for i in ids], dtype=torch.long), source="built")


def read_corpus(paths: Sequence[str], keys: Sequence[str]) -> Iterable[str]:
    """Texts of ``.jsonl`` records (the ``keys`` fields) or plain-text lines (line breaks kept)."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".jsonl"):
                for line in f:
                    if line.strip():
                        record = json.loads(line)
                        yield from (record[k] for k in keys if isinstance(record.get(k), str))
            else:
                yield from f


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lmeval_dllm.samplers.frequency_table",
        description="Build a PC-Sampler token-frequency table for a model's tokenizer from a text corpus.")
    parser.add_argument("--tokenizer", required=True, help="hub id or local directory of the model / tokenizer")
    parser.add_argument("--corpus", required=True, nargs="+", help=".jsonl or plain-text files")
    parser.add_argument("--key", default="text", help="comma-separated fields of .jsonl records (default: text)")
    parser.add_argument("--out", required=True, help="output JSON path")
    parser.add_argument("--trust_remote_code", action="store_true", help="needed by Dream's tokenizer")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, trust_remote_code=args.trust_remote_code)
    table = build_frequency_table(tokenizer, read_corpus(args.corpus, [k.strip() for k in args.key.split(",")]))
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(table.to_json(), f)
    print(f"wrote {args.out}: {table.num_tokens} tokens, {table.token_ids.numel()} distinct ids")


if __name__ == "__main__":
    main()
