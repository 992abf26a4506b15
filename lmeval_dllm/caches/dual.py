"""Fast-dLLM's dual cache (Wu et al., "Fast-dLLM", arXiv:2505.22618, §3.2, "DualCache"; NVlabs/Fast-dLLM
``llada/generate.py::generate_with_dual_cache``).

Like the prefix cache, but the suffix (the masked blocks right of the current one) is cached too: after the
block's first step, which runs the whole canvas, only the block's rows run, against the cached prefix *and*
suffix K/V. Per step that is ``block_length`` rows (Dream: one more, the row left of the block that predicts
its first column; its own K/V are refreshed with the block's, so a just-committed token's key is always
current) whatever the prompt and generation lengths.

On Fast-dLLM v2 (Wu et al., arXiv:2509.26328) this is the release's block cache (``use_block_cache=True`` of
``v2/generation_functions.py``), sub-blocks being the decode blocks inside an attention block: a step runs the
whole attention block at a sub-block's first step and while the sub-block's first column is still masked, in each
row that has it so (the release decides for the whole batch at once, so a batch there is not each prompt alone;
here it is), and otherwise only the sub-block's rows, without the row to their left (the release's; that column is
decoded, so its logits are not needed). The pass that starts an attention block stores the finished one's final
K/V (``block_start_logits``, as ``cache=block``), so nothing left of the current attention block is rerun.
"""

from __future__ import annotations

import torch

from lmeval_dllm.caches.base import stored_column_logits
from lmeval_dllm.caches.prefix import PrefixCache
from lmeval_dllm.models import DiffusionLM, family_named
from lmeval_dllm.state import DecodeState


class DualCache(PrefixCache):
    """K/V of every position from the block's first step; later steps rerun only the block.

    Args:
        refresh_interval: rerun the whole canvas every ``refresh_interval`` steps inside a block (the block's
            first step always does). None (default): only at block starts, as Fast-dLLM.
        cuda_graphs: replay steps as CUDA graphs (an engine option, not the method's).
    """

    name = "dual"
    keeps_cached_keys_on_resize = False  # cached suffix keys sit at shifted positions after an insertion
    block_dependent_shapes = False  # the block has the same length everywhere: one graph serves all blocks

    def setup(self, model: DiffusionLM, state: DecodeState) -> None:
        super().setup(model, state)
        self.masked_start_refresh = model.block_size is not None and \
            family_named(model.args.family).autoregressive_block_start
        self._final = 0  # Fast-dLLM v2: canvas columns [0, _final) hold final K/V (finished attention blocks)

    def full_span(self, model: DiffusionLM, state: DecodeState) -> tuple[int, int]:
        """Fast-dLLM v2: a full step runs the current attention block (from the first column whose K/V are not
        final: at the first block, the prompt), as the release's block-cache refresh runs the block against its
        stored prefix; the columns right of it are invisible to it (block-causal). After it every attention block
        left of the current one is final."""
        if not self.masked_start_refresh:
            return super().full_span(model, state)
        bs, q0 = model.block_size, self._final
        self._final = state.block.start // bs * bs
        return q0, min(-(-state.block.stop // bs) * bs, state.x.shape[1])

    def block_start_logits(self, model: DiffusionLM, state: DecodeState, column: int) -> torch.Tensor:
        """Fast-dLLM v2: the release's store pass, as ``cache=block`` makes it (the finished attention block, or
        at the start the prompt's full blocks, write their final K/V); the logits (B, V) of ``column``."""
        if not self.masked_start_refresh:
            return super().block_start_logits(model, state, column)
        logits = stored_column_logits(self, model, state, self._final, column)
        self._final = column
        return logits

    def query_span(self, model: DiffusionLM, state: DecodeState) -> tuple[int, int]:
        if self.masked_start_refresh:
            return state.block.start, state.block.stop
        return max(0, state.block.start - model.logit_shift), state.block.stop
