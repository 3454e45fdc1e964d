"""Conversions never destroy or mix what is on disk: `convert from-hf --overwrite` that fails leaves the old run
whole, an --out that is the input or another kind of directory is refused with one line, not a traceback."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from zenlm import __version__
from zenlm.config import GPTConfig
from zenlm.models.gpt import GPT
from zenlm.rundir import write_run_config
from zenlm.tokenizer import Tokenizer
from zenlm.train.checkpoint import save_model


def _gpt2_run(root: Path, tok: Tokenizer, seed: int) -> Path:
    """A run directory holding a random GPT-2-layout model (exportable) with ``tok``."""
    import torch

    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16)
    run = root / f"run-{seed}"
    run.mkdir()
    save_model(GPT(cfg), run / "model.safetensors")
    tok.save(run)
    write_run_config(run, {"zenlm_version": __version__, "model": cfg.to_dict(), "objective": "causal-lm"})
    return run


@pytest.fixture
def hf_dir(tmp_path: Path, char_tok: Tokenizer, zenlm_cli) -> Path:
    """A Hugging Face GPT-2 directory (exported from a random run)."""
    out = tmp_path / "hf"
    assert zenlm_cli(["convert", "to-hf", _gpt2_run(tmp_path, char_tok, 0), "--out", out]).rc == 0
    return out


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_a_failed_import_with_overwrite_leaves_the_old_run_whole(
        hf_dir: Path, tmp_path: Path, bpe_tok: Tokenizer, zenlm_cli) -> None:
    """Issue 13.8: the new tokenizer was written before the import failed, beside the old weights."""
    run = tmp_path / "imported"
    assert zenlm_cli(["convert", "from-hf", hf_dir, "--out", run]).rc == 0
    before = _snapshot(run)
    bad = tmp_path / "hf-bad"
    shutil.copytree(hf_dir, bad)
    bpe_tok.save(bad)  # more tokens than the model has embeddings: found only after the weights are read
    rc, _, err = zenlm_cli(["convert", "from-hf", bad, "--out", run, "--overwrite"])
    assert rc == 2 and "tokens but the model only" in err, err
    assert _snapshot(run) == before
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    rc, _, err = zenlm_cli(["convert", "from-hf", hf_dir, "--out", run, "--overwrite"])  # and a good one works
    assert rc == 0, err


def test_export_into_its_own_run_is_refused_and_the_run_is_kept(hf_dir: Path, tmp_path: Path,
                                                                 char_tok: Tokenizer, zenlm_cli) -> None:
    """Issue 13.9: `convert to-hf RUN --out RUN` replaced the run's weights with the exported ones."""
    run = _gpt2_run(tmp_path, char_tok, 1)
    before = _snapshot(run)
    for extra in ([], ["--overwrite"]):
        rc, _, err = zenlm_cli(["convert", "to-hf", run, "--out", run, *extra])
        assert rc == 2 and "is the directory being converted" in err and "Traceback" not in err, err
    other = tmp_path / "other-run"
    shutil.copytree(run, other)
    rc, _, err = zenlm_cli(["convert", "to-hf", run, "--out", other, "--overwrite"])
    assert rc == 2 and "zenlm run directory (config.yaml), which this conversion never replaces" in err, err
    assert _snapshot(run) == before and _snapshot(other) == before


def test_import_never_replaces_another_hugging_face_directory(hf_dir: Path, tmp_path: Path, zenlm_cli) -> None:
    """Issue 13.9: `from-hf A --out B` silently replaced B's files when B was another Hugging Face model."""
    other = tmp_path / "hf-other"
    shutil.copytree(hf_dir, other)
    before = _snapshot(other)
    for extra in ([], ["--overwrite"]):
        rc, _, err = zenlm_cli(["convert", "from-hf", hf_dir, "--out", other, *extra])
        assert rc == 2 and "Hugging Face model directory (config.json), which this conversion never" in err, err
    rc, _, err = zenlm_cli(["convert", "from-hf", hf_dir, "--out", hf_dir])
    assert rc == 2 and "is the directory being converted" in err and "SameFileError" not in err, err
    assert _snapshot(other) == before


def test_an_export_replaces_an_export_only_with_overwrite(hf_dir: Path, tmp_path: Path, char_tok: Tokenizer,
                                                         zenlm_cli) -> None:
    run = _gpt2_run(tmp_path, char_tok, 2)
    rc, _, err = zenlm_cli(["convert", "to-hf", run, "--out", hf_dir])
    assert rc == 2 and "already holds a Hugging Face model directory" in err and "--overwrite" in err
    assert zenlm_cli(["convert", "to-hf", run, "--out", hf_dir, "--overwrite"]).rc == 0
    assert (hf_dir / "model.safetensors").read_bytes() != b""


@pytest.mark.parametrize("verb", ["from-hf", "to-hf"])
def test_a_folder_of_other_files_is_never_written_into(verb: str, hf_dir: Path, tmp_path: Path,
                                                       char_tok: Tokenizer, zenlm_cli) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    src = hf_dir if verb == "from-hf" else _gpt2_run(tmp_path, char_tok, 3)
    for extra in ([], ["--overwrite"]):
        rc, _, err = zenlm_cli(["convert", verb, src, "--out", mine, *extra])
        assert rc == 2 and "is not empty (notes.txt)" in err, err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
