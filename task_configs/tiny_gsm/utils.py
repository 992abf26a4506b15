"""Loads tiny_gsm from the JSONL files next to this file, so the task runs offline from any directory.

lm-eval calls ``custom_dataset`` with the task's ``metadata`` and ``dataset_kwargs`` as keyword arguments;
``--metadata '{"data_dir": "/some/dir"}'`` points it at other ``train.jsonl`` / ``test.jsonl`` files.
"""

from __future__ import annotations

import json
import os
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))


def load_tiny_gsm(data_dir: Optional[str] = None, **_ignored):
    """-> DatasetDict with a ``test`` split (and ``train`` when ``train.jsonl`` exists) of question/answer rows."""
    import datasets

    data_dir = data_dir or HERE
    out = {}
    for split in ("train", "test"):
        path = os.path.join(data_dir, f"{split}.jsonl")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                out[split] = datasets.Dataset.from_list([json.loads(line) for line in f if line.strip()])
    if "test" not in out:
        raise FileNotFoundError(f"tiny_gsm: no test.jsonl in {data_dir!r} (write it with scripts/tiny_gsm_data.py)")
    return datasets.DatasetDict(out)
