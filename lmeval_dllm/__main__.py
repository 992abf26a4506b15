"""``python -m lmeval_dllm ...`` is ``lm_eval ...`` with ``--model dllm`` guaranteed to be registered.

Useful where the installed ``.pth`` hook is not processed (for example ``pip install --target``).
"""

import lmeval_dllm  # noqa: F401  (registers the model)


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
