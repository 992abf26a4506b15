"""A scripted lm-eval model for scoring tests: it answers each request with a response chosen from the request's
document, so a task's whole lm-eval path (requests -> filters -> metrics -> aggregation) runs on answers whose
right or wrong is known (a plain module: test files import it)."""

from __future__ import annotations

from typing import Callable

from lm_eval.api.model import LM


class ScriptedLM(LM):
    def __init__(self, respond: Callable[[dict], str]):
        super().__init__()
        self.respond = respond
        self.prompts: list[str] = []

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        self.prompts += [r.args[0] for r in requests]
        return [self.respond(r.doc) for r in requests]

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError


def evaluate(task, respond: Callable[[dict], str], **kwargs) -> tuple[dict, list[dict]]:
    """Run ``task`` (an lm-eval task object) on the scripted model; returns (its results row, its samples)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    # An empty task index: the task object is given, and indexing lm-eval's own tasks costs ~10 s per call.
    out = lm_eval.simple_evaluate(model=ScriptedLM(respond), tasks=[task], log_samples=True,
                                  confirm_run_unsafe_code=True, task_manager=TaskManager(include_defaults=False),
                                  **kwargs)
    name = task.config.task
    return out["results"][name], sorted(out["samples"][name], key=lambda s: s["doc_id"])
