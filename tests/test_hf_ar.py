"""hf_ar (lmeval_dllm/hf_ar.py): lm-eval's hf model for AR baselines on our tasks. The end-to-end run through
the lm_eval executable is in test_leaderboard_e2e.py."""

from __future__ import annotations

import subprocess
import sys


def test_registered_lazily():
    """Importing lm-eval's registry registers `hf_ar` beside `dllm`, importing neither module (nor torch)."""
    code = ("import sys, lm_eval.api.registry as r; "
            "print('hf_ar' in r.model_registry, 'lmeval_dllm.hf_ar' in sys.modules, 'torch' in sys.modules); "
            "print(r.model_registry.get('hf_ar').__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False", "False", "TimedHFLM"]


def test_dllm_keys_dropped_and_generation_keys_kept():
    from lmeval_dllm.hf_ar import dllm_generation_keys

    keys = dllm_generation_keys()
    # dLLM-only settings our task YAMLs carry (loop, proposal, strategies, caches) are dropped ...
    assert {"gen_length", "block_length", "logits_eos_inf", "confidence_eos_eot_inf", "threshold", "factor",
            "alg", "remasking", "gamma", "kp", "kr"} <= keys
    # ... while what transformers.generate itself understands keeps its meaning
    assert not keys & {"temperature", "top_p", "top_k", "do_sample", "max_new_tokens"}
