"""Fast-dLLM's dual cache (Wu et al., "Fast-dLLM", arXiv:2505.22618, §3.2, "DualCache"; NVlabs/Fast-dLLM
``llada/generate.py::generate_with_dual_cache``).

Like the prefix cache, but the suffix (the masked blocks right of the current one) is cached too: after the
block's first step, which runs the whole canvas, only the block's rows run, against the cached prefix *and*
suffix K/V. Per step that is ``block_length`` rows (Dream: one more, the row left of the block that predicts
its first column; its own K/V are refreshed with the block's, so a just-committed token's key is always
current) whatever the prompt and generation lengths.

On Fast-dLLM v2 (Wu et al., arXiv:2509.26328) this is the release's block cache (``use_block_cache=True`` of
``v2/generation_functions.py``), sub-blocks being the decode blocks inside an attention block: a step runs the
whole canvas while the sub-block's first column is still masked, in each row that has it so (the release decides
for the whole batch at once, so a batch there is not each prompt alone; here it is), and otherwise only the
sub-block's rows, without the row to their left (the release's; that column is decoded, so its logits are not
needed).
"""

from __future__ import annotations

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

    def query_span(self, model: DiffusionLM, state: DecodeState) -> tuple[int, int]:
        if self.masked_start_refresh:
            return state.block.start, state.block.stop
        return max(0, state.block.start - model.logit_shift), state.block.stop
