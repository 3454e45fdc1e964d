"""The README is a contract: its command blocks and Python snippets run, as written, in a temporary directory.

One test walks the README top to bottom the way a reader does (each block may use what an earlier one made:
runs/data, runs/gpt ...), calling ``zenlm`` in this process. What a CI machine cannot do in seconds or without
network is changed in the open, command by command, by :func:`adapt`:

* budgets:  pretraining and fine-tuning get ``--max-steps 2`` and a one-layer, 32-wide model of the same preset
            (``--n-layer 1 --n-embd 32``: the preset's own layout, just smaller; one layer only when the
            embeddings come from word vectors, whose width they keep; an n-gram model is counted as written);
            ``finetune classify`` and ``wordvec train`` one epoch; ``finetune chat`` ``--max-steps 2``; lm-eval
            tasks ``--limit 2``; ``seqgan`` a few steps of each stage on 200 training and 50 test sequences;
* corpora:  ``--corpus shakespeare`` reads 60,000 characters of the same plays from a local file;
            ``--data chitchat`` (12 MB of conversations to tokenise) the smaller built-in ``chatterbot-en``;
* files the README assumes you have: ``train.jsonl``, ``test.jsonl``, ``reviews.jsonl``, ``chats.jsonl``,
            ``my.txt``, ``more.txt`` and the
            Hugging Face directories ``path/to/hf-model`` (a GPT-2 exported from a random run) and
            ``path/to/minilm`` (a two-layer BERT with random weights) are made first (:func:`_inputs`);
* network:  ``--from-hub NAME`` converts the local ``path/to/hf-model`` instead (a download needs network);
            lm-eval tasks whose data comes from the Hub are not run (:data:`NOT_RUN` lists every command this
            test leaves out, and why);
* the demo: ``runs/demo-en/run`` (made by ``make demo``, which tests/test_demo.py runs) is stood in for by
            the pipeline block's ``runs/gpt``.

A README command that stops working, or a new command this test cannot run, fails here.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# Commands (by their start) this test does not run, and why. Each is still checked to appear in the README, so
# the list cannot keep entries for commands that are gone.
NOT_RUN = {
    "make": "builds .venv and runs the demo or this suite (tests/test_demo.py runs `zenlm demo`)",
    "pip install": "installs packages",
    "zenlm serve": "starts a server that runs until it is stopped; tests/serve/ start it and talk to it",
    "zenlm chat": "an interactive terminal chat; tests/serve/test_terminal_chat.py drives it",
    "lm_eval": "lm-eval's own command against a running server; tests/test_lmeval.py runs it the same way",
    "torchrun": "launches several processes (some on GPUs or other machines); tests/test_distributed.py runs "
                "torchrun with the CLI on two CPU processes",
    "zenlm pretrain --data runs/data --out runs/gpt2p --resume": "continues the torchrun run above on one "
                                                                 "process (tests/test_distributed.py: 2 -> 1)",
    "zenlm evaluate runs/gpt2 --tasks hellaswag": "the task data is downloaded from the Hugging Face Hub",
    "zenlm evaluate runs/qwen": "the task data is downloaded from the Hugging Face Hub",
    "zenlm convert from-hf --from-hub Qwen": "a download of a real 0.5B model; the --from-hub line above stands "
                                             "in for it",
}
# README commands that fail today, each with what will fix it. They must fail cleanly (exit 2, one line, no
# traceback); when one starts to work this test fails until its entry is removed, so none stays here by mistake.
KNOWN_BROKEN: dict[str, str] = {}
SNIPPETS_NOT_RUN = {"from openai import OpenAI": "talks to a running `zenlm serve` (tests/serve/ use this client)"}
SHRINK = ["--n-layer", "1", "--n-embd", "32"]


def readme_blocks() -> list[tuple[str, int, str]]:
    """(language, line number, text) of every fenced block of the README."""
    text = README.read_text(encoding="utf-8")
    return [(m.group(1), text[: m.start()].count("\n") + 2, m.group(2))
            for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)]


def block_commands(body: str, first_line: int) -> list[tuple[int, str]]:
    """(line number, command) of a shell block: continuation lines joined, comments and blank lines dropped."""
    out, pending, start = [], "", 0
    for n, line in enumerate(body.splitlines(), first_line):
        if not pending:
            start = n
        pending += line.rstrip("\\").rstrip() + " " if line.rstrip().endswith("\\") else line
        if line.rstrip().endswith("\\"):
            continue
        command = shlex.join(shlex.split(pending, comments=True))
        pending = ""
        if command:
            out.append((start, command))
    return out


def _skipped(command: str) -> str | None:
    return next((why for start, why in NOT_RUN.items() if command.startswith(start)), None)


def adapt(argv: list[str], local_hf: str) -> list[str]:
    """A README command as this test runs it (see the module docstring)."""
    args = list(argv)
    if "--corpus" in args and args[args.index("--corpus") + 1] == "shakespeare":
        args[args.index("--corpus") + 1] = "shakespeare-60k.txt"
    if "--from-hub" in args:  # needs network: the same conversion of a local directory
        i = args.index("--from-hub")
        args[i : i + 2] = [local_hf]
    verb = " ".join(args[1:3])
    if args[1] == "pretrain" and "--model" in args and args[args.index("--model") + 1].startswith("ngram-"):
        pass  # an n-gram model is counted in one pass: no steps, no shape to shrink
    elif "--init-embeddings" in args:  # the embeddings keep the word vectors' width
        args += ["--max-steps", "2", "--n-layer", "1"]
    elif args[1] == "pretrain" or verb == "finetune seq2seq":
        args += ["--max-steps", "2", *SHRINK]
    if verb in ("finetune classify", "wordvec train"):  # word2vec over People's Daily: 5 epochs took 18 s
        args += ["--epochs", "1"]
    if verb == "vae train":
        args += ["--max-steps", "2", "--max-sentences", "400", "--eval-sentences", "32"]
    if args[1] == "seqgan":  # both stages, each a few steps, on a few sequences (10,000 oracle ones took 6 s)
        args += ["--mle-steps", "2", "--d-pretrain-steps", "2", "--adv-rounds", "1", "--rollouts", "2",
                 "--batch-size", "8", "--eval-samples", "16", "--temperatures", "1.0", "--n-train", "200",
                 "--n-test", "50"]
    if args[1] == "distill":
        args += ["--max-steps", "2"]
    if verb == "finetune chat":
        if args[args.index("--data") + 1] == "chitchat":
            args[args.index("--data") + 1] = "chatterbot-en"
        args += ["--max-steps", "2"]
    if args[1] == "evaluate" and "--tasks" in args:
        args += ["--limit", "2"]
    return args


def _run(argv: list[str], where: str, broken: str | None = None) -> str:
    """``zenlm ARGS`` in this process; its standard output (AssertionError with its stderr when it fails, or,
    for a command known to be ``broken``, when it does not fail cleanly)."""
    from zenlm.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = int(e.code or 0)
    if broken is not None:
        assert rc != 0, f"{where}: `zenlm {' '.join(argv)}` works now: remove it from KNOWN_BROKEN ({broken})"
        assert rc == 2 and err.getvalue().startswith("zenlm: error:"), f"{where}: {err.getvalue()[-3000:]}"
        return ""
    assert rc == 0, f"{where}: `zenlm {' '.join(argv)}` exited {rc}:\n{err.getvalue()[-3000:]}"
    return out.getvalue()


def _inputs(root: Path, sample_text: str, char_tok, wordpiece_tok) -> None:
    """The files the README's commands assume the reader has."""
    import torch
    from safetensors.torch import save_file

    from zenlm import __version__
    from zenlm.config import GPTConfig
    from zenlm.convert import export_hf
    from zenlm.models.gpt import GPT
    from zenlm.rundir import write_run_config
    from zenlm.train.checkpoint import save_model

    (root / "shakespeare-60k.txt").write_text(sample_text[:60_000], encoding="utf-8")
    (root / "my.txt").write_text(sample_text[:60_000], encoding="utf-8")
    (root / "more.txt").write_text(sample_text[60_000:90_000], encoding="utf-8")
    words = sample_text[:20_000].split()
    pairs = [{"source": " ".join(words[i : i + 12]), "target": " ".join(words[i : i + 3])} for i in range(0, 480, 12)]
    (root / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    reviews = [{"text": f"{w} was a {'wonderful' if i % 2 else 'dreadful'} film", "label": "pos" if i % 2 else "neg"}
               for i, w in enumerate(words[:40])]
    (root / "reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reviews), encoding="utf-8")
    # test.jsonl serves two blocks: pairs for the seq2seq run, labelled texts for the classifier
    (root / "test.jsonl").write_text("".join(json.dumps({**p, **r}) + "\n" for p, r in zip(pairs[:8], reviews[:8],
                                                                                           strict=True)))
    chats = [{"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": w},
                           {"role": "assistant", "content": f"{w}, you say."}]} for w in words[:20]]
    chats += [{"conversations": [{"from": "human", "value": w}, {"from": "gpt", "value": "Indeed."}]}
              for w in words[20:40]]
    (root / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats), encoding="utf-8")
    # path/to/hf-model: a GPT-2 (random weights), written by zenlm's own export
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=char_tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32)
    run = root / "hf-source-run"
    run.mkdir()
    save_model(GPT(cfg), run / "model.safetensors")
    char_tok.save(run)
    write_run_config(run, {"zenlm_version": __version__, "model": cfg.to_dict(), "objective": "causal-lm"})
    export_hf(run, root / "path" / "to" / "hf-model")
    # path/to/minilm: a two-layer BERT with random weights in transformers' names, and a WordPiece tokenizer
    d, ff, layers, vocab = 32, 64, 2, wordpiece_tok.vocab_size
    g = torch.Generator().manual_seed(0)
    w: dict[str, torch.Tensor] = {}

    def add(name: str, *shape: int) -> None:
        w[name] = 0.02 * torch.randn(*shape, generator=g) if len(shape) > 1 or "LayerNorm" not in name else \
            torch.ones(*shape)

    add("embeddings.word_embeddings.weight", vocab, d)
    add("embeddings.position_embeddings.weight", 128, d)
    add("embeddings.token_type_embeddings.weight", 2, d)
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for name, (n_out, n_in) in {"attention.self.query": (d, d), "attention.self.key": (d, d),
                                    "attention.self.value": (d, d), "attention.output.dense": (d, d),
                                    "intermediate.dense": (ff, d), "output.dense": (d, ff)}.items():
            add(p + name + ".weight", n_out, n_in)
            w[p + name + ".bias"] = torch.zeros(n_out)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            add(p + ln + ".weight", d)
            w[p + ln + ".bias"] = torch.zeros(d)
    add("embeddings.LayerNorm.weight", d)
    w["embeddings.LayerNorm.bias"] = torch.zeros(d)
    minilm = root / "path" / "to" / "minilm"
    minilm.mkdir(parents=True)
    save_file(w, str(minilm / "model.safetensors"))
    (minilm / "config.json").write_text(json.dumps({
        "model_type": "bert", "architectures": ["BertModel"], "vocab_size": vocab, "hidden_size": d,
        "num_hidden_layers": layers, "num_attention_heads": 2, "intermediate_size": ff,
        "max_position_embeddings": 128, "type_vocab_size": 2, "hidden_act": "gelu", "pad_token_id": 0}))
    wordpiece_tok.save(minilm)
    roles = json.loads((minilm / "tokenizer_config.json").read_text())
    roles.update(cls_token=wordpiece_tok.role_tokens["bos"], sep_token=wordpiece_tok.role_tokens["eos"],
                 pad_token=wordpiece_tok.role_tokens["pad"], unk_token=wordpiece_tok.role_tokens["unk"],
                 mask_token=wordpiece_tok.role_tokens["mask"])
    (minilm / "tokenizer_config.json").write_text(json.dumps(roles))


def _is_benchmark_smoke(argv: list[str]) -> bool:
    return argv[0] == "python" and argv[1].startswith("benchmarks/") and "--smoke" in argv


def readme_benchmark_smokes() -> list[tuple[int, str]]:
    """(line, command) of the README's ``python benchmarks/... --smoke`` commands."""
    return [(n, c) for lang, line, body in readme_blocks() if lang == "bash"
            for n, c in block_commands(body, line) if _is_benchmark_smoke(shlex.split(c))]


@pytest.mark.slow
@pytest.mark.parametrize(("line", "command"), readme_benchmark_smokes(), ids=lambda v: str(v).split(" --")[0])
def test_readme_benchmark_smoke_runs(tmp_path: Path, line: int, command: str) -> None:
    """A benchmark's smoke mode, as the README writes it (in its own test, so that it runs beside the walk
    through the README): tiny models and budgets, and every part of the script reached."""
    argv = shlex.split(command)
    bench = subprocess.run([sys.executable, str(ROOT / argv[1]), *argv[2:]], capture_output=True, text=True,
                           timeout=600, cwd=tmp_path)
    assert bench.returncode == 0, f"README.md:{line}: `{command}`: {bench.stderr[-3000:]}"
    assert "|---" in bench.stdout, f"README.md:{line}: `{command}` printed no table:\n{bench.stdout[-2000:]}"


@pytest.mark.slow
def test_the_readme_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sample_text: str,
                                    char_tok, wordpiece_tok) -> None:
    monkeypatch.chdir(tmp_path)
    _inputs(tmp_path, sample_text, char_tok, wordpiece_tok)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "lmeval_tasks").symlink_to(ROOT / "tests" / "lmeval_tasks")  # README: from the repo root
    local_hf = str(tmp_path / "path" / "to" / "hf-model")
    ran, skipped = [], set()
    for lang, line, body in readme_blocks():
        where = f"README.md:{line}"
        if lang == "bash":
            for n, command in block_commands(body, line):
                if _skipped(command) or command.endswith("&"):
                    skipped.add(command)
                    continue
                argv = shlex.split(command)
                if _is_benchmark_smoke(argv):  # run on its own, beside this test: test_readme_benchmark_smoke_runs
                    ran.append(command)
                    continue
                assert argv[0] == "zenlm", f"README.md:{n}: `{command}` is neither run here nor in NOT_RUN"
                out = _run(adapt(argv, local_hf)[1:], f"README.md:{n}", KNOWN_BROKEN.get(command))
                ran.append(command)
                if argv[1] == "generate":
                    assert out.strip() != argv[3], f"README.md:{n}: nothing was generated"
        elif lang == "python":
            if any(body.startswith(s) for s in SNIPPETS_NOT_RUN):
                continue
            if "runs/demo-en/run" in body and not (tmp_path / "runs" / "demo-en" / "run").exists():
                shutil.copytree(tmp_path / "runs" / "gpt", tmp_path / "runs" / "demo-en" / "run")
            with contextlib.redirect_stdout(io.StringIO()) as printed:
                exec(compile(body, where, "exec"), {"__name__": "readme"})  # noqa: S102 - the README's own code
            assert printed.getvalue().strip(), f"{where}: the snippet printed nothing"
    assert len(ran) >= 20, ran  # the blocks were found and run
    for start in NOT_RUN:  # every exception still names a README command
        assert any(c.startswith(start) for c in skipped), f"NOT_RUN[{start!r}] matches no README command any more"
    assert set(KNOWN_BROKEN) <= set(ran), set(KNOWN_BROKEN) - set(ran)
