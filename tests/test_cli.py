"""The zenlm command: every verb, --help, --config YAML files, and clean errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import zenlm
from zenlm.cli import main

TEXT = "first citizen: we are accounted poor citizens, the patricians good.\n" * 150


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zenlm", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("verb", [[], ["tokenizer", "train"], ["prepare"], ["pretrain"], ["generate"], ["demo"]])
def test_help(verb: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main([*verb, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: zenlm" in out
    if verb == ["pretrain"]:
        for flag in ("--data", "--out", "--model", "--max-steps", "--max-seconds", "--resume", "--config"):
            assert flag in out


def test_full_pipeline_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    tok = tmp_path / "tok"
    assert main(["tokenizer", "train", "--corpus", str(corpus), "--kind", "bpe", "--vocab-size", "300",
                 "--out", str(tok)]) == 0
    assert (tok / "tokenizer.json").is_file()
    data = tmp_path / "data"
    assert main(["prepare", "--corpus", str(corpus), "--val-fraction", "0.1", "--tokenizer", str(tok),
                 "--out", str(data)]) == 0
    index = json.loads((data / "index.json").read_text())
    assert index["splits"]["val"]["tokens"] > 0
    # flags from a YAML file; the command line wins over the file
    cfg = tmp_path / "train.yaml"
    cfg.write_text("model: tiny\nmax-steps: 50\nbatch_size: 4\nseq_len: 32\neval_every: 3\n"
                   "device: cpu\nprecision: fp32\n", encoding="utf-8")
    run = tmp_path / "run"
    assert main(["pretrain", "--config", str(cfg), "--data", str(data), "--out", str(run),
                 "--max-steps", "6"]) == 0
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in recs) == 6
    assert any("val_bpb" in r for r in recs)
    out = capsys.readouterr().out
    assert "validation loss" in out and "bits/byte" in out
    assert main(["generate", str(run), "first", "--max-new-tokens", "5", "--seed", "1", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("first")
    lm = zenlm.load(run, device="cpu")
    expected = lm.generate("first", max_new_tokens=5, temperature=0.8, top_k=50, seed=1)
    assert text == "first" + expected + "\n"
    # --compile decodes through zenlm.compiled's decoder (stood in for here: a build takes 10-45 s; the programs
    # themselves are checked against eager decoding in tests/test_compiled.py): the same greedy text
    steps = []

    def stand_in(model):
        def step(*args, **kwargs):
            steps.append(1)
            return model.decode_step(*args, **kwargs)
        return step

    monkeypatch.setattr("zenlm.compiled.compiled_decoder", stand_in)
    assert main(["generate", str(run), "first", "--max-new-tokens", "12", "--temperature", "0", "--compile",
                 "--device", "cpu"]) == 0
    assert len(steps) == 11  # every step after the prompt's pass
    assert capsys.readouterr().out == "first" + lm.generate("first", max_new_tokens=12, temperature=0) + "\n"


def test_bad_input_gives_a_clear_error_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # the real entry point once; the other cases run the CLI in this process (a process each took 2 s more)
    r = run_cli("prepare", "--corpus", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "d"))
    assert r.returncode == 2
    assert "zenlm: error:" in r.stderr and "missing.txt" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "d" / "index.json").exists()

    def here(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        try:
            rc = main(list(args))
        except SystemExit as e:  # argparse's usage errors
            rc = e.code
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["zenlm", *args], rc, out, err)

    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    r = here("tokenizer", "train", "--corpus", str(empty), "--out", str(tmp_path / "t"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "empty" in r.stderr.lower()
    r = here("pretrain", "--out", str(tmp_path / "r"))
    assert r.returncode == 2 and "--data" in r.stderr
    r = here("pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "r"))
    assert r.returncode == 2 and "zenlm prepare" in r.stderr and "Traceback" not in r.stderr
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("max_stepz: 3\n", encoding="utf-8")
    r = here("pretrain", "--config", str(bad_yaml), "--data", "x", "--out", "y")
    assert r.returncode == 2 and "max_stepz" in r.stderr
    r = here("generate", str(tmp_path / "nope"), "hi")
    assert r.returncode == 2 and "config.yaml" in r.stderr and "Traceback" not in r.stderr


def test_presets_verb_lists_presets(capsys: pytest.CaptureFixture) -> None:
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in ("tiny", "demo", "classic-char", "gpt2-small"):
        assert name in out


def test_resume_keeps_the_runs_own_optimiser(tmp_path: Path, char_data: Path) -> None:
    """A run started with --recipe classic (AdamW, fp32) resumes with AdamW even when --recipe is not repeated."""
    import yaml

    run = tmp_path / "run"
    common = ["--data", str(char_data), "--out", str(run), "--device", "cpu", "--model", "tiny", "--batch-size", "4",
              "--seq-len", "16", "--eval-every", "0"]
    assert main(["pretrain", "--recipe", "classic", "--max-steps", "3", *common]) == 0
    first = yaml.safe_load((run / "config.yaml").read_text())
    assert main(["pretrain", "--resume", "--max-steps", "5", *common]) == 0
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in recs) == 5
    lrs = {r["step"]: r["lr"] for r in recs if "lr" in r}
    assert first["optim"]["name"] == "adamw" and lrs[5] <= first["optim"]["lr"]  # AdamW's lr, not Muon's


def test_mlm_pipeline_trains_wordpiece_by_default(tmp_path: Path) -> None:
    """`prepare --objective mlm` (no tokenizer given) -> WordPiece; `pretrain --objective mlm` -> a BERT run."""
    from zenlm.tokenizer import Tokenizer

    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    data = tmp_path / "data"
    assert main(["prepare", "--corpus", str(corpus), "--objective", "mlm", "--vocab-size", "300",
                 "--out", str(data)]) == 0
    assert Tokenizer.load(data).kind == "wordpiece"
    run = tmp_path / "bert"
    assert main(["pretrain", "--objective", "mlm", "--data", str(data), "--out", str(run), "--model", "bert-tiny",
                 "--max-steps", "4", "--batch-size", "4", "--seq-len", "32", "--device", "cpu"]) == 0
    enc = zenlm.load(run, device="cpu")
    assert enc.embed(["a b c"]).shape == (1, enc.config.d_model)


# ------------------------------------------------------------------------------ small things a new user meets
FIXTURE_GPT = Path(__file__).parent / "fixtures" / "runs" / "gpt"


def test_a_verb_with_actions_and_none_given_prints_its_own_help(capsys: pytest.CaptureFixture) -> None:
    """Issue 14.11: `zenlm finetune` printed the top-level help."""
    for verb, actions in (("finetune", ("seq2seq", "classify")), ("convert", ("from-hf", "to-hf")),
                          ("tokenizer", ("train",))):
        assert main([verb]) == 2
        out = capsys.readouterr().out
        assert out.startswith(f"usage: zenlm {verb}") and all(a in out for a in actions), out


def test_top_k_zero_means_no_limit_on_the_command_line(capsys: pytest.CaptureFixture) -> None:
    """Issue 14.11: `--top-k 0` was refused "(or None for no limit)", which a command line cannot say."""
    assert main(["generate", str(FIXTURE_GPT), "ab", "--top-k", "0", "--seed", "3", "--max-new-tokens", "12",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    lm = zenlm.load(FIXTURE_GPT, device="cpu")
    assert out == "ab" + lm.generate("ab", top_k=None, temperature=0.8, seed=3, max_new_tokens=12) + "\n"
    assert main(["generate", str(FIXTURE_GPT), "ab", "--top-k", "-1", "--device", "cpu"]) == 2
    assert "--top-k must be >= 0 (0: no limit)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "(0: no limit)" in " ".join(capsys.readouterr().out.split())


def test_compile_says_what_it_is_doing_while_it_builds(capsys: pytest.CaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 14.11: `--compile` was silent for the 20-45 s it takes to build the decode program. The program
    itself is built in tests/test_compiled.py; here the build is stood in for by its log line."""
    import logging

    def stream(self, prompt: str, **kw):
        logging.getLogger("zenlm.compiled").info("building the decode program (once per model shape; kept in X)")
        yield "!"

    monkeypatch.setattr(zenlm.LM, "stream", stream)
    assert main(["generate", str(FIXTURE_GPT), "ab", "--compile", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "note: building the decode program (once per model shape; kept in X)" in err


def test_notes_do_not_land_inside_the_streamed_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a terminal stdout and stderr share the screen. A note of the compiled step was printed after the
    echoed prompt, mid-line. Now the prompt is echoed once the first token is there (the note is logged before
    the prefill), and a note that still comes while a line of text is open starts a line of its own."""
    import io
    import logging

    from zenlm.cli import common

    def stream(self, prompt: str, **kw):
        logging.getLogger("zenlm.compiled").info("building in the background")  # asked for before the prefill
        yield " one"
        yield " two"
        logging.getLogger("zenlm.compiled").warning("the program could not be loaded")  # a late note
        yield " three"

    screen = io.StringIO()  # stdout and stderr on one terminal
    monkeypatch.setattr(sys, "stdout", screen)
    monkeypatch.setattr(sys, "stderr", screen)
    monkeypatch.setattr(common._Text, "mid_line", False)
    monkeypatch.setattr(zenlm.LM, "stream", stream)
    assert main(["generate", str(FIXTURE_GPT), "ab", "--device", "cpu"]) == 0
    lines = screen.getvalue().splitlines()
    assert lines[-4:] == ["note: building in the background", "ab one two",
                          "note: the program could not be loaded", " three"], lines
    assert not common._Text.mid_line  # the text ended with its newline


def test_chat_warm_up_builds_the_program_the_first_reply_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """`zenlm chat --compile` built its decode program for a one-token prompt and 3 new tokens (a 256-slot
    cache), while the first reply (its template, max_new_tokens 256) runs a 512-slot one: the reply then waited
    for a second build. The shapes asked for are recorded here instead of built."""
    from zenlm.compiled import CompiledDecoder
    from zenlm.config import GPTConfig
    from zenlm.generate import GenerationConfig
    from zenlm.models.gpt import GPT
    from zenlm.serve.chat import chat_loop, warm_up

    asked: list[object] = []
    monkeypatch.setattr(CompiledDecoder, "_program", lambda self, shape: asked.append(shape))  # None: eager
    monkeypatch.setattr("zenlm.compiled.compiler_available", lambda: True)
    tok = zenlm.load(FIXTURE_GPT, device="cpu").tokenizer
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=2048, n_layer=1, n_head=2, n_embd=16)).eval()
    for max_new in (256, 100, 600):
        cfg = GenerationConfig(max_new_tokens=max_new, temperature=0, compile=True)
        asked.clear()
        warm_up(model, tok, cfg, system="Be brief.")
        warmed = set(asked)
        asked.clear()
        lines = iter(["Hello there, how are you today?", None])
        chat_loop(model, tok, lines.__next__, lambda text: None, cfg, system="Be brief.")
        assert warmed and set(asked) <= warmed, (max_new, warmed, set(asked))


def test_the_training_bar_starts_at_step_zero(tmp_path: Path) -> None:
    """Issue 14.11: the bar appeared only at the first logged step (10 steps in)."""
    import torch

    from zenlm.config import GPTConfig
    from zenlm.models.gpt import GPT
    from zenlm.recipes.pretrain import causal_lm_loss
    from zenlm.train.loop import TrainConfig, fit
    from zenlm.train.optim import OptimConfig

    seen = []

    def get_batch(step: int, micro: int):
        seen.append(("batch", step))
        x = torch.randint(0, 20, (2, 9))
        return x[:, :-1], x[:, 1:]

    fit(GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16)), get_batch, causal_lm_loss,
        tmp_path, TrainConfig(max_steps=3, log_every=10, eval_every=0, device="cpu", tensorboard=False),
        OptimConfig(warmup_steps=0), progress=lambda p: seen.append(("bar", p.done)) if p.total else None)
    assert seen[0] == ("bar", 0.0)  # before the first batch


def test_truncation_is_reported_once(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Issue 14.11: each truncation warning printed twice (a Python warning and a progress line)."""
    import warnings

    pairs = tmp_path / "pairs.jsonl"
    rng = __import__("random").Random(0)
    pairs.write_text("".join(json.dumps({"source": " ".join(str(rng.random()) for _ in range(60)), "target": "ab"})
                             + "\n" for _ in range(20)))  # sources of several hundred tokens: over the limit
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["finetune", "seq2seq", "--data", str(pairs), "--out", str(tmp_path / "run"), "--model",
                     "encdec-tiny", "--n-layer", "1", "--vocab-size", "300", "--max-steps", "1", "--device", "cpu",
                     "--precision", "fp32", "--eval-every", "0"]) == 0
    err = capsys.readouterr().err
    assert err.count("sources are longer than") == 2  # once for the training pairs, once for the validation ones
    assert not [w for w in caught if "truncated" in str(w.message)]


def test_log_records_go_to_the_stderr_of_the_moment(monkeypatch):
    """A server's threads log for as long as it runs; the handler the CLI installs must not keep the stream that
    was sys.stderr when it was made (a harness may have closed it since: "Logging error ... closed file")."""
    import io
    import logging

    from zenlm.cli.common import StderrHandler

    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    handler = StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("zenlm.test-stderr-handler")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("one")
        first.close()
        monkeypatch.setattr(sys, "stderr", second)
        monkeypatch.setattr(logging, "raiseExceptions", True)  # a failed emit would print "--- Logging error ---"
        log.warning("two")
    finally:
        log.removeHandler(handler)
    assert second.getvalue() == "two\n"
