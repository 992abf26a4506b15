"""lm-eval glue: the ``dllm`` model.

    lm_eval --model dllm --model_args pretrained=GSAI-ML/LLaDA-8B-Instruct,strategy=vanilla,gen_length=256,\\
        block_length=32,threshold=0.9 --tasks gsm8k --apply_chat_template

Only lm-eval plumbing lives here: argument validation, tokenisation and batching, stop strings, statistics.
Decoding is ``lmeval_dllm.generate.generate``; strategies are ``lmeval_dllm.samplers``; caches are
``lmeval_dllm.caches``; models are ``lmeval_dllm.models``.

Decoding parameters (``gen_length``, ``block_length``, strategy, proposal and cache parameters) may be given in
``--model_args`` or carried by a task's ``generation_kwargs`` (and ``--gen_kwargs``, which lm-eval merges into
them). Precedence: what the user puts in ``--model_args`` > the task's generation kwargs (including
``--gen_kwargs``) > our defaults, decided by one function, ``lmeval_dllm.decoding.resolve``. ``gen_length``
defaults to the task's ``max_gen_toks``; a strategy that chooses each answer's length itself (DAEDAL) uses
neither, and a ``gen_length`` in ``--model_args`` is an error for it.

Likelihood requests (multiple-choice tasks, perplexity) use the Monte-Carlo estimate of the LLaDA paper's bound
(``lmeval_dllm.likelihood``). Under ``accelerate launch`` / ``torchrun`` each process takes its share of the
requests (lm-eval shards them by our global rank) on its own device. See docs/usage.md.
"""

from __future__ import annotations

import copy
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

from lmeval_dllm.caches import build_cache, cache_class
from lmeval_dllm.decoding import (  # noqa: F401 - re-exported: lm.py was their home
    DEFAULT_BLOCK_LENGTH, DEFAULT_MAX_GEN_TOKS, LOOP_PARAMS, MAX_TOKENS_KEYS, PROPOSAL_PARAMS, accepted_params,
    resolve, split_gen_kwargs,
)
from lmeval_dllm.generate import GenerationConfig, check_block_causal, generate
from lmeval_dllm.likelihood import MonteCarloLikelihood, estimate, greedy_matches
from lmeval_dllm.params import coerce
from lmeval_dllm.samplers import sampler_class
from lmeval_dllm.stats import RequestStats, StatsLog, StatsReporting

# A child of lm-eval's logger, so our INFO lines (the decoding statistics) print with lm-eval's own.
eval_logger = logging.getLogger("lm_eval.models.dllm")

# Short names for checkpoints shipped inside the package (no network needed).
BUNDLED_MODELS = {
    "tiny-llada": os.path.join(os.path.dirname(__file__), "assets", "tiny-llada"),
}

# batch_size=auto: the largest batch tried on a GPU (lm-eval's --max_batch_size overrides it), and the batch used on
# the CPU, where nothing signals that memory is short (no probing there).
DEFAULT_MAX_BATCH_SIZE = 64
CPU_AUTO_BATCH_SIZE = 8
LM_EVAL_DEFAULT_DEVICE = "cuda:0"  # what lm-eval's command line passes when no --device is given

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}


def resolve_pretrained(pretrained: str) -> str:
    return BUNDLED_MODELS.get(pretrained, pretrained)


@register_model("dllm")
class DLLM(StatsReporting, TemplateLM):
    """A diffusion LLM of a registered family (``lmeval_dllm.models.FAMILIES``: LLaDA, Dream) decoded by a
    pluggable strategy and cache.

    Model arguments (everything else in ``--model_args`` is a decoding parameter, see docs/usage.md):
        pretrained: hub id or local checkpoint directory, or a bundled short name (``tiny-llada``).
        strategy: decoding strategy (``vanilla`` ...). cache: approximate cache name, or none.
        dtype: ``auto`` (bfloat16 on GPU, float32 on CPU), ``bfloat16``, ``float16``, ``float32``.
        device: ``cuda``, ``cuda:N``, ``cpu``; default: CUDA when available. A CUDA device this machine does not
            have is an error.
        batch_size: prompts decoded together (left-padded); ``auto``: the largest batch that fits, found by a
            real decoding step at ``max_batch_size``, halved on CUDA out-of-memory (on the CPU:
            ``CPU_AUTO_BATCH_SIZE``, no probing); ``auto:N``: detected anew N times over each request group.
        max_batch_size: the first batch ``auto`` tries (default 64).
        trust_remote_code: let the *tokenizer* run remote code (Dream's tokenizer needs it). Our model
            modules never do.
        max_length: longest prompt + generation (or context + continuation) accepted (default: the model's
            maximum position).
        truncation: when a prompt is too long for ``max_length``, keep its last tokens (with a warning) instead
            of failing.
        add_bos_token: prepend BOS when tokenising (default: the tokenizer's own behaviour; never twice).
        seed: seed of the sampling RNG (temperature > 0, random remasking) and of the likelihood estimates.
        stats_path: write per-request statistics as JSON lines to this file.
        cuda_graphs: replay decode steps as CUDA graphs (default true; false: eager, for debugging or timing).
        fuse: fused elementwise CUDA kernels (default true; false: the plain PyTorch ops).
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
        cuda_graphs: bool = True,
        fuse: bool = True,
        peft: Optional[str] = None,
        **decoding: Any,
    ):
        super().__init__()
        # 1. Model-level arguments.
        self.batch_size_per_gpu, self.batch_schedule = _parse_batch_size(batch_size)
        self.max_batch_size = coerce("max_batch_size", max_batch_size, Optional[int])
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        self.max_batch_size = self.max_batch_size or DEFAULT_MAX_BATCH_SIZE
        self.batch_sizes: dict[Any, int] = {}  # batch_size=auto: what was detected (lm-eval reports these)
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

        # 2. Strategy, cache and decoding parameters: all checked before anything is loaded (lmeval_dllm.decoding).
        self.strategy = strategy
        self.cache_name = None if cache in (None, "none") else cache
        self.decoding_args = dict(decoding)  # as given; resolved again with each request group's gen kwargs
        checked = resolve(strategy, self.cache_name, self.decoding_args)
        self.user_decoding = dict(checked.params)  # the strategy's, proposal's and loop's share, converted
        self.cuda_graphs, self.fuse = coerce("cuda_graphs", cuda_graphs, bool), coerce("fuse", fuse, bool)
        self.cache = build_cache(self.cache_name, cuda_graphs=self.cuda_graphs, **checked.cache_params)
        self._noted: set[str] = set()
        if _launched_world_size() == 1:
            self._device = _pick_device(device)

        # 3. Checkpoint: config first (cheap), then tokenizer and weights.
        from lmeval_dllm.models import family_for, load_model, read_config, resolve_checkpoint_dir

        self.pretrained = resolve_pretrained(pretrained)
        directory = resolve_checkpoint_dir(self.pretrained, revision)
        config = read_config(directory)
        self.family = family_for(config, f"{directory}/config.json")  # the registered family (models/family.py)
        self.model_args = self.family.parse_config(config)
        if self.family.likelihood is not None:  # a family without one still runs every generation task
            self.estimator = dataclasses.replace(self.estimator, scheme=self.family.likelihood)
        self.accelerator, self._rank, self._world_size = None, 0, 1
        if _launched_world_size() > 1:
            self._device = self._setup_processes(device)
        self.max_length = self.max_length_arg or self.model_args.max_position
        self.block_size = self.model_args.block_size  # None: bidirectional; else block diffusion (SDAR, TraDo)
        check_block_causal(self.block_size, sampler_class(strategy), cache_class(self.cache_name), None)
        if self.block_size is not None and cache is None:  # its exact KV cache, unless cache= says otherwise
            self.cache_name = "block"
            self.cache = build_cache("block", cuda_graphs=self.cuda_graphs)
            self._note([f"cache=block: the exact KV cache of finished blocks, the default for the block-causal "
                        f"{self.family.name!r} model (block size {self.block_size}); cache=none runs the whole canvas"])
        # Lengths against the model's context, before the weights are read: a given length that cannot fit is
        # an error, a default that does not fit is fitted (a logged note). A block-causal model's block size and
        # the strategies / caches it cannot use are checked here too.
        self._note(resolve(strategy, self.cache_name, self.decoding_args, max_length=self.max_length,
                           block_size=self.block_size, family_defaults=self.family.decoding_defaults).notes)
        torch_dtype = (torch.bfloat16 if self._device.type == "cuda" else torch.float32) \
            if str(dtype).lower() == "auto" else _DTYPES[str(dtype).lower()]
        self.tokenizer = self._load_tokenizer(self.pretrained, revision)
        self.model = load_model(directory, dtype=torch_dtype, device=self._device, fuse=self.fuse, peft=peft)
        self.stop_token_ids = self._stop_token_ids()
        self.generator = torch.Generator(device=self._device).manual_seed(self.seed)
        self.stats = StatsLog()
        self._merged_stats: Optional[StatsLog] = None  # all processes' statistics, on the main process

    # ------------------------------------------------------------------------------------------------------------
    # Arguments

    def accepted_decoding_params(self) -> dict[str, tuple[Any, Any]]:
        return accepted_params(self.strategy)

    def _decoding_for(self, gen_kwargs: dict) -> tuple[GenerationConfig, Any, list[str]]:
        """One request group's settings (``lmeval_dllm.decoding.resolve``: --model_args > task gen kwargs >
        defaults), its sampler bound to this tokenizer's EOS / end-of-turn ids, and its stop strings."""
        decoding = resolve(self.strategy, self.cache_name, self.decoding_args, gen_kwargs, max_length=self.max_length,
                           block_size=self.block_size, family_defaults=self.family.decoding_defaults)
        self._note(decoding.notes)
        sampler = decoding.sampler
        sampler.proposal = sampler.proposal.bind(self.tokenizer.eos_token_id, self._eot_id())
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        return decoding.config, sampler, handle_stop_sequences(list(decoding.until), eos=eos)

    def _note(self, notes) -> None:
        """Log each decision taken for the user once per model (not once per request group)."""
        for note in notes:
            if note not in self._noted:
                self._noted.add(note)
                eval_logger.info("dllm: %s", note)

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

    def _end_of_turn_ids(self) -> list[int]:
        """The family's ``end_of_turn`` tokens this vocab has, in the family's order (LLaDA ``<|eot_id|>``; Dream
        ``<|im_end|>``, and DiffuCoder's ``<|dlm_pad|>``, which fills an answer's tail)."""
        ids = []
        for name in self.family.end_of_turn:
            tid = self.tokenizer.convert_tokens_to_ids(name)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id and tid >= 0:
                ids.append(tid)
        return ids

    def _eot_id(self) -> Optional[int]:
        """The chat end-of-turn token (the first of :meth:`_end_of_turn_ids`), if the vocab has one."""
        ids = self._end_of_turn_ids()
        return ids[0] if ids else None

    def _stop_token_ids(self) -> torch.Tensor:
        ids = {self.tokenizer.eos_token_id, self.model_args.eos_token_id, *self._end_of_turn_ids()}
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
        self._calls = getattr(self, "_calls", 0) + 1  # batch_size=auto detects anew for each call (task)
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
        batch_fn = None if self.batch_schedule == 0 else \
            (lambda pos, group: self._auto_batch_size(pos, group, groups))
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="dllm generate_until")
        results = []
        for chunk in collator.get_batched(n=self.batch_size_per_gpu or 0, batch_fn=batch_fn):
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
    # batch_size=auto

    def _auto_batch_size(self, pos: int, group: tuple, groups: dict) -> int:
        """Batch size at position ``pos`` of one request group (sorted longest prompt first), for Collator's
        ``batch_fn``. ``auto:N`` splits the group into N equal parts and detects at the start of each, on its
        first (longest) prompt, as HFLM's ``_batch_scheduler`` does; once ``max_batch_size`` fits, it is kept."""
        key = repr(sorted(group[pos][1].items(), key=lambda kv: kv[0]))
        part = min(pos * self.batch_schedule // len(group), self.batch_schedule - 1)
        at = (self._calls, key, part)
        if at not in self.batch_sizes:
            if part > 0 and self.batch_sizes.get((self._calls, key, part - 1)) == self.max_batch_size:
                self.batch_sizes[at] = self.max_batch_size
            else:
                start = -(-part * len(group) // self.batch_schedule)  # the part's first position
                config, sampler, _ = groups[key]
                self.batch_sizes[at] = self._detect_batch_size(group[start][0], config, sampler)
        return self.batch_sizes[at]

    def _detect_batch_size(self, context: str, config: GenerationConfig, sampler) -> int:
        """The largest batch of copies of ``context`` whose first decoding step (this strategy and cache, the
        widest canvas the strategy may reach) runs without CUDA out-of-memory: ``max_batch_size``, halved on each
        failure, down to 1. On the CPU, where no error warns of memory running out: ``CPU_AUTO_BATCH_SIZE``."""
        if not _probes_memory(self._device):
            size = min(CPU_AUTO_BATCH_SIZE, self.max_batch_size)
            self._note([f"batch_size=auto on {self._device.type}: {size} (no out-of-memory signal to probe there; "
                        f"pass an integer batch_size to choose)"])
            return size
        longest, what = (config.gen_length, "gen_length") if config.gen_length is not None else \
            (sampler.max_gen_length, "max_gen_length")
        ids = self._fit_prompt(context, self.tok_encode(context), longest, what)
        probe = copy.copy(sampler)
        if probe.sizes_canvas:  # start as wide as it may grow: the memory of its last steps
            probe.initial_gen_length = probe.max_gen_length
        step = probe.step

        def one_step(logits, state):
            step(logits, state)
            raise _ProbeDone

        probe.step = one_step
        generator = torch.Generator(device=self._device).manual_seed(self.seed)  # the run's own RNG is untouched

        def fits(n: int) -> None:
            try:
                generate(self.model, torch.tensor([ids] * n, dtype=torch.long), None, probe, config,
                         stop_token_ids=self.stop_token_ids, cache=self.cache, generator=generator)
            except _ProbeDone:
                pass

        size = largest_batch(fits, self.max_batch_size)
        eval_logger.info("dllm: batch_size=auto: %d (prompt of %d tokens + %s=%d, largest tried %d)", size, len(ids),
                         what, longest, self.max_batch_size)
        return size

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

    def _check_likelihood(self) -> None:
        if self.family.likelihood is None:
            raise ValueError(
                f"model family {self.family.name!r} has no likelihood scheme (Family.likelihood is None): "
                f"loglikelihood / multiple-choice tasks cannot run on it; generation tasks can")

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """``requests``: ((context, continuation), context ids, continuation ids), from lm-eval's
        ``TemplateLM.loglikelihood`` (BOS / empty-context handling and trailing-space moves done there).
        Returns (estimate of log p(continuation | context), is_greedy) per request, in order."""
        self._check_likelihood()
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
        self._check_likelihood()
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


class _ProbeDone(Exception):
    """Raised by batch_size=auto's probe after its one decoding step."""


def _probes_memory(device: torch.device) -> bool:
    """Whether running out of memory on ``device`` raises an error we can catch (CUDA), so a batch size can be
    found by trying."""
    return device.type == "cuda"


def largest_batch(fits: Callable[[int], None], start: int) -> int:
    """The first of ``start``, ``start // 2``, ... for which ``fits(n)`` raises no CUDA out-of-memory error; 1 if
    none does (the run then splits or names the prompt that does not fit alone). Other errors pass through."""
    n = start
    while n > 1:
        failed = False
        try:
            fits(n)
        except torch.cuda.OutOfMemoryError:
            failed = True
        if not failed:
            return n
        _release_memory()  # outside the handler: the traceback's tensors are already released
        n //= 2
    return 1


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


def _parse_batch_size(batch_size) -> tuple[Optional[int], int]:
    """``batch_size`` -> (fixed size or None, auto schedule): ``8`` -> (8, 0); ``auto`` -> (None, 1); ``auto:N``
    -> (None, N), lm-eval's convention (HFLM)."""
    if isinstance(batch_size, str) and batch_size.strip().lower().startswith("auto"):
        _, sep, times = batch_size.strip().lower().partition(":")
        try:
            schedule = int(times) if sep else 1
        except ValueError:
            schedule = 0
        if schedule < 1:
            raise ValueError(f"batch_size={batch_size!r}: expected an integer >= 1, 'auto', or 'auto:N' with N an "
                             f"integer >= 1 (detect the batch size N times over the run)")
        return None, schedule
    try:
        size = coerce("batch_size", batch_size, int)
    except ValueError:
        raise ValueError(f"batch_size={batch_size!r}: expected an integer >= 1, 'auto' or 'auto:N'") from None
    if size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, 'auto' or 'auto:N', got {batch_size!r}")
    return size, 0


def _pick_device(device: Optional[str]) -> torch.device:
    """``device`` (None / ``auto``: CUDA when available) as a torch device this machine has; else ValueError.
    ``cuda:0`` without a GPU is the exception, a warning and the CPU: lm-eval's command line passes it when no
    ``--device`` is given, so it cannot be told apart from a choice."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r}: expected cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 and device == LM_EVAL_DEFAULT_DEVICE:
            # lm-eval's command line passes device='cuda:0' when no --device is given: not a choice to refuse.
            eval_logger.warning("device=%s (lm-eval's default when no --device is given) but torch sees no GPU: "
                                "using the CPU", device)
            return torch.device("cpu")
        if count == 0:
            raise ValueError(f"device={device!r}: CUDA is not available on this machine (torch sees no GPU); "
                             f"available: cpu")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device={device!r}: this machine has {count} CUDA device(s); available: cpu, cuda, "
                             f"{', '.join(f'cuda:{i}' for i in range(count))}")
    return dev
