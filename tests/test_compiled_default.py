"""Compiled decoding by default (zenlm.compiled.decoder_for): the first build for a model shape runs in the
background while the tokens come eagerly, a later decoder loads the program from disk, two processes that build
the same program at once both succeed, and without a C++ compiler the default decodes eagerly after one notice.

The suite makes eager the default (conftest sets ZENLM_COMPILE=0); these tests unset it, and each builds into a
directory of its own, so that a build here is always a first build.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache_dir

import zenlm.compiled
from zenlm.compiled import ProgramShape, compiled_decoder, decoder_for
from zenlm.config import GPTConfig
from zenlm.generate import GenerationConfig, generate_batch, generate_ids
from zenlm.models.gpt import GPT
from zenlm.tokenizer import train_tokenizer
from zenlm.train.checkpoint import save_model

pytestmark = pytest.mark.xdist_group("compiled-default")


def tiny(seed: int = 0) -> GPT:
    """Heads 8 wide with q/k norms, every gain and bias drawn from the seed: Inductor writes the values of 1-d
    tensors of at most 8 entries into a program unless told not to, so a program built in the background
    (from empty tensors) or for another model would decode with the wrong gains, and the tests below see it."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=1, n_head=4, n_embd=32, init_std=0.3,
                          qk_norm=True)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.5 * torch.randn_like(p))
    return model


@pytest.fixture
def compile_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The default as users get it (ZENLM_COMPILE unset), building into a fresh directory -> that directory."""
    monkeypatch.delenv("ZENLM_COMPILE", raising=False)
    monkeypatch.setenv("ZENLM_CACHE_DIR", str(tmp_path))
    return tmp_path / "decode-programs"


def test_the_first_build_runs_in_the_background_while_tokens_come(compile_default, caplog):
    caplog.set_level(logging.INFO, logger="zenlm.compiled")
    started = time.time()
    model = tiny()
    prompt = [1, 2, 3]
    want = list(generate_ids(model, prompt, GenerationConfig(max_new_tokens=20, temperature=0, compile=False)))
    tokens = generate_ids(model, prompt, GenerationConfig(max_new_tokens=20, temperature=0))  # compile=None
    t0 = time.perf_counter()
    first = next(tokens)
    assert time.perf_counter() - t0 < 5  # no wait for a build (15-60 s) before the first token
    # the build was asked for before the prefill, so its note came before the first token (the CLI prints the
    # text after the first token: the note does not land inside it)
    assert sum("in the background" in r.getMessage() for r in caplog.records) == 1
    assert not list(compile_default.glob("*.pt2"))  # the program is not there yet: it is being built
    decoder = compiled_decoder(model, background=True)
    shape = ProgramShape(False, 1, (4, 32, 8), "torch.float32", "cpu")
    assert not decoder.ready(shape)
    assert [first, *tokens] == want
    assert sum("in the background" in r.getMessage() for r in caplog.records) == 1  # the one-line note
    # Inductor writes the program's C++ files into the build process's own folder, not into its shared cache
    deadline, wrapper = time.monotonic() + 600, None
    while wrapper is None and not list(compile_default.glob("step-*.pt2")) and time.monotonic() < deadline:
        wrapper = next(compile_default.glob("inductor-work.*/*/*.wrapper.cpp"), None)
        time.sleep(0.02)
    assert wrapper is not None, "no work folder of the build process was seen"
    assert decoder.wait(timeout=600)
    assert decoder.ready(shape) and decoder.programs_built == 1
    while list(compile_default.glob("inductor-work.*")) and time.monotonic() < deadline:
        time.sleep(0.05)  # removed as the build process ends, which may be just after the program arrives
    shared = Path(inductor_cache_dir()) / wrapper.parent.name  # where Inductor would have put them
    assert not shared.exists() or shared.stat().st_mtime < started  # (or a leftover of an earlier version)
    programs = list(compile_default.glob("step-*.pt2"))
    assert len(programs) == 1 and list(compile_default.iterdir()) == programs  # no temporary, spec or log left
    # now the steps run the program; another model of this shape loads it from disk instead of building
    assert list(generate_ids(model, prompt, GenerationConfig(max_new_tokens=20, temperature=0))) == want
    other = tiny(seed=1)
    again = compiled_decoder(other)  # blocking: a missing program would be built here
    expect = list(generate_ids(other, prompt, GenerationConfig(max_new_tokens=12, temperature=0, compile=False)))
    assert list(generate_ids(other, prompt, GenerationConfig(max_new_tokens=12, temperature=0, compile=True))) \
        == expect
    assert again.programs_built == 0 and again.ready(shape)


def test_without_a_compiler_the_default_decodes_eagerly_after_one_notice(compile_default, monkeypatch, caplog):
    monkeypatch.setattr(zenlm.compiled, "compiler_available", lambda: False)
    monkeypatch.setattr(zenlm.compiled, "_NOTICE_GIVEN", threading.Event())
    caplog.set_level(logging.INFO, logger="zenlm.compiled")
    model = tiny(seed=2)
    assert decoder_for(model, None) is None and decoder_for(model, False) is None
    eager = GenerationConfig(max_new_tokens=10, temperature=0, compile=False)
    for _ in range(2):
        assert list(generate_ids(model, [4, 5], GenerationConfig(max_new_tokens=10, temperature=0))) == \
            list(generate_ids(model, [4, 5], eager))
        assert generate_batch(model, [[4, 5], [6]], GenerationConfig(max_new_tokens=10, temperature=0)) == \
            generate_batch(model, [[4, 5], [6]], eager)
    notes = [r for r in caplog.records if "no C++ compiler" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.WARNING  # once per process
    assert not compile_default.exists()  # nothing was built or started


def test_cli_without_a_compiler_says_so_once_and_generates(run_factory_tiny, compile_default):
    env = {**os.environ, "CXX": "/nonexistent/c++", "PYTHONIOENCODING": "utf-8"}  # no compiler to be found
    res = subprocess.run([sys.executable, "-m", "zenlm", "generate", str(run_factory_tiny), "ab", "--temperature",
                          "0", "--max-new-tokens", "8", "--device", "cpu"], capture_output=True, text=True,
                         encoding="utf-8", env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("no C++ compiler found") == 1
    assert "weights fp32 (the weights' own precision" in res.stderr  # what --dtype auto chose
    import zenlm

    lm = zenlm.load(run_factory_tiny, device="cpu")
    assert res.stdout == "ab" + lm.generate("ab", max_new_tokens=8, temperature=0, compile=False) + "\n"
    assert not compile_default.exists()


@pytest.fixture
def run_factory_tiny(tmp_path: Path) -> Path:
    tok = train_tokenizer(["abcdefgh ijklmnop " * 20], kind="char")
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=32, init_std=0.3))
    root = tmp_path / "run"
    root.mkdir()
    (root / "config.yaml").write_text(yaml.safe_dump({"model": model.config.to_dict()}, sort_keys=False))
    tok.save(root)
    save_model(model, root / "model.safetensors")
    return root


BUILDER = """
import json, sys, time
from pathlib import Path
import torch
from zenlm.compiled import compiled_decoder
from zenlm.config import GPTConfig
from zenlm.generate import GenerationConfig, generate_ids
from zenlm.models.gpt import GPT

torch.manual_seed(int(sys.argv[1]))
model = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_embd=48, init_std=0.3)).eval()
eager = list(generate_ids(model, [1, 2, 3], GenerationConfig(max_new_tokens=12, temperature=0, compile=False)))
print("ready", flush=True)
while not Path(sys.argv[2]).exists():  # start building together with the other process
    time.sleep(0.01)
got = list(generate_ids(model, [1, 2, 3], GenerationConfig(max_new_tokens=12, temperature=0, compile=True)))
print(json.dumps({"got": got, "eager": eager, "built": compiled_decoder(model).programs_built}), flush=True)
"""


def test_two_processes_building_the_same_program_at_once_both_succeed(compile_default, tmp_path):
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", BUILDER, str(seed), str(go)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=dict(os.environ)) for seed in (0, 1)]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        go.touch()
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert all(r["got"] == r["eager"] for r in results)  # each with its own weights, right
    assert [r["built"] for r in results] == [1, 1]  # both built it (neither found it on disk)
    assert len(list(compile_default.glob("step-*.pt2"))) == 1  # one program remains, whole
    assert not list(compile_default.glob("*.tmp.pt2"))


class _StandInBuilder:
    """Stands in for the build process (``python -m zenlm.compiled SPEC``): reads the spec, and each time the
    caller polls it, "builds" the next program (writes its file), then exits with ``rc``, leaving the last
    ``unbuilt`` programs without a file. ``seen``: how many programs the caller had loaded at each poll."""

    def __init__(self, argv: list[str], loaded: list[str], rc: int, unbuilt: int) -> None:
        spec = json.loads(Path(argv[-1]).read_text(encoding="utf-8"))
        self.names = [Path(p["path"]).name for p in spec["programs"]]
        paths = [Path(p["path"]) for p in spec["programs"]]
        self.todo, self.rc, self.returncode = paths[: len(paths) - unbuilt], rc, None
        self.loaded, self.seen = loaded, []

    def poll(self) -> int | None:
        self.seen.append(len(self.loaded))
        if self.todo:
            self.todo.pop(0).write_bytes(b"a program")
            return None
        self.returncode = self.rc
        return self.rc


@pytest.mark.parametrize("failure", [False, True])
def test_programs_queued_together_are_built_by_one_process_and_loaded_as_each_appears(
        compile_default, monkeypatch, caplog, failure):
    """A server queues the programs of all its batch sizes at once: one build process builds those missing,
    in order, and each is loaded as soon as its file appears. When the process fails, the programs it built
    are kept and the others decode eagerly, with a warning."""
    loaded: list[str] = []
    started: list[_StandInBuilder] = []
    monkeypatch.setattr(zenlm.compiled, "_open", lambda path, *a: loaded.append(path.name) or path.name)
    monkeypatch.setattr(zenlm.compiled.subprocess, "Popen", lambda argv, **kw: started.append(_StandInBuilder(
        argv, loaded, rc=1 if failure else 0, unbuilt=1 if failure else 0)) or started[-1])
    model = tiny()
    decoder = compiled_decoder(model, background=True)
    cache = model.make_cache(4, 32)
    decoder.prepare(cache.k, [1, 2, 4], batched=True)
    assert decoder.wait(60)
    shapes = [decoder._shape(rows, cache.k, True) for rows in (1, 2, 4)]
    names = [decoder._path((shape, False)).name for shape in shapes]
    assert [b.names for b in started] == [names]  # one process, the three programs in order ...
    assert started[0].seen[:3] == [0, 1, 2]  # ... each loaded before the next one was built
    ready = [decoder.ready(shape) for shape in shapes]
    if failure:
        assert loaded == names[:2] and ready == [True, True, False]
        assert "could not be built" in caplog.text and "exit status 1" in caplog.text
    else:
        assert loaded == names and all(ready) and decoder.programs_built == 3
    assert decoder.status()["pending"] == 0
    decoder.prepare(cache.k, [1, 2, 4], batched=True)  # nothing left to build: no new process
    assert decoder.wait(60) and len(started) == 1


def test_a_build_process_works_in_a_folder_of_its_own_and_sweeps_those_of_dead_builders(tmp_path, monkeypatch):
    """The work folder of a build process (``_work_folder``): made in the program cache and set as Inductor's
    cache folder once Inductor has probed the CPU (its probes stay in its shared folder, for every build);
    folders of build processes that no longer run are removed, those of running ones kept."""
    import torch._inductor.cpu_vec_isa as isa

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "shared"))
    probed: list[str] = []
    monkeypatch.setattr(isa, "valid_vec_isa_list", lambda: probed.append(os.environ["TORCHINDUCTOR_CACHE_DIR"]))
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    programs = tmp_path / "decode-programs"
    dead = programs / f"inductor-work.{finished.pid}.abc" / "c1"
    alive = programs / f"inductor-work.{os.getpid()}.def"
    other = programs / "step-0.pt2"
    for folder in (dead, alive):
        folder.mkdir(parents=True)
    other.write_bytes(b"a program")
    work = zenlm.compiled._work_folder(programs)
    assert probed == [str(tmp_path / "shared")]  # the probes ran before the setting changed
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(work) and work.is_dir() and work.parent == programs
    assert work.name.startswith(f"inductor-work.{os.getpid()}.")
    assert not dead.parent.exists() and alive.is_dir() and other.read_bytes() == b"a program"
