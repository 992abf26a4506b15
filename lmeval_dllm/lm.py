"""lm-eval glue: the ``dllm`` model.

    lm_eval --model dllm --model_args pretrained=GSAI-ML/LLaDA-8B-Instruct,strategy=vanilla,gen_length=256,\\
        block_length=32,threshold=0.9 --tasks gsm8k --apply_chat_template

Only lm-eval plumbing lives here: argument validation, tokenisation and batching, stop strings, statistics.
Decoding is ``lmeval_dllm.generate.generate``; strategies are ``lmeval_dllm.samplers``; caches are
``lmeval_dllm.caches``; models are ``lmeval_dllm.models``.

Decoding parameters (``gen_length``, ``block_length``, strategy, proposal and cache parameters) may be given in
``--model_args`` or carried by a task's ``generation_kwargs`` (and ``--gen_kwargs``, which lm-eval merges into
them). Precedence: what the user puts in ``--model_args`` > the task's generation kwargs (including
``--gen_kwargs``) > our defaults. ``gen_length`` defaults to the task's ``max_gen_toks``; a strategy that chooses
each answer's length itself (DAEDAL) uses neither, and a ``gen_length`` in ``--model_args`` is an error for it.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Optional

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs
from tqdm import tqdm

from lmeval_dllm.caches import build_cache, cache_class, cache_params
from lmeval_dllm.generate import GenerationConfig, generate
from lmeval_dllm.params import coerce, did_you_mean, keyword_params
from lmeval_dllm.samplers import Proposal, build_sampler, sampler_class, sampler_params
from lmeval_dllm.stats import RequestStats, StatsLog

eval_logger = logging.getLogger(__name__)

DEFAULT_BLOCK_LENGTH = 32

# Short names for checkpoints shipped inside the package (no network needed).
BUNDLED_MODELS = {
    "tiny-llada": os.path.join(os.path.dirname(__file__), "assets", "tiny-llada"),
}

# Decoding parameters owned by the loop (the rest belong to the proposal, the strategy or the cache).
LOOP_PARAMS: dict[str, tuple[Any, Any]] = {
    "gen_length": (Optional[int], None),
    "block_length": (Optional[int], DEFAULT_BLOCK_LENGTH),
}
PROPOSAL_PARAMS = keyword_params(Proposal.from_params)
# Standard lm-eval generation kwargs we understand besides the decoding parameters.
LM_EVAL_GEN_KWARGS = ("until", "max_gen_toks", "do_sample")

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}


def resolve_pretrained(pretrained: str) -> str:
    return BUNDLED_MODELS.get(pretrained, pretrained)


@register_model("dllm")
class DLLM(TemplateLM):
    """A diffusion LLM (LLaDA or Dream family) decoded by a pluggable strategy and cache.

    Model arguments (everything else in ``--model_args`` is a decoding parameter, see docs/usage.md):
        pretrained: hub id or local checkpoint directory, or a bundled short name (``tiny-llada``).
        strategy: decoding strategy (``vanilla`` ...). cache: approximate cache name, or none.
        dtype: ``auto`` (bfloat16 on GPU, float32 on CPU), ``bfloat16``, ``float16``, ``float32``.
        device: ``cuda``, ``cuda:N``, ``cpu``; default: CUDA when available.
        batch_size: prompts decoded together (left-padded).
        trust_remote_code: let the *tokenizer* run remote code (Dream's tokenizer needs it). Our model
            modules never do.
        max_length: longest prompt + generation accepted (default: the model's maximum position).
        add_bos_token: prepend BOS when tokenising (default: the tokenizer's own behaviour; never twice).
        seed: seed of the sampling RNG (temperature > 0, random remasking).
        stats_path: write per-request statistics as JSON lines to this file.
    """

    def __init__(
        self,
        pretrained: str = "tiny-llada",
        strategy: str = "vanilla",
        cache: Optional[str] = None,
        dtype: str = "auto",
        device: Optional[str] = None,
        batch_size: int | str = 1,
        max_batch_size: Optional[int] = None,
        trust_remote_code: bool = False,
        revision: Optional[str] = None,
        max_length: Optional[int] = None,
        add_bos_token: Optional[bool] = None,
        seed: int = 1234,
        stats_path: Optional[str] = None,
        **decoding: Any,
    ):
        super().__init__()
        # 1. Model-level arguments.
        self.batch_size_per_gpu = coerce("batch_size", batch_size, int)
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if str(dtype).lower() not in ("auto", *_DTYPES):
            raise ValueError(f"dtype={dtype!r}: expected one of auto, {', '.join(_DTYPES)}")
        self.trust_remote_code = coerce("trust_remote_code", trust_remote_code, bool)
        self.add_bos_token = coerce("add_bos_token", add_bos_token, Optional[bool])
        self.seed = coerce("seed", seed, int)
        self.stats_path = stats_path
        self.max_length_arg = coerce("max_length", max_length, Optional[int])

        # 2. Strategy, cache and decoding parameters: all checked before anything is loaded.
        self.strategy = strategy
        sampler_class(strategy)
        self.cache_name = None if cache in (None, "none") else cache
        cache_class(self.cache_name)
        cache_kwargs = {k: decoding.pop(k) for k in list(decoding) if k in cache_params(self.cache_name)}
        self.user_decoding = self._check_decoding(decoding, source="--model_args")
        chooser = sampler_class(strategy)
        if chooser.sizes_canvas and "gen_length" in self.user_decoding:
            raise ValueError(
                f"strategy {strategy!r} chooses each answer's length itself (initial_gen_length, max_gen_length): "
                f"gen_length does not apply; remove gen_length={self.user_decoding['gen_length']}"
            )
        if self.cache_name and not chooser.supports_cache:
            raise ValueError(f"strategy {strategy!r} cannot run with a cache (cache={self.cache_name!r}): use cache=none")
        self._build_decoding(self.user_decoding, gen_length=self.user_decoding.get("gen_length"))
        self.cache = build_cache(self.cache_name, **cache_kwargs)

        # 3. Checkpoint: config first (cheap), then tokenizer and weights.
        from lmeval_dllm.models import load_model, parse_args
        from lmeval_dllm.models.common import read_config, resolve_checkpoint_dir

        self.pretrained = resolve_pretrained(pretrained)
        directory = resolve_checkpoint_dir(self.pretrained, revision)
        self.model_args = parse_args(read_config(directory), f"{directory}/config.json")
        self._device = self._pick_device(device)
        torch_dtype = (torch.bfloat16 if self._device.type == "cuda" else torch.float32) \
            if str(dtype).lower() == "auto" else _DTYPES[str(dtype).lower()]
        self.tokenizer = self._load_tokenizer(self.pretrained, revision)
        self.model = load_model(directory, dtype=torch_dtype, device=self._device)
        self.max_length = self.max_length_arg or self.model_args.max_position
        self.stop_token_ids = self._stop_token_ids()
        self.generator = torch.Generator(device=self._device).manual_seed(self.seed)
        self.stats = StatsLog()
        self._rank, self._world_size = 0, 1

    # ------------------------------------------------------------------------------------------------------------
    # Arguments

    def accepted_decoding_params(self) -> dict[str, tuple[Any, Any]]:
        return {**LOOP_PARAMS, **PROPOSAL_PARAMS, **sampler_params(self.strategy)}

    def _check_decoding(self, kwargs: dict[str, Any], source: str) -> dict[str, Any]:
        """Names known for this strategy, values of the declared types; anything else is an error."""
        accepted = self.accepted_decoding_params()
        out = {}
        for name, value in kwargs.items():
            if name not in accepted:
                cache_hint = ""
                if name in cache_params(self.cache_name) or any(name in cache_params(c) for c in _cache_names()):
                    cache_hint = " (cache parameters go in --model_args, with the cache they belong to)"
                raise ValueError(
                    f"unknown parameter {name!r} in {source} for strategy {self.strategy!r}"
                    f"{did_you_mean(name, accepted)}{cache_hint} accepted decoding parameters: "
                    f"{', '.join(sorted(accepted))}"
                )
            out[name] = coerce(name, value, accepted[name][0])
        return out

    def _build_decoding(self, params: dict[str, Any], gen_length: Optional[int]):
        """Validated (GenerationConfig or None, sampler) for the given decoding parameters."""
        proposal_kw = {k: v for k, v in params.items() if k in PROPOSAL_PARAMS}
        sampler_kw = {k: v for k, v in params.items() if k in sampler_params(self.strategy)}
        proposal = Proposal.from_params(**proposal_kw)
        sampler = build_sampler(self.strategy, proposal, **sampler_kw)
        config = None
        if gen_length is not None or sampler.sizes_canvas:
            block_length = params.get("block_length") or DEFAULT_BLOCK_LENGTH
            config = GenerationConfig(gen_length=None if sampler.sizes_canvas else gen_length,
                                      block_length=block_length)
            sampler.validate_lengths(config.gen_length, config.block_length)
        return config, sampler

    def _decoding_for(self, gen_kwargs: dict) -> tuple[GenerationConfig, Any, list[str]]:
        """Resolve one request group's settings: user's --model_args > task gen kwargs > defaults."""
        kwargs = normalize_gen_kwargs(gen_kwargs, default_max_gen_toks=256)
        until = kwargs.pop("until", None)
        max_gen_toks = kwargs.pop("max_gen_toks")
        kwargs.pop("do_sample", None)
        task = self._check_decoding(kwargs, source="the task's generation_kwargs / --gen_kwargs")
        params = {**task, **self.user_decoding}
        if sampler_class(self.strategy).sizes_canvas:
            # The strategy picks each answer's length (DAEDAL): the task's fixed length does not apply.
            eval_logger.info("strategy %r chooses the answer length: the task's gen_length=%s / max_gen_toks=%s "
                             "are not used", self.strategy, params.get("gen_length"), max_gen_toks)
            gen_length = None
        else:
            gen_length = params.get("gen_length") or max_gen_toks
            if "block_length" not in params and gen_length % DEFAULT_BLOCK_LENGTH:
                params["block_length"] = gen_length  # no block size given and 32 does not divide: one block
        config, sampler = self._build_decoding(params, gen_length)
        sampler.proposal = sampler.proposal.bind(self.tokenizer.eos_token_id, self._eot_id())
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        return config, sampler, handle_stop_sequences(until, eos=eos)

    def _pick_device(self, device: Optional[str]) -> torch.device:
        if device is None or device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            eval_logger.warning("device=%s requested but CUDA is not available: using the CPU", device)
            return torch.device("cpu")
        return dev

    def _load_tokenizer(self, pretrained: str, revision: Optional[str]):
        import transformers

        try:
            tok = transformers.AutoTokenizer.from_pretrained(
                pretrained, revision=revision, trust_remote_code=self.trust_remote_code
            )
        except ValueError as e:
            if "trust_remote_code" in str(e) and not self.trust_remote_code:
                raise ValueError(
                    f"the tokenizer of {pretrained!r} needs remote code (e.g. Dream's DreamTokenizer); add "
                    "trust_remote_code=True to --model_args (it applies to the tokenizer only)"
                ) from e
            raise
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        return tok

    def _eot_id(self) -> Optional[int]:
        """End-of-turn token of chat models (LLaDA ``<|eot_id|>``, Dream ``<|im_end|>``), if the vocab has one."""
        for name in ("<|eot_id|>", "<|im_end|>"):
            tid = self.tokenizer.convert_tokens_to_ids(name)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id and tid >= 0:
                return tid
        return None

    def _stop_token_ids(self) -> torch.Tensor:
        ids = {self.tokenizer.eos_token_id, self._eot_id(), self.model_args.eos_token_id}
        ids.discard(None)
        if self.model_args.mask_token_id in ids:
            raise ValueError("the mask token is also a stop token in this checkpoint's config; cannot decode")
        return torch.tensor(sorted(ids), dtype=torch.long, device=self._device)

    # ------------------------------------------------------------------------------------------------------------
    # lm-eval interface

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def device(self):
        return self._device

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            if bos and string.startswith(bos):
                add_special_tokens = False  # the chat template already put BOS there: never twice
            elif self.add_bos_token is not None:
                add_special_tokens = self.add_bos_token
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **kw)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def get_model_info(self) -> dict:
        """lm-eval adds this to results['config']: our aggregated decoding statistics go there."""
        info = {"dllm_strategy": self.strategy, "dllm_cache": self.cache_name or "none",
                "dllm_stats": self.stats.summary()}
        if self.stats_path:
            info["dllm_stats_path"] = self.stats_path
        return info

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        if not requests:
            return []
        # Resolve and validate every group's settings before any model work.
        groups = {}
        for req in requests:
            key = repr(sorted(req.args[1].items(), key=lambda kv: kv[0]))
            if key not in groups:
                groups[key] = self._decoding_for(req.args[1])

        def sort_key(req):  # longest prompts first: the first batch shows the worst-case memory
            toks = self.tok_encode(req[0])
            return -len(toks), req[0]

        collator = Collator([r.args for r in requests], sort_fn=sort_key, group_by="gen_kwargs",
                            group_fn=lambda a: a[1])
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="dllm generate_until")
        results = []
        for chunk in collator.get_batched(n=self.batch_size_per_gpu):
            contexts, all_kwargs = zip(*chunk)
            config, sampler, until = groups[repr(sorted(all_kwargs[0].items(), key=lambda kv: kv[0]))]
            texts = self._generate_batch(list(contexts), config, sampler, until)
            for context, gen_kwargs, text in zip(contexts, all_kwargs, texts):
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            pbar.update(len(texts))
            summary = self.stats.summary()
            pbar.set_postfix(tok_s=f"{summary['tokens_per_s']:.1f}", nfe=f"{summary['mean_nfe']:.1f}")
        pbar.close()
        self._log_stats()
        return collator.get_original(results)

    # ------------------------------------------------------------------------------------------------------------
    # Decoding one batch

    def _generate_batch(self, contexts: list[str], config: GenerationConfig, sampler, until: list[str]) -> list[str]:
        encoded = [self.tok_encode(c) for c in contexts]
        longest, what = (config.gen_length, "gen_length") if config.gen_length is not None else \
            (sampler.max_gen_length, "max_gen_length")
        for c, e in zip(contexts, encoded):
            if len(e) + longest > self.max_length:
                raise ValueError(
                    f"prompt of {len(e)} tokens + {what}={longest} exceeds max_length="
                    f"{self.max_length} (prompt starts {c[:60]!r}); raise max_length or shorten the prompt"
                )
            if not e and self.model.logit_shift:
                raise ValueError("empty prompt: Dream predicts each position from the one before it, so it needs "
                                 "at least one prompt token (e.g. BOS: add_bos_token=True)")
        P = max(len(e) for e in encoded)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (P - len(e)) + e for e in encoded], dtype=torch.long)
        mask = torch.tensor([[False] * (P - len(e)) + [True] * len(e) for e in encoded])

        def stop_strings_seen(gen: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
            return self._stop_strings_seen(gen, finished, until)

        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        start = time.perf_counter()
        out = generate(self.model, ids, mask, sampler, config, stop_token_ids=self.stop_token_ids,
                       cache=self.cache, generator=self.generator, block_done=stop_strings_seen)
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
            self.stats.peak_memory_gb = torch.cuda.max_memory_allocated(self._device) / 2**30
        elapsed = time.perf_counter() - start

        tokens, lengths = out.tokens.tolist(), out.answer_length.tolist()
        nfe, committed, gen_lengths = out.nfe.tolist(), out.committed.tolist(), out.gen_lengths.tolist()
        texts, stats = [], []
        for i, e in enumerate(encoded):
            texts.append(self._postprocess(tokens[i][: lengths[i]], until))
            stats.append(RequestStats(prompt_tokens=len(e), gen_length=gen_lengths[i], nfe=nfe[i],
                                      answer_tokens=lengths[i], committed_tokens=committed[i],
                                      wall_time_s=elapsed, batch_size=len(encoded)))
        self.stats.add_batch(stats, elapsed, out.steps)
        return texts

    def _postprocess(self, answer_tokens: list[int], until: list[str]) -> str:
        """Decode the tokens before the first stop token, then cut at the first stop string."""
        text = self.tok_decode(answer_tokens, skip_special_tokens=True)
        for term in until:
            if term:
                text = text.split(term)[0]
        return text

    def _stop_strings_seen(self, gen: torch.Tensor, finished: torch.Tensor, until: list[str]) -> torch.Tensor:
        """At a block end: rows whose decoded answer already contains a stop string are done.

        Everything left of the current block end is final (no re-masking), so the answer's text up to the stop
        string cannot change: stopping here gives the same output as decoding to the end.
        """
        terms = [t for t in until if t]
        done = torch.zeros_like(finished)
        if not terms:
            return done
        rows, still = gen.tolist(), (~finished).tolist()
        stops = set(self.stop_token_ids.tolist()) | {self.model.mask_token_id}
        for i, row in enumerate(rows):
            if still[i]:
                end = next((j for j, t in enumerate(row) if t in stops), len(row))
                text = self.tok_decode(row[:end], skip_special_tokens=True)  # as the final answer is decoded
                done[i] = any(t in text for t in terms)
        return done

    def _log_stats(self) -> None:
        summary = self.stats.summary()
        eval_logger.info("dllm decoding statistics: %s", summary)
        if self.stats_path:
            os.makedirs(os.path.dirname(os.path.abspath(self.stats_path)), exist_ok=True)
            self.stats.write_jsonl(self.stats_path)

    # ------------------------------------------------------------------------------------------------------------
    # Likelihood requests

    def _loglikelihood_tokens(self, requests, **kwargs):
        raise NotImplementedError("loglikelihood requests are not supported by the dllm model yet")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("loglikelihood_rolling requests are not supported by the dllm model yet")


def _cache_names():
    from lmeval_dllm.caches import CACHES

    return list(CACHES)
