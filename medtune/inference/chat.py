"""`medtune-chat`: multi-turn terminal chat with a medtune model, replies streamed as they are generated.

    medtune-chat --model exported/starling-medtuned     # or an adapter folder, or nothing for the demo model
    medtune-chat --model exported/starling-medtuned/model-q4_k_m.gguf    # on llama.cpp, privately on a laptop
    medtune-chat --model outputs/demo --ask "I have a fever and a sore throat." --temperature 0   # one answer

Commands: /reset starts a new conversation, /exit (or Ctrl-D) quits, Ctrl-C stops the current reply.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable, TextIO

from medtune.command_line import add_runtime_arguments
from medtune.inference.chat_format import DEFAULT_SYSTEM_PROMPT, with_system_prompt
from medtune.inference.decoding import Stream
from medtune.inference.generation import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE, Sampling
from medtune.inference.load import load_for_inference_or_demo
from medtune.inference.triage import triage_text

HELP = "Commands: /reset new conversation, /exit quit, /help this text. Ctrl-C stops a reply."
DISCLAIMER = ("Not a doctor: answers may be wrong. For emergency symptoms call your local emergency number "
              "or seek care now.")


@dataclass
class ChatOptions:
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = 1.0


def answer(model, fmt, options: ChatOptions, history: list[dict], out: TextIO) -> str:
    """Stream the reply to the conversation `history` (ending with the person's message) to `out`, the emergency
    notice first when the message calls for one; Ctrl-C stops the reply. Returns the reply."""
    triage = triage_text(history[-1]["content"])
    if triage.level != "none":  # before the model's text, as the web page's banner
        print(f"[{triage.level.upper()}] {triage.notice}", file=out)
    print("assistant> ", end="", file=out, flush=True)
    pieces = Stream(model, fmt, with_system_prompt(history, options.system_prompt), options.max_new_tokens,
                    Sampling(options.temperature, options.top_p))
    reply = ""
    try:
        for piece in pieces:
            reply += piece
            print(piece, end="", file=out, flush=True)
    except KeyboardInterrupt:
        pieces.close()
        print(" [stopped]", end="", file=out)
    print(file=out)
    return reply


def chat_loop(model, fmt, options: ChatOptions, read: Callable[[str], str] = input, out: TextIO | None = None):
    """Read-reply loop; `read` raises EOFError at the end of input; replies go to `out` (default stdout)."""
    out = out or sys.stdout
    history: list[dict] = []
    print(f"{DISCLAIMER}\n{HELP}", file=out)
    while True:
        try:
            text = read("\nyou> ").strip()
        except EOFError:
            break
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history.clear()
            print("(new conversation)", file=out)
            continue
        if text.startswith("/"):  # /help or an unknown command
            print(HELP, file=out)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        history.append({"role": "assistant", "content": answer(model, fmt, options, history, out)})


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medtune-chat", description="Chat with a medtune model in the terminal.")
    p.add_argument("--model", help="merged model folder, LoRA adapter folder or .gguf file (default: tiny demo model)")
    add_runtime_arguments(p)
    p.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT, help="system prompt ('' for none)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="longest reply in tokens")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="0 for greedy decoding")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--ask", metavar="MESSAGE", help="answer this one message and exit (no prompt, no history)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        model, fmt = load_for_inference_or_demo(args.model, args.device, args.dtype, args.adapter_base, args.engine,
                                                max_sequences=1)
    except (ValueError, OSError) as err:  # a missing or damaged .gguf, an engine that cannot run the model
        raise SystemExit(f"medtune-chat: {err}") from None
    options = ChatOptions(args.system_prompt, args.max_tokens, args.temperature, args.top_p)
    if args.ask is not None:
        print(f"you> {args.ask}")
        answer(model, fmt, options, [{"role": "user", "content": args.ask}], sys.stdout)
        return
    chat_loop(model, fmt, options)


if __name__ == "__main__":
    main()
