"""reversal_poem: prompts as ML-GSAI/LLaDA eval_reverse.py, the substring metric, data routes, the group."""

from __future__ import annotations

import pytest
from tasks_support import POEM_MINI, load_tasks

USER, ASSISTANT = "<|start_header_id|>user<|end_header_id|>", "<|start_header_id|>assistant<|end_header_id|>"


@pytest.fixture(scope="module")
def poem_tasks() -> dict:
    return load_tasks(["reversal_poem"], poem_path=POEM_MINI)


@pytest.fixture(scope="module")
def poem_docs(poem_utils, poem_file) -> list[dict]:
    return list(poem_utils.load_poems(poem_path=poem_file)["test"])


def test_group_holds_both_directions(poem_tasks):
    assert sorted(poem_tasks) == ["reversal_poem_forward", "reversal_poem_reverse"]


def test_prompts_exactly_as_eval_reverse(poem_tasks, poem_utils):
    doc = {"first": "床前明月光", "second": "疑是地上霜", "source": "唐•李白•静夜思"}
    assert poem_utils.forward_prompt(doc) == "床前明月光的下一句是什么？ 直接输出句子即可。"
    assert poem_utils.reverse_prompt(doc) == "疑是地上霜的上一句是什么？ 直接输出句子即可。"
    forward, reverse = poem_tasks["reversal_poem_forward"], poem_tasks["reversal_poem_reverse"]
    assert forward.doc_to_text(doc) == poem_utils.forward_prompt(doc) and forward.doc_to_target(doc) == "疑是地上霜"
    assert reverse.doc_to_text(doc) == poem_utils.reverse_prompt(doc) and reverse.doc_to_target(doc) == "床前明月光"


@pytest.mark.parametrize("name, question", [("reversal_poem_forward", "床前明月光的下一句是什么？"),
                                            ("reversal_poem_reverse", "疑是地上霜的上一句是什么？")])
def test_one_user_turn_through_the_chat_template(poem_tasks, llada_dir, name, question):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llada_dir)
    task = poem_tasks[name]
    task.build_all_requests(limit=1, apply_chat_template=True,
                            chat_template=lambda m, add_generation_prompt=True: tok.apply_chat_template(
                                m, tokenize=False, add_generation_prompt=add_generation_prompt))
    (inst,) = task.instances
    assert inst.args[0] == f"<|startoftext|>{USER}\n\n{question} 直接输出句子即可。<|eot_id|>{ASSISTANT}\n\n"
    # Greedy, 28 tokens, one block of 28, one token per step (28 steps), EOS logit -inf (LLaDA's --eos_inf).
    assert inst.args[1] == {"until": [], "do_sample": False, "max_gen_toks": 28, "gen_length": 28,
                            "block_length": 28, "logits_eos_inf": True}


@pytest.mark.parametrize("output, forward_acc, reverse_acc", [
    ("疑是地上霜", 1.0, 0.0),
    ("下一句是：“疑是地上霜。”", 1.0, 0.0),              # gold anywhere in the output
    ("床前明月光，疑是地上霜。", 1.0, 1.0),                # both lines: both directions count
    ("疑是地上", 0.0, 0.0),                               # a partial line is wrong
    ("疑是地上 霜", 0.0, 0.0),                            # no normalisation of spaces or punctuation
    ("床前明月光", 0.0, 1.0),
])
def test_substring_metric_on_crafted_outputs(poem_tasks, output, forward_acc, reverse_acc):
    doc = {"first": "床前明月光", "second": "疑是地上霜", "source": ""}
    assert poem_tasks["reversal_poem_forward"].process_results(doc, [output]) == {"acc": forward_acc}
    assert poem_tasks["reversal_poem_reverse"].process_results(doc, [output]) == {"acc": reverse_acc}


def mean_acc(task, docs, outputs) -> float:
    scores = [task.process_results(doc, [out])["acc"] for doc, out in zip(docs, outputs)]
    return sum(scores) / len(scores)


def test_gold_scores_100_and_mismatched_0(poem_tasks, poem_docs, poem_file):
    """On the published file (469 pairs) and on our fixture: gold lines 100%, the next item's gold 0%."""
    forward, reverse = poem_tasks["reversal_poem_forward"], poem_tasks["reversal_poem_reverse"]
    n = len(poem_docs)
    assert n == (469 if poem_file != POEM_MINI else 5)
    shifted = poem_docs[1:] + poem_docs[:1]
    assert mean_acc(forward, poem_docs, [d["second"] for d in poem_docs]) == 1.0
    assert mean_acc(reverse, poem_docs, [d["first"] for d in poem_docs]) == 1.0
    assert mean_acc(forward, poem_docs, [d["second"] for d in shifted]) == 0.0
    assert mean_acc(reverse, poem_docs, [d["first"] for d in shifted]) == 0.0
    # Echoing the prompt's line never counts: no line of the file contains its partner.
    assert mean_acc(forward, poem_docs, [d["first"] for d in poem_docs]) == 0.0


def test_default_route_is_the_published_url(poem_utils, monkeypatch):
    seen = []
    monkeypatch.setattr(poem_utils, "_cached_download", lambda url: seen.append(url) or POEM_MINI)
    docs = poem_utils.load_poems(pretrained="ignored", version=1.0)["test"]
    assert seen == ["https://raw.githubusercontent.com/ML-GSAI/LLaDA/main/data/poem_data.json"]
    assert len(docs) == 5 and docs[0]["first"] == "床前明月光"


def test_bad_paths(poem_utils, tmp_path):
    with pytest.raises(FileNotFoundError, match="poem_path"):
        poem_utils.load_poems(poem_path=str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"first": "a"}', encoding="utf-8")
    with pytest.raises(ValueError, match="JSON list"):
        poem_utils.load_poems(poem_path=str(bad))
