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

Likelihood requests (multiple-choice tasks, perplexity) use the Monte-Carlo estimate of the LLaDA paper's bound
(``lmeval_dllm.likelihood``). Under ``accelerate launch`` / ``torchrun`` each process takes its share of the
requests (lm-eval shards them by our global rank) on its own device. See docs/usage.md.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import time
from datetime import timedelta
from typing import Any, Callable, Optional, TypeVar

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from lmeval_dllm.caches import build_cache, cache_class, cache_params, check_compatible
from lmeval_dllm.generate import GenerationConfig, generate
from lmeval_dllm.likelihood import MonteCarloLikelihood, estimate, greedy_matches
from lmeval_dllm.params import coerce, did_you_mean, keyword_params
from lmeval_dllm.samplers import Proposal, build_sampler, sampler_class, sampler_params
from lmeval_dllm.stats import RequestStats, StatsLog, StatsReporting

# A child of lm-eval's logger, so our INFO lines (the decoding statistics) print with lm-eval's own.
eval_logger = logging.getLogger("lm_eval.models.dllm")

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
# lm-eval's spellings of the generation budget, by priority (as lm-eval's own normalize_gen_kwargs orders them).
MAX_TOKENS_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
DEFAULT_MAX_GEN_TOKS = 256

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}


def resolve_pretrained(pretrained: str) -> str:
    return BUNDLED_MODELS.get(pretrained, pretrained)


@register_model("dllm")
class DLLM(StatsReporting, TemplateLM):
    """A diffusion LLM (LLaDA or Dream family) decoded by a pluggable strategy and cache.

    Model arguments (everything else in ``--model_args`` is a decoding parameter, see docs/usage.md):
        pretrained: hub id or local checkpoint directory, or a bundled short name (``tiny-llada``).
        strategy: decoding strategy (``vanilla`` ...). cache: approximate cache name, or none.
        dtype: ``auto`` (bfloat16 on GPU, float32 on CPU), ``bfloat16``, ``float16``, ``float32``.
        device: ``cuda``, ``cuda:N``, ``cpu``; default: CUDA when available.
        batch_size: prompts decoded together (left-padded).
        trust_remote_code: let the *tokenizer* run remote code (Dream's tokenizer needs it). Our model
            modules never do.
        max_length: longest prompt + generation (or context + continuation) accepted (default: the model's
            maximum position).
        truncation: when a prompt is too long for ``max_length``, keep its last tokens (with a warning) instead
            of failing.
        add_bos_token: prepend BOS when tokenising (default: the tokenizer's own behaviour; never twice).
        seed: seed of the sampling RNG (temperature > 0, random remasking) and of the likelihood estimates.
        stats_path: write per-request statistics as JSON lines to this file.
        mc_num: Monte-Carlo samples per likelihood request (LLaDA paper: 128; 1 suffices for one-token answers).
        mc_batch_size: samples per stratified group and per forward pass of the likelihood estimate.
        is_check_greedy: also report whether one-token-per-step greedy decoding reproduces the continuation
            (lm-eval's ``is_greedy``); costs one forward pass per continuation token. Off: always False.
        sampling_eps: Dream's lowest mask rate in its likelihood estimate.
        peft: a LoRA adapter (local directory or hub id) merged into the weights at load, as lm-eval's ``hf``
            model takes it (``lmeval_dllm/models/lora.py``; needs the ``peft`` package).
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
        truncation: bool = False,
        mc_num: int = 128,
        mc_batch_size: int = 32,
        is_check_greedy: bool = False,
        sampling_eps: float = 1e-3,
        peft: Optional[str] = None,
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
        if self.max_length_arg is not None and self.max_length_arg < 2:
            raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
        self.truncation = coerce("truncation", truncation, bool)
        self.is_check_greedy = coerce("is_check_greedy", is_check_greedy, bool)
        self.estimator = MonteCarloLikelihood(  # the scheme follows the model family, once config.json is read
            mc_num=coerce("mc_num", mc_num, int), mc_batch_size=coerce("mc_batch_size", mc_batch_size, int),
            sampling_eps=coerce("sampling_eps", sampling_eps, float),
        )

        # 2. Strategy, cache and decoding parameters: all checked before anything is loaded.
        self.strategy = strategy
        sampler_class(strategy)
        self.cache_name = None if cache in (None, "none") else cache
        check_compatible(sampler_class(strategy), cache_class(self.cache_name))
        # A name both the cache and the strategy take (d2cache's and the certainty prior's `sigma`) goes to both.
        cache_kwargs = {k: decoding[k] if k in sampler_params(strategy) else decoding.pop(k)
                        for k in list(decoding) if k in cache_params(self.cache_name)}
        self.user_decoding = self._check_decoding(decoding, source="--model_args")
        chooser = sampler_class(strategy)
        if chooser.sizes_canvas and "gen_length" in self.user_decoding:
            raise ValueError(
                f"strategy {strategy!r} chooses each answer's length itself (initial_gen_length, max_gen_length): "
                f"gen_length does not apply; remove gen_length={self.user_decoding['gen_length']}"
            )
        self._build_decoding(self.user_decoding, gen_length=self.user_decoding.get("gen_length"))
        self.cache = build_cache(self.cache_name, **cache_kwargs)

        # 3. Checkpoint: config first (cheap), then tokenizer and weights.
        from lmeval_dllm.models import family_named, load_model, parse_args, read_config, resolve_checkpoint_dir

        self.pretrained = resolve_pretrained(pretrained)
        directory = resolve_checkpoint_dir(self.pretrained, revision)
        self.model_args = parse_args(read_config(directory), f"{directory}/config.json")
        self.family = family_named(self.model_args.family)  # issue 13: scheme and end-of-turn from the Family
        self.estimator = dataclasses.replace(self.estimator, scheme=self.family.likelihood)
        self.accelerator, self._rank, self._world_size = None, 0, 1
        self._device = self._setup_processes(device) if _launched_world_size() > 1 else self._pick_device(device)
        torch_dtype = (torch.bfloat16 if self._device.type == "cuda" else torch.float32) \
            if str(dtype).lower() == "auto" else _DTYPES[str(dtype).lower()]
        self.tokenizer = self._load_tokenizer(self.pretrained, revision)
        self.model = load_model(directory, dtype=torch_dtype, device=self._device, peft=peft)  # issue 13: LoRA
        self.max_length = self.max_length_arg or self.model_args.max_position
        self.stop_token_ids = self._stop_token_ids()
        self.generator = torch.Generator(device=self._device).manual_seed(self.seed)
        self.stats = StatsLog()
        self._merged_stats: Optional[StatsLog] = None  # all processes' statistics, on the main process

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
        kwargs, until, max_gen_toks = split_gen_kwargs(gen_kwargs)
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

    def _setup_processes(self, device: Optional[str]) -> torch.device:
        """Data parallel under ``accelerate launch`` / ``torchrun``: join the process group, take the *global*
        rank (so that requests are sharded across nodes too) and this process's own device."""
        from accelerate import Accelerator, InitProcessGroupKwargs

        cpu = device == "cpu" or not torch.cuda.is_available()
        if device not in (None, "auto", "cuda", "cpu"):
            eval_logger.info("device=%s ignored: under a multi-process launch every process uses its own "
                             "device (cuda:LOCAL_RANK)", device)
        # A long timeout: processes wait for each other at the end of each request type, and decoding speed
        # differs between shards.
        self.accelerator = Accelerator(cpu=cpu, kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(weeks=52))])
        self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        dev = self.accelerator.device
        eval_logger.info("dllm: process %d of %d on %s", self._rank, self._world_size, dev)
        return torch.device("cpu") if dev.type == "cpu" else dev

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
            # An empty config: the tokenizer class comes from tokenizer_config.json, and transformers does not try
            # (and warn about failing) to build a config for a model_type it does not know.
            tok = transformers.AutoTokenizer.from_pretrained(
                pretrained, revision=revision, trust_remote_code=self.trust_remote_code,
                config=transformers.PretrainedConfig(),
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
        for name in self.family.end_of_turn:  # issue 13: the family's (LLaDA-MoE: <|role_end|>)
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
    def prefix_token_id(self) -> int:
        """What an empty context (and the first rolling window) is conditioned on: BOS, else EOS (as HFLM)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.world_size <= 1 else self.accelerator.gather(tensor)

    def barrier(self) -> None:
        if self.world_size > 1:
            self.accelerator.wait_for_everyone()

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        """Token ids of ``string``. Any Unicode (control characters included) is encoded as is; a lone UTF-16
        surrogate, which no UTF-8 tokenizer can take, becomes U+FFFD (with a warning)."""
        string = _valid_unicode(string)
        bos = self.tokenizer.bos_token
        if add_special_tokens is None:
            if bos and string.startswith(bos):
                add_special_tokens = False  # the chat template already put BOS there: never twice
            elif self.add_bos_token is not None:
                add_special_tokens = self.add_bos_token
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        ids = self.tokenizer.encode(string, **kw)
        bos_id = self.tokenizer.bos_token_id
        if self.add_bos_token and add_special_tokens and bos_id is not None and ids[:1] != [bos_id]:
            ids = [bos_id] + ids  # tokenizers without a BOS post-processor (Dream's Qwen2 tokenizer)
        return ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def get_model_info(self) -> dict:
        """lm-eval adds this to results['config']: our aggregated decoding statistics go there."""
        return {"dllm_strategy": self.strategy, "dllm_cache": self.cache_name or "none", **self.stats_info()}

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
        self._log_stats(eval_logger, "dllm")
        return collator.get_original(results)

    # ------------------------------------------------------------------------------------------------------------
    # Decoding one batch

    def _generate_batch(self, contexts: list[str], config: GenerationConfig, sampler, until: list[str]) -> list[str]:
        """Decode one batch; on CUDA out-of-memory, decode its halves separately (see :func:`split_on_oom`)."""
        # A strategy that chooses the length (DAEDAL) may use up to its max_gen_length positions.
        longest, what = (config.gen_length, "gen_length") if config.gen_length is not None else \
            (sampler.max_gen_length, "max_gen_length")
        encoded = [self._fit_prompt(c, self.tok_encode(c), longest, what) for c in contexts]

        def describe(i: int) -> str:
            return (f"one prompt of {len(encoded[i])} tokens + {what}={longest} "
                    f"({len(encoded[i]) + longest} positions)")

        return split_on_oom(lambda lo, hi: self._decode(encoded[lo:hi], config, sampler, until), 0, len(encoded),
                            join=lambda parts: parts[0] + parts[1], describe=describe, on_split=self._note_split,
                            hint="; lower gen_length or the prompt length (max_length with truncation=True), use "
                                 "a cache, or a GPU with more memory")

    def _fit_prompt(self, context: str, ids: list[int], gen_length: int, what: str = "gen_length") -> list[int]:
        """The prompt's ids if prompt + generation fit in ``max_length``; else its last tokens if
        ``truncation=True``, else an error. Dream needs at least one prompt token. ``what`` names the length."""
        room = self.max_length - gen_length
        if room < 1:
            raise ValueError(f"{what}={gen_length} leaves no room for a prompt in max_length={self.max_length}")
        if len(ids) > room:
            if not self.truncation:
                raise ValueError(
                    f"prompt of {len(ids)} tokens + {what}={gen_length} exceeds max_length={self.max_length} "
                    f"(prompt starts {context[:60]!r}); raise max_length, shorten the prompt, or pass "
                    f"truncation=True to keep its last {room} tokens"
                )
            eval_logger.warning("prompt of %d tokens cut to its last %d (max_length=%d, %s=%d)",
                                len(ids), room, self.max_length, what, gen_length)
            ids = ids[len(ids) - room:]
        if not ids and self.model.logit_shift:
            raise ValueError("empty prompt: Dream predicts each position from the one before it, so it needs "
                             "at least one prompt token (e.g. BOS: add_bos_token=True)")
        return ids

    def _decode(self, encoded: list[list[int]], config: GenerationConfig, sampler, until: list[str]) -> list[str]:
        P = max(len(e) for e in encoded)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (P - len(e)) + e for e in encoded], dtype=torch.long)
        mask = torch.tensor([[False] * (P - len(e)) + [True] * len(e) for e in encoded], dtype=torch.bool)

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

    def _note_split(self, n: int) -> None:
        self.stats.oom_splits += 1
        eval_logger.warning("CUDA out of memory on a batch of %d: retrying as %d + %d", n, n // 2, n - n // 2)

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

    # ------------------------------------------------------------------------------------------------------------
    # Likelihood requests

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """``requests``: ((context, continuation), context ids, continuation ids), from lm-eval's
        ``TemplateLM.loglikelihood`` (BOS / empty-context handling and trailing-space moves done there).
        Returns (estimate of log p(continuation | context), is_greedy) per request, in order."""
        anchor = [self.eot_token_id] if self.estimator.anchors_eos else []
        # Every length is checked before any model work.
        pairs = [self._fit_pair(ctx, cont, anchor) for _, ctx, cont in requests]
        out = []
        for (key, _, _), (ctx, cont) in zip(requests, tqdm(pairs, disable=disable_tqdm or self.rank != 0,
                                                            desc="dllm loglikelihood")):
            if not cont:  # nothing to score: log p(empty) = 0, and decoding nothing reproduces it
                out.append((0.0, True))
            else:
                greedy = self.is_check_greedy and self._greedy(ctx, cont, anchor)
                out.append((self._estimate(ctx, cont, anchor), greedy))
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, out[-1])
        self._log_stats(eval_logger, "dllm")
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents: lm-eval's rolling windows (``get_rolling_token_windows``,
        ``make_disjoint_window``; the first conditioned on BOS), each estimated as a continuation of its
        context with the same Monte-Carlo estimator, summed. No EOS anchor: a window does not end the text."""
        out = []
        for req in tqdm(requests, disable=disable_tqdm or self.rank != 0, desc="dllm loglikelihood_rolling"):
            (string,) = req.args
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(string, add_special_tokens=False), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length - 1, context_len=1,  # - 1: the context token is part of our input
            )
            total = sum(self._estimate(ctx, cont, []) for ctx, cont in map(make_disjoint_window, windows))
            out.append(float(total))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), out[-1])
        self._log_stats(eval_logger, "dllm")
        return out

    def _fit_pair(self, context: list[int], continuation: list[int], anchor: list[int]) -> tuple[list, list]:
        """Context and continuation ids that fit in ``max_length`` (context cut on the left when
        ``truncation=True``); a continuation is never cut (an empty one is scored 0 without the model)."""
        room = self.max_length - len(continuation) - len(anchor)
        if room < 1:
            raise ValueError(f"continuation of {len(continuation)} tokens does not fit in max_length="
                             f"{self.max_length} with at least one context token")
        if len(context) > room:
            if not self.truncation:
                raise ValueError(
                    f"context of {len(context)} tokens + continuation of {len(continuation)} tokens exceeds "
                    f"max_length={self.max_length}; raise max_length or pass truncation=True to keep the "
                    f"context's last {room} tokens"
                )
            eval_logger.warning("context of %d tokens cut to its last %d (max_length=%d)", len(context), room,
                                self.max_length)
            context = context[len(context) - room:]
        return list(context), list(continuation)

    def _estimate(self, context: list[int], continuation: list[int], anchor: list[int]) -> float:
        n_tokens = len(context) + len(continuation) + len(anchor)

        def run_rows(score: Callable[[int, int], torch.Tensor], n: int) -> torch.Tensor:
            def counted(lo: int, hi: int) -> torch.Tensor:
                result = score(lo, hi)
                self.stats.likelihood_forward_passes += 1
                return result

            return split_on_oom(counted, 0, n, join=torch.cat, on_split=self._note_split,
                                describe=lambda i: f"one Monte-Carlo sample of {n_tokens} tokens (context "
                                                   f"{len(context)} + continuation {len(continuation)})",
                                hint="; lower max_length (with truncation=True), or use a GPU with more memory")

        start = time.perf_counter()
        ll = estimate(self.model, context, continuation, self.estimator, seed=self.seed, anchor_ids=anchor,
                      run_rows=run_rows)
        self.stats.likelihood_requests += 1
        self.stats.likelihood_rows += self.estimator.mc_num
        self.stats.likelihood_time_s += time.perf_counter() - start
        return ll

    def _greedy(self, context: list[int], continuation: list[int], anchor: list[int]) -> bool:
        start = time.perf_counter()
        try:
            return greedy_matches(self.model, context, continuation, anchor)
        except torch.cuda.OutOfMemoryError:
            raise torch.cuda.OutOfMemoryError(
                f"out of memory in the greedy check of a continuation of {len(continuation)} tokens after "
                f"{len(context)} context tokens (one row); is_check_greedy=False skips it"
            ) from None
        finally:
            self.stats.likelihood_forward_passes += len(continuation)
            self.stats.likelihood_time_s += time.perf_counter() - start


T = TypeVar("T")


def split_on_oom(
    run: Callable[[int, int], T],
    lo: int,
    hi: int,
    *,
    join: Callable[[list[T]], T],
    describe: Callable[[int], str],
    hint: str = "",
    on_split: Callable[[int], None] = lambda n: None,
) -> T:
    """``run(lo, hi)`` over items [lo, hi); on a CUDA out-of-memory error, free the cached memory and run the two
    halves separately, recursively, down to single items.

    Every item gets exactly one result, in order (``join`` concatenates the halves' results). An item that does
    not fit even alone raises ``torch.cuda.OutOfMemoryError`` with ``describe(item)`` and ``hint``. Other errors
    pass through.
    """
    message = None
    try:
        return run(lo, hi)
    except torch.cuda.OutOfMemoryError as e:
        message = str(e).split("\n")[0] or "CUDA out of memory"
    # Outside the handler, so the exception's traceback (and the tensors its frames hold) is already released.
    _release_memory()
    if hi - lo == 1:
        raise torch.cuda.OutOfMemoryError(f"{describe(lo)} does not fit in GPU memory even alone ({message}){hint}")
    mid = (lo + hi) // 2
    on_split(hi - lo)
    kw = dict(join=join, describe=describe, hint=hint, on_split=on_split)
    return join([split_on_oom(run, lo, mid, **kw), split_on_oom(run, mid, hi, **kw)])


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _launched_world_size() -> int:
    """Processes started by ``accelerate launch`` / ``torchrun`` (their WORLD_SIZE); 1 otherwise."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _valid_unicode(text: str) -> str:
    """``text``, with each lone UTF-16 surrogate (valid in a Python str, not in UTF-8) replaced by U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        eval_logger.warning("text with lone UTF-16 surrogates: each replaced by U+FFFD (text starts %r)", text[:40])
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def split_gen_kwargs(gen_kwargs: dict) -> tuple[dict, list[str], int]:
    """A request's generation kwargs -> (decoding parameters, stop strings, max_gen_toks).

    lm-eval's standard keys: ``until``; ``max_gen_toks`` (or ``max_new_tokens`` / ``max_tokens`` /
    ``max_completion_tokens``); ``do_sample`` (False forces ``temperature=0``, as lm-eval does). Everything else is
    returned as a decoding parameter, to be validated. The task's lists are never modified.
    """
    kwargs = dict(gen_kwargs)
    until = kwargs.pop("until", None)
    until = [until] if isinstance(until, str) else list(until or [])
    budgets = [kwargs.pop(k) for k in MAX_TOKENS_KEYS if k in kwargs]
    budgets = [b for b in budgets if b is not None]
    max_gen_toks = int(coerce("max_gen_toks", budgets[0], int)) if budgets else DEFAULT_MAX_GEN_TOKS
    if kwargs.pop("do_sample", None) is False:
        kwargs["temperature"] = 0.0
    return kwargs, until, max_gen_toks


def _cache_names():
    from lmeval_dllm.caches import CACHES

    return list(CACHES)
