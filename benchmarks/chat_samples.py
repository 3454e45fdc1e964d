"""Sample dialogues for the docs: chat-tuned runs served by zenlm's OpenAI-compatible server, asked through the
official ``openai`` client, turn by turn with the history kept. Prints Markdown.

    python benchmarks/chat_eval.py --work runs/chat-bench --zh           # trains run-full (chitchat), run-full-zh
    python benchmarks/chat_samples.py --en runs/chat-bench/run-full --zh runs/chat-bench/run-full-zh

Each run is served on 127.0.0.1 (a free port) exactly as ``zenlm serve RUN`` serves it; the replies are
sampled (--temperature, --seed) and stop at the model's end-of-turn token or at --max-tokens. When a
conversation outgrows the model's context, its oldest exchanges are left out of the next request.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DIALOGUES = {
    "en": [["Hi! How are you today?", "What did you do this weekend?", "That sounds fun. Do you like movies?"],
           ["Hello, what is your name?", "Where are you from?", "What do you like to do for fun?"],
           ["Do you have any pets?", "What is your favorite food?", "Thanks for chatting, bye!"]],
    "zh": [["你好", "你好吗?", "你喜欢什么颜色?"],
           ["什么是人工智能?", "你会说英语吗?", "再见"],
           ["你喜欢什么书?", "你最喜欢的电影是什么?", "谢谢"]],
}


def dialogues(run: Path, lang: str, args: argparse.Namespace) -> str:
    """The Markdown transcript of DIALOGUES[lang] with the served run."""
    import openai

    import zenlm
    from zenlm.rundir import read_run_config
    from zenlm.serve.app import ServerThread, create_app
    from zenlm.serve.chat import model_kind

    lm = zenlm.load(run, device=args.device)
    name = run.resolve().name
    app = create_app(lm.model, lm.tokenizer, model_id=name, max_concurrency=2,
                     model_kind=model_kind(read_run_config(run)))
    lines = [f"### {'English' if lang == 'en' else 'Chinese'}: `{name}` (temperature {args.temperature:g})\n"]
    with ServerThread(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        for d, turns in enumerate(DIALOGUES[lang]):
            history: list[dict[str, str]] = []
            for i, text in enumerate(turns):
                history.append({"role": "user", "content": text})
                while True:
                    try:
                        answer = client.chat.completions.create(
                            model=name, messages=history, temperature=args.temperature, max_tokens=args.max_tokens,
                            seed=args.seed + 100 * d + i)
                        break
                    except openai.BadRequestError as e:  # the history outgrew the context: drop the oldest exchange
                        if "context" not in str(e) or len(history) < 3:
                            raise
                        history = history[2:]
                reply = answer.choices[0].message.content or ""
                note = "" if answer.choices[0].finish_reason == "stop" else " *(cut at the token limit)*"
                history.append({"role": "assistant", "content": reply})
                lines.append(f"> **user:** {text}  \n> **assistant:** {reply}{note}")
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--en", type=Path, help="English chat run (e.g. fine-tuned on chitchat)")
    ap.add_argument("--zh", type=Path, help="Chinese chat run (e.g. fine-tuned on chatterbot-zh)")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.en is None and args.zh is None:
        ap.error("give --en RUN and/or --zh RUN")
    for lang in ("en", "zh"):
        run = getattr(args, lang)
        if run is not None:
            print(dialogues(run, lang, args))


if __name__ == "__main__":
    main()
