"""`lowbit chat`: a conversation with a model over stdin, in the runtime lowbit generate picks for it.

Each line read is a user turn; the whole conversation so far goes through the model's chat template and the
answer is streamed as it is produced, then kept in the history. /reset clears the history (the --system turn
stays), /exit or the end of the input ends. A model without a chat template is refused: lowbit generate feeds raw
text instead.
"""

from __future__ import annotations

import sys

from ..errors import LowbitError
from .generate import Sampling, answer, check_template_options, has_chat_template, open_runner

HELP = "type a message; /reset clears the history, /exit (or Ctrl-D) ends"


def run_chat(model, *, runtime: str = "auto", sampling: Sampling, system: str | None = None,
             threads: int | None = None, stdin=None, out=None) -> int:
    """`lowbit chat`: the loop over stdin's lines, each answer streamed to `out`."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    runner = open_runner(model, runtime, threads)
    try:
        if not has_chat_template(runner.tokenizer):
            raise LowbitError(f"{model} has no chat template; use lowbit generate")
        check_template_options(runner, model, True, system)
        interactive = stdin.isatty()
        if interactive:
            print(f"{model} in {runner.runtime}: {HELP}", file=sys.stderr, flush=True)
        converse(runner, _lines(stdin, interactive), sampling, system, out)
    finally:
        runner.close()
    return 0


def _lines(stdin, interactive: bool):
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line:
            return
        yield line.strip()


def converse(runner, lines, sampling: Sampling, system: str | None, out) -> list[dict]:
    """The conversation: each line a user turn answered with the history so far; returns the final history."""
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    for line in lines:
        if not line:
            continue
        if line == "/exit":
            break
        if line == "/reset":
            history = list(start)
            print("(history cleared)", file=sys.stderr, flush=True)
            continue
        history.append({"role": "user", "content": line})
        try:
            result = answer(runner, history, sampling, write=lambda text: (out.write(text), out.flush()))
        except LowbitError as exc:  # the history outgrew the context: say so, drop the turn, go on
            history.pop()
            print(f"error: {exc}", file=sys.stderr, flush=True)
            continue
        out.write("\n\n")
        out.flush()
        history.append({"role": "assistant", "content": result["output"]})
    return history
