"""A model family as one registered object: what checkpoints it reads and everything the package needs to know
about them.

Each family file (``llada.py``, ``dream.py``) defines one :class:`Family` named ``FAMILY``; its one line in
``lmeval_dllm/models/__init__.py``'s ``FAMILIES`` registers it. Loading (``load_model``), the likelihood glue,
the end-of-turn stop tokens, the tiny checkpoints of the tests and every message that lists the supported
families read it from there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from lmeval_dllm.models.loading import Slot
from lmeval_dllm.models.transformer import ModelArgs


def _keep_every_weight(name: str) -> bool:
    return False


@dataclass(frozen=True)
class TinyTokenizer:
    """The tokenizer of a family's tiny checkpoints (``lmeval_dllm.tiny``): 256 byte tokens, then ``specials`` in
    order, the special-token roles and the release's chat template."""

    specials: tuple[str, ...]
    roles: dict[str, str]  # {"bos" | "eos" | "eot" | "mask" | "pad": special token}
    chat_template: str


@dataclass(frozen=True)
class Family:
    """One model family.

    Args:
        name: our name (``ModelArgs.family``), e.g. "llada".
        checkpoints: the released checkpoints it loads, for messages and docs.
        model_types: ``config.json`` ``model_type`` values (matched case-insensitively).
        architectures: ``config.json`` ``architectures`` entries. A config matches when its ``model_type`` is one
            of ``model_types`` and, if it lists architectures, one of them is one of these (two architectures may
            share a ``model_type``: LLaDA-MoE says "llada" too, and must not load as dense LLaDA).
        parse_config: config.json -> :class:`ModelArgs`; raises ValueError naming an unsupported field.
        weight_names: {official tensor name: :class:`Slot`} for the parsed architecture.
        likelihood: the Monte-Carlo likelihood scheme of its released evaluation code (``lmeval_dllm.likelihood
            .SCHEMES``), or None if it has none (then only generation tasks run).
        end_of_turn: the chat end-of-turn tokens that end an answer besides EOS.
        tiny_config: ``(special token ids, **overrides) -> config.json`` of a tiny checkpoint in the official
            layout (``lmeval_dllm.tiny.write_checkpoint``).
        tiny_tokenizer: the tokenizer of those checkpoints.
        ignore: official tensor names that may be in the files without being loaded (recomputable buffers).
        block_causal: the family's models attend block-causally (block diffusion, ``ModelArgs.block_size``),
            for messages that name those families.
        decoding_defaults: {strategy: {parameter: value}}: the release decoder's settings a strategy runs with on
            this family when neither ``--model_args`` nor the task gives them (``lmeval_dllm.decoding.resolve``).
        autoregressive_block_start: each attention block's first column is committed greedily (argmax, whatever
            the strategy) from the pass that stores the previous block's K/V, and one more column after the last
            block (Fast-dLLM v2's ``batch_sample``); the decode loop's ``commit_block_start``. False: the strategy
            decodes every mask.
    """

    name: str
    checkpoints: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    parse_config: Callable[[dict], ModelArgs]
    weight_names: Callable[[ModelArgs], dict[str, Slot]]
    likelihood: Optional[str]
    end_of_turn: tuple[str, ...]
    tiny_config: Callable[..., dict]
    tiny_tokenizer: TinyTokenizer
    ignore: Callable[[str], bool] = field(default=_keep_every_weight)
    block_causal: bool = False
    decoding_defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    autoregressive_block_start: bool = False

    def matches(self, config: dict) -> bool:
        if str(config.get("model_type", "")).lower() not in {m.lower() for m in self.model_types}:
            return False
        architectures = config.get("architectures") or []
        return not architectures or any(a in self.architectures for a in architectures)

    def describe(self) -> str:
        return (f"{self.name} (model_type {'/'.join(repr(m) for m in self.model_types)}, architectures "
                f"{', '.join(self.architectures)}: {self.checkpoints})")
