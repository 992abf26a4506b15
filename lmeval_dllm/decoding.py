"""Which decoding settings a request runs with: one pure function, :func:`resolve`.

    resolve(strategy, cache, user_params, task_gen_kwargs, max_length=512) -> Decoding

Inputs: the strategy and cache names, the decoding parameters the user put in ``--model_args`` (everything that is
not a model argument), a request's ``generation_kwargs`` (the task's, with ``--gen_kwargs`` merged in by lm-eval)
and the model's context length. Output: a :class:`Decoding` (lengths, sampler, cache name and parameters, stop
strings) and the decisions taken on the user's behalf, as sentences (``Decoding.notes``) the caller logs.

The rules, in order:

1. Names. The strategy and the cache exist and go together (``check_compatible``). A ``--model_args`` name the
   cache takes goes to the cache; one both the cache and the strategy take (d2Cache's and the certainty prior's
   ``sigma``) goes to both. Every other name must be a loop, proposal or strategy parameter of this strategy;
   anything else is an error with a did-you-mean. Cache parameters in a task's kwargs are an error (they go in
   ``--model_args``, with the cache). Values are converted to the declared types or refused.
2. Precedence: ``--model_args`` > the task's generation kwargs > defaults.
3. Lengths. ``gen_length`` defaults to the task's ``max_gen_toks`` (its first spelling in :data:`MAX_TOKENS_KEYS`;
   :data:`DEFAULT_MAX_GEN_TOKS` when the task has none). ``block_length`` defaults to
   :data:`DEFAULT_BLOCK_LENGTH`; when it was not given and does not divide ``gen_length``, the generation is one
   block (a note). A given value that does not divide is an error naming both. 0 is a value, never "not given".
   For a block-causal model (``block_size``: SDAR, TraDo, LLaDA2) it defaults to the model's block size and must
   divide it, and a ``gen_length`` that is not a multiple of the model's block is rounded up to one (a note);
   strategies and caches that need full attention are errors there. A model family's ``decoding_defaults`` (the
   release decoder's settings, e.g. LLaDA2's ``threshold=0.95``) come below the task's and the user's values.
4. Context (when ``max_length`` is known). A given length (``gen_length``, the task's ``max_gen_toks``, DAEDAL's
   ``initial_gen_length`` / ``max_gen_length``) that leaves no room for a prompt is an error naming it. A
   *default* that depends on the model is fitted to it, with a note: DAEDAL's ``max_gen_length`` (release
   default 2048) becomes ``min(2048, max_length // 2)``, so half the context is left for the prompt (LLaDA-8B's
   4096 keeps 2048; the bundled tiny-llada's 512 gets 256), and ``initial_gen_length`` is lowered to it if
   needed; our own ``max_gen_toks`` default of 256, used when a task names no budget, becomes
   ``max_length // 2`` the same way.
5. A strategy that chooses each answer's length itself (``sizes_canvas``, DAEDAL) uses neither ``gen_length``
   nor ``max_gen_toks``: a ``gen_length`` in ``--model_args`` is an error, a task's is ignored (a note).

No model, tokenizer or device is touched: every error here comes before any work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from lmeval_dllm.caches import CACHES, build_cache, cache_class, cache_params, check_compatible
from lmeval_dllm.generate import GenerationConfig, check_block_causal
from lmeval_dllm.params import coerce, coerce_kwargs, did_you_mean, keyword_params
from lmeval_dllm.samplers import SAMPLERS, Proposal, Sampler, build_sampler, sampler_class, sampler_params

DEFAULT_BLOCK_LENGTH = 32
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's own default budget, when a task names none

# Decoding parameters owned by the loop (the rest belong to the proposal, the strategy or the cache).
LOOP_PARAMS: dict[str, tuple[Any, Any]] = {
    "gen_length": (Optional[int], None),
    "block_length": (Optional[int], DEFAULT_BLOCK_LENGTH),
}
PROPOSAL_PARAMS = keyword_params(Proposal.from_params)
# lm-eval's spellings of the generation budget, by priority (as lm-eval's own normalize_gen_kwargs orders them).
MAX_TOKENS_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")

MODEL_ARGS = "--model_args"
TASK_KWARGS = "the task's generation_kwargs / --gen_kwargs"


@dataclass(frozen=True)
class Decoding:
    """What one group of requests runs with.

    config: lengths; None only when no length is known yet (``resolve`` without a task, no ``gen_length``).
    sampler: the strategy object (its proposal not yet bound to the tokenizer's EOS / end-of-turn ids).
    cache: cache name, None for the exact computation; cache_params: its parameters (converted).
    params: every loop / proposal / strategy parameter given, after precedence (converted).
    until: the task's stop strings (before the caller adds EOS); max_gen_toks: the task's budget (None
        without a task). notes: decisions taken for the user, one sentence each, for the log.
    """

    config: Optional[GenerationConfig]
    sampler: Sampler
    cache: Optional[str]
    cache_params: Mapping[str, Any]
    params: Mapping[str, Any]
    until: tuple[str, ...] = ()
    max_gen_toks: Optional[int] = None
    notes: tuple[str, ...] = ()


def accepted_params(strategy: str) -> dict[str, tuple[Any, Any]]:
    """{name: (type, default)} of every decoding parameter strategy ``strategy`` takes (loop, proposal, own)."""
    return {**LOOP_PARAMS, **PROPOSAL_PARAMS, **sampler_params(strategy)}


def all_decoding_keys() -> frozenset[str]:
    """Every name some strategy or cache of ours takes: the loop's, the proposal's, each strategy's, each cache's."""
    names = set(LOOP_PARAMS) | set(PROPOSAL_PARAMS)
    for strategy in SAMPLERS:
        names |= set(sampler_params(strategy))
    for cache in CACHES:
        names |= set(cache_params(cache))
    return frozenset(names)


def check_strategy(strategy: str, params: Mapping[str, Any], cache: Optional[str] = None) -> None:
    """Raise ValueError unless ``strategy`` exists and takes ``params`` (names, types, ranges), through the
    same constructors as a run, and, with ``cache`` (a name, ``none`` for none), unless the pair can run. Lengths
    that depend on a task (``gen_length`` against ``steps``) are checked when they are known, by :func:`resolve`."""
    checked = _check_names(strategy, None, params, source=None)
    _build_sampler(strategy, checked)
    if cache is not None:
        check_compatible(sampler_class(strategy), cache_class(None if cache == "none" else cache))


def check_cache(cache: Optional[str], params: Mapping[str, Any]) -> None:
    """Raise ValueError unless ``cache`` (a name, ``none`` or None) exists and takes ``params``."""
    build_cache(None if cache == "none" else cache, **params)


def split_gen_kwargs(gen_kwargs: Mapping[str, Any]) -> tuple[dict, list[str], int]:
    """A request's generation kwargs -> (decoding parameters, stop strings, max_gen_toks).

    lm-eval's standard keys: ``until``; ``max_gen_toks`` (or ``max_new_tokens`` / ``max_tokens`` /
    ``max_completion_tokens``); ``do_sample`` (False forces ``temperature=0``, as lm-eval does). Everything else is
    returned as a decoding parameter, to be validated. The task's lists are never modified.
    """
    kwargs, until, max_gen_toks, _ = _split(gen_kwargs)
    return kwargs, until, max_gen_toks


def _split(gen_kwargs: Mapping[str, Any]) -> tuple[dict, list[str], int, Optional[str]]:
    """:func:`split_gen_kwargs`, plus the key the budget came from (None: our default)."""
    kwargs = dict(gen_kwargs)
    until = kwargs.pop("until", None)
    until = [until] if isinstance(until, str) else list(until or [])
    budgets = [(k, kwargs.pop(k)) for k in MAX_TOKENS_KEYS if k in kwargs]
    budgets = [(k, b) for k, b in budgets if b is not None]
    key, max_gen_toks = None, DEFAULT_MAX_GEN_TOKS
    if budgets:
        key, value = budgets[0]
        max_gen_toks = coerce(key, value, int)
        if max_gen_toks < 1:
            raise ValueError(f"{key}={value!r} in {TASK_KWARGS}: the generation budget must be an integer >= 1")
    if kwargs.pop("do_sample", None) is False:
        kwargs["temperature"] = 0.0
    return kwargs, until, max_gen_toks, key


def resolve(
    strategy: str,
    cache: Optional[str],
    user_params: Mapping[str, Any],
    task_gen_kwargs: Optional[Mapping[str, Any]] = None,
    *,
    max_length: Optional[int] = None,
    block_size: Optional[int] = None,
    family_defaults: Optional[Mapping[str, Mapping[str, Any]]] = None,
) -> Decoding:
    """The settings one group of requests runs with (the rules: this module's docstring).

    Args:
        strategy: ``strategy=`` of ``--model_args``. cache: ``cache=`` (a name, ``none`` or None).
        user_params: the other decoding parameters of ``--model_args`` (strategy, proposal, loop and cache ones).
        task_gen_kwargs: a request's ``generation_kwargs``; None checks the user's parameters alone (start-up).
        max_length: the model's context (prompt + generation); None skips the checks and fits against it.
        block_size: a block-causal model's block size (``ModelArgs.block_size``; None = bidirectional or not yet
            known): ``block_length`` defaults to it and must divide it; a ``gen_length`` that is not a multiple of the
            model's block is rounded up to one (a note; the releases decode whole blocks too); strategies and caches
            it cannot serve are refused (``generate.check_block_causal``; the caller checks a block-causal-only cache
            against a bidirectional model, which this function cannot tell from "not known yet").
        family_defaults: the model family's ``{strategy: {parameter: value}}`` (``Family.decoding_defaults``),
            used below the task's and the user's values.
    Raises:
        ValueError: naming the parameter, its value and what is allowed.
    """
    cache = None if cache in (None, "none") else cache
    chooser = sampler_class(strategy)
    check_compatible(chooser, cache_class(cache))
    notes: list[str] = []
    default_block = DEFAULT_BLOCK_LENGTH if block_size is None else block_size

    # 1. Names: the cache's parameters out of the user's (a name both take goes to both), then the rest checked.
    accepted, taken = accepted_params(strategy), cache_params(cache)
    cache_kw = {k: v for k, v in user_params.items() if k in taken}
    user = _check_names(strategy, cache, {k: v for k, v in user_params.items()
                                          if k not in taken or k in accepted}, source=MODEL_ARGS)
    cache_kw = coerce_kwargs(cache_class(cache).__init__, cache_kw, f"cache {cache!r}")
    if chooser.sizes_canvas and user.get("gen_length") is not None:
        raise ValueError(
            f"strategy {strategy!r} chooses each answer's length itself (initial_gen_length, max_gen_length): "
            f"gen_length does not apply; remove gen_length={user['gen_length']}"
        )

    # 2. Precedence.
    until, max_gen_toks, budget_key = (), None, None
    task: dict[str, Any] = {}
    if task_gen_kwargs is not None:
        kwargs, until, max_gen_toks, budget_key = _split(task_gen_kwargs)
        task = _check_names(strategy, cache, kwargs, source=TASK_KWARGS)
    family = dict((family_defaults or {}).get(strategy, {}))
    params = {**family, **task, **user}
    for name in family:
        if name not in task and name not in user:
            notes.append(f"strategy {strategy!r} on this model family: {name}={family[name]} (the release's "
                         f"default)")

    def source(name: str) -> str:
        return MODEL_ARGS if name in user else TASK_KWARGS

    # 3-5. Lengths.
    config = None
    block_length = params.get("block_length")
    if block_size is not None:
        check_block_causal(block_size, chooser, cache_class(cache), block_length)
    if chooser.sizes_canvas:
        if task_gen_kwargs is not None:
            notes.append(f"strategy {strategy!r} chooses each answer's length: the task's "
                         f"gen_length={params.get('gen_length')} / max_gen_toks={max_gen_toks} are not used")
        params.pop("gen_length", None)
        if max_length is not None:
            _fit_canvas_lengths(strategy, params, source, max_length, notes)
        config = GenerationConfig(None, default_block if block_length is None else block_length)
    else:
        gen_length, what = params.get("gen_length"), "gen_length"
        if gen_length is None and task_gen_kwargs is not None:
            gen_length, what = max_gen_toks, budget_key
            if budget_key is None and max_length is not None and gen_length >= max_length:
                gen_length = max(1, max_length // 2)
                notes.append(f"the task names no generation budget and the default max_gen_toks="
                             f"{DEFAULT_MAX_GEN_TOKS} leaves no room for a prompt in max_length={max_length}: "
                             f"gen_length={gen_length} (half the context)")
        if gen_length is not None:
            if what is not None and max_length is not None and gen_length >= max_length:
                origin = source(what) if what in params else TASK_KWARGS
                used = "" if what == "gen_length" else " (the generation budget, used as gen_length)"
                raise ValueError(
                    f"{what}={gen_length}{used} from {origin} leaves no room for a prompt in max_length="
                    f"{max_length}; pass gen_length=<at most {max_length - 1}> in --model_args, or a larger "
                    f"max_length"
                )
            if block_size is not None and gen_length % block_size:
                # whole attention blocks, as the releases decode (a smaller block_length is a sub-block of one)
                rounded = -(-gen_length // block_size) * block_size
                notes.append(f"gen_length={gen_length} is not a multiple of the block-causal model's block "
                             f"{block_size}: gen_length={rounded} (whole blocks)")
                gen_length = rounded
            if block_length is None and block_size is not None:
                block_length = block_size  # the model's block
            elif block_length is None:
                block_length = DEFAULT_BLOCK_LENGTH
                if gen_length % DEFAULT_BLOCK_LENGTH:
                    block_length = gen_length
                    notes.append(f"gen_length={gen_length} is not a multiple of the default block_length="
                                 f"{DEFAULT_BLOCK_LENGTH} and no block_length was given: one block of {gen_length}")
            config = GenerationConfig(gen_length=gen_length, block_length=block_length)
        elif block_length is not None:
            GenerationConfig(None, block_length)  # its range, before a task gives the length

    sampler = _build_sampler(strategy, params)
    if config is not None:
        sampler.validate_lengths(config.gen_length, config.block_length)
    return Decoding(config=config, sampler=sampler, cache=cache, cache_params=cache_kw, params=params,
                    until=tuple(until), max_gen_toks=max_gen_toks, notes=tuple(notes))


def _check_names(strategy: str, cache: Optional[str], kwargs: Mapping[str, Any], source: Optional[str]) -> dict:
    """Names known for this strategy, values of the declared types; anything else is an error."""
    accepted = accepted_params(strategy)
    out = {}
    for name, value in kwargs.items():
        if name not in accepted:
            if source is None:
                raise ValueError(f"unknown parameter {name!r} for strategy {strategy!r}{did_you_mean(name, accepted)}"
                                 f" accepted: {', '.join(sorted(accepted))} (cache parameters go under the cache)")
            cache_hint, owners = "", [c for c in CACHES if name in cache_params(c)]
            if source != MODEL_ARGS and (name in cache_params(cache) or owners):
                cache_hint = " (cache parameters go in --model_args, with the cache they belong to)"
            elif owners:
                cache_hint = f" ({name!r} is a parameter of cache {' / '.join(owners)}, not of cache={cache!r})"
            raise ValueError(
                f"unknown parameter {name!r} in {source} for strategy {strategy!r}"
                f"{did_you_mean(name, accepted)}{cache_hint} accepted decoding parameters: "
                f"{', '.join(sorted(accepted))}"
            )
        out[name] = coerce(name, value, accepted[name][0])
    return out


def _build_sampler(strategy: str, params: Mapping[str, Any]) -> Sampler:
    proposal = Proposal.from_params(**{k: v for k, v in params.items() if k in PROPOSAL_PARAMS})
    return build_sampler(strategy, proposal, **{k: v for k, v in params.items() if k in sampler_params(strategy)})


def _fit_canvas_lengths(strategy: str, params: dict, source, max_length: int, notes: list[str]) -> None:
    """A length-choosing strategy's ``initial_gen_length`` / ``max_gen_length`` against the context: given
    values must leave room for a prompt; the defaults are lowered to ``max_length // 2`` when they do not fit."""
    defaults = sampler_params(strategy)
    for name in ("initial_gen_length", "max_gen_length"):
        if name in params and params[name] is not None and params[name] >= max_length:
            raise ValueError(
                f"{name}={params[name]} from {source(name)} leaves no room for a prompt in max_length={max_length}; "
                f"pass {name}=<at most {max_length - 1}> (e.g. {max_length // 2}), or a larger max_length"
            )
    fit = max(1, max_length // 2)
    if "max_gen_length" not in params and defaults["max_gen_length"][1] > fit:
        initial = params.get("initial_gen_length", defaults["initial_gen_length"][1])
        value = max(fit, initial) if "initial_gen_length" in params else fit
        params["max_gen_length"] = value
        notes.append(f"strategy {strategy!r}: the default max_gen_length={defaults['max_gen_length'][1]} does not "
                     f"fit max_length={max_length}: max_gen_length={value} (half the context, leaving the rest "
                     f"for the prompt; pass max_gen_length to choose)")
    if "initial_gen_length" not in params and defaults["initial_gen_length"][1] > params.get(
            "max_gen_length", defaults["max_gen_length"][1]):
        params["initial_gen_length"] = params["max_gen_length"]
        notes.append(f"strategy {strategy!r}: the default initial_gen_length={defaults['initial_gen_length'][1]} "
                     f"exceeds max_gen_length={params['max_gen_length']}: initial_gen_length="
                     f"{params['initial_gen_length']}")
