"""The sentence VAE: its KL term, the annealing schedule, the objective, training, exact resume, and the verbs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import zenlm
from zenlm.cli import main
from zenlm.data.sentences import chinese_sentences, english_sentences, normalise_sentence, short_sentences
from zenlm.errors import ConfigError
from zenlm.models.vae import TextVAE, TextVAEConfig, gaussian_kl, reconstruction_nll
from zenlm.recipes.vae import active_units, kl_weight, train_vae, vae_batch, vae_loss
from zenlm.train.loop import TrainConfig
from zenlm.vae import SentenceVAE


def test_kl_term_equals_its_closed_form() -> None:
    torch.manual_seed(0)
    mu, logvar = torch.randn(5, 4), torch.randn(5, 4)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mu, torch.exp(0.5 * logvar)),
                                            torch.distributions.Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(gaussian_kl(mu, logvar), ref)
    # by hand: one dimension with mu = 1, sigma^2 = e: 1/2 (1 + e - 1 - 1) = (e - 1) / 2
    assert gaussian_kl(torch.tensor([[1.0]]), torch.tensor([[1.0]])).item() == pytest.approx((math.e - 1) / 2)
    assert gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3)).tolist() == [0.0, 0.0]  # q = p


def test_annealing_follows_its_schedule() -> None:
    assert [kl_weight(s, "linear", 100) for s in (0, 25, 50, 100, 500)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    sig = [kl_weight(s, "sigmoid", 100) for s in (0, 50, 100, 1000)]
    assert sig[0] == pytest.approx(1 / (1 + math.exp(5))) and sig[1] == 0.5 and sig[2] == pytest.approx(
        1 / (1 + math.exp(-5))) and sig[3] > 0.9999
    assert all(a < b for a, b in zip(sig, sig[1:], strict=False))
    assert kl_weight(0, "none", 100) == 1.0 and kl_weight(7, "sigmoid", 0) == 1.0
    with pytest.raises(ConfigError, match="KL schedule"):
        kl_weight(0, "cosine", 10)


def _model(word_dropout: float = 0.0) -> TextVAE:
    torch.manual_seed(0)
    return TextVAE(TextVAEConfig(vocab_size=20, n_embd=8, n_hidden=12, z_dim=3, word_dropout=word_dropout, unk_id=3))


def test_objective_is_reconstruction_plus_weighted_kl() -> None:
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = (torch.arange(4) < torch.tensor([[4], [2]])).long()
    src, lengths, dec_in, _, target = vae_batch(ids, mask, bos_id=1, eos_id=2)
    assert lengths.tolist() == [4, 2] and dec_in[:, 0].tolist() == [1, 1]
    assert target.tolist() == [[5, 6, 7, 8, 2], [9, 10, 2, -100, -100]]
    model = _model().eval()
    out = {}
    for beta in (0.0, 0.3, 1.0):
        torch.manual_seed(1)  # the same draw of z for each beta
        out[beta] = vae_loss(model, (src, lengths, dec_in, beta, target))
    torch.manual_seed(1)
    logits, mu, logvar = model(src, lengths, dec_in)
    rec, kl = reconstruction_nll(logits, target).sum(), gaussian_kl(mu, logvar).sum()
    for beta, o in out.items():
        torch.testing.assert_close(o.loss_sum, rec + beta * kl)
    assert out[1.0].n_targets == 2 and out[1.0].n_tokens == 6


def test_word_dropout_replaces_inputs_by_unk_only_while_training() -> None:
    model = _model(word_dropout=0.5)
    dec_in = torch.randint(4, 20, (50, 10))
    dec_in[:, 0] = 1
    dropped = model.drop_words(dec_in)
    changed = dropped != dec_in
    assert bool((dropped[changed] == 3).all()) and not bool(changed[:, 0].any())
    assert 0.4 < changed[:, 1:].float().mean().item() < 0.6
    assert torch.equal(model.eval().drop_words(dec_in), dec_in)


def test_active_units_count_dimensions_that_vary() -> None:
    mu = torch.zeros(100, 4)
    mu[:, 1] = torch.linspace(-1, 1, 100)  # varies: active
    mu[:, 2] = 0.05 * torch.linspace(-1, 1, 100)  # variance about 8.5e-4: inactive
    assert active_units(mu) == 1


def test_sentences_of_english_and_chinese_text() -> None:
    en = "COUNTESS.\nWhy not a mother? When I said a mother,\nMethought you saw a serpent.\n\n[Exit.]\n\nGo!"
    assert list(english_sentences(en)) == ["why not a mother ?", "when i said a mother , methought you saw a serpent .",
                                           "go !"]
    assert list(chinese_sentences("我们是中国人。 你 好！\n天气")) == ["我们是中国人。", "你好！", "天气"]
    assert short_sentences([en], "en", 3, 5) == ["why not a mother ?"]
    assert normalise_sentence("On's  OWN eyes!", "en") == "on ' s own eyes !"


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory, sample_text: str) -> Path:
    path = tmp_path_factory.mktemp("vae") / "plays.txt"
    path.write_text(sample_text[:60_000], encoding="utf-8")
    return path


def _train(corpus: Path, out: Path, max_steps: int, resume: bool = False, **kw) -> object:
    train = TrainConfig(max_steps=max_steps, eval_every=kw.pop("eval_every", 0), log_every=1, ckpt_every=4,
                        device="cpu", precision="fp32", tensorboard=False, seed=0, decay_steps=kw.pop("decay", None))
    return train_vae(str(corpus), out, model="vae-tiny", kl_anneal_steps=6, batch_size=8, eval_sentences=64,
                     lr=kw.pop("lr", 3e-3), resume=resume, train=train, **kw)


def _losses(run: Path) -> list[float]:
    return [r["train_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "train_loss" in r]


def test_elbo_improves(corpus_file: Path, tmp_path: Path) -> None:
    res = _train(corpus_file, tmp_path / "run", 40, eval_every=20, lr=1e-2)
    evals = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if "val_elbo" in r]
    assert len(evals) == 2 and evals[1]["val_elbo"] > evals[0]["val_elbo"] + 1.0
    v = res.val
    assert v["val_elbo"] == pytest.approx(-(v["val_rec"] + v["val_kl"])) and v["val_kl"] >= 0
    assert v["val_loss"] == -v["val_elbo"] and 0 <= v["val_active_units"] <= 8


def test_resume_is_exact(corpus_file: Path, tmp_path: Path) -> None:
    _train(corpus_file, tmp_path / "a", 10)
    _train(corpus_file, tmp_path / "b", 4, decay=10)
    _train(corpus_file, tmp_path / "b", 10, resume=True)
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b") and len(_losses(tmp_path / "a")) == 10
    a, b = (load_file(str(tmp_path / r / "model.safetensors")) for r in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="already holds a run"):
        _train(corpus_file, tmp_path / "a", 10)


def test_load_sample_reconstruct_interpolate(corpus_file: Path, tmp_path: Path, capsys) -> None:
    _train(corpus_file, tmp_path / "run", 6)
    vae = zenlm.load(tmp_path / "run", device="cpu")
    assert isinstance(vae, SentenceVAE) and vae.lang == "en"
    assert vae.encode(["i will not hurt him .", "go !"]).shape == (2, 8)
    s = vae.sample(3, seed=0)
    assert len(s) == 3 and s == vae.sample(3, seed=0) and all(isinstance(x, str) for x in s)
    a, b = "I will not hurt him.", "come hither , sir ."
    line = vae.interpolate(a, b, steps=4)
    assert len(line) == 4 and [line[0], line[-1]] == vae.reconstruct([a, b])
    assert main(["vae", "sample", str(tmp_path / "run"), "--num", "2", "--seed", "1", "--device", "cpu"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
    assert main(["vae", "interpolate", str(tmp_path / "run"), a, b, "--steps", "3", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("0.50  ")
    assert main(["vae", "sample", str(corpus_file.parent), "--device", "cpu"]) == 2  # not a run: a clean error
