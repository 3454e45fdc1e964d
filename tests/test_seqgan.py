"""SeqGAN: the BLEU scores of free generation, the policy (LSTM and GPT stepping), roll-out rewards, the two
players' losses on a toy task, the experiment's exact resume, and the verb."""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path

import pytest
import sacrebleu
import torch
from safetensors.torch import load_file

from zenlm.cli import main
from zenlm.config import GPTConfig
from zenlm.evaluate import reference_set_bleu, self_bleu
from zenlm.models.gan import (
    CNNDiscriminator,
    CNNDiscriminatorConfig,
    complete,
    rollout_rewards,
    sample_sequences,
)
from zenlm.models.gpt import GPT
from zenlm.models.rnn import RNNLM, RNNLMConfig
from zenlm.progress import Progress
from zenlm.recipes.seqgan import (
    SeqGANSettings,
    discriminator_loss,
    pack_sentences,
    policy_gradient_loss,
    scored_positions,
    train_seqgan,
    verdict,
)
from zenlm.train.loop import TrainConfig


def _sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice("a b c d e f".split()) for _ in range(rng.randint(3, 9))) for _ in range(n)]


def test_reference_set_bleu_and_self_bleu_equal_sacrebleu() -> None:
    hyps, refs = _sentences(5, 0), _sentences(6, 1)
    ref_streams = [[r] * len(hyps) for r in refs]  # every hypothesis against every reference
    assert reference_set_bleu(hyps, refs, "en") == pytest.approx(
        sacrebleu.corpus_bleu(hyps, ref_streams, tokenize="none").score, abs=1e-9)
    texts = _sentences(7, 2) + ["q q q"]  # a sentence without any shared n-gram: smoothing is exercised
    n = len(texts)
    others = [[texts[(i + j + 1) % n] for i in range(n)] for j in range(n - 1)]  # text i against all the others
    assert self_bleu(texts, "en") == pytest.approx(sacrebleu.corpus_bleu(texts, others, tokenize="none").score,
                                                   abs=1e-9)
    assert self_bleu(["a b c d e", "a b c d e"], "en") == pytest.approx(100.0)
    assert reference_set_bleu(["我们是中国人"], ["我们是人"], "zh") > 0  # characters are the words


@pytest.mark.parametrize("kind", ["lstm", "gpt"])
def test_policy_stepping_equals_the_full_forward(kind: str) -> None:
    """complete() runs the LM one token at a time (LSTM state / GPT KV cache); greedily it must pick what the full
    forward pass over the growing sequence picks."""
    torch.manual_seed(0)
    lm = RNNLM(RNNLMConfig(vocab_size=11, n_embd=8, n_hidden=8, n_layer=2)) if kind == "lstm" else \
        GPT(GPTConfig(vocab_size=11, block_size=9, n_layer=2, n_head=2, n_embd=16))
    lm.eval()
    prefix = torch.tensor([[0, 3, 4], [0, 5, 6]])
    seq = prefix.clone()
    with torch.no_grad():
        for _ in range(9 - 2):
            logits = lm(seq)
            logits = logits[0] if isinstance(logits, tuple) else logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
        got = complete(lm, prefix, 9, temperature=0.0)
    assert torch.equal(got, seq[:, 1:])
    drawn = sample_sequences(lm, 4, 9, 0, generator=torch.Generator().manual_seed(1))
    assert drawn.shape == (4, 9) and torch.equal(drawn, sample_sequences(lm, 4, 9, 0,
                                                                         generator=torch.Generator().manual_seed(1)))


def test_padding_after_the_end_and_rewards() -> None:
    seqs = torch.tensor([[5, 2, 7, 7], [5, 5, 5, 2]])
    assert scored_positions(seqs, 2).tolist() == [[True, True, False, False], [True, True, True, True]]
    assert pack_sentences([[4, 5, 6, 7, 8], [4]], 4, end_id=2, pad_id=0).tolist() == [[4, 5, 6, 2], [4, 2, 0, 0]]
    torch.manual_seed(0)
    lm = RNNLM(RNNLMConfig(vocab_size=8, n_embd=8, n_hidden=8, n_layer=1))
    ended = complete(lm, torch.tensor([[1, 2]]).repeat(3, 1), 6, end_id=2, pad_id=0)
    assert ended[:, 0].tolist() == [2, 2, 2] and (ended[:, 1:] == 0).all()  # nothing after <eos>
    d = CNNDiscriminator(CNNDiscriminatorConfig(vocab_size=8, n_embd=8, widths=[2, 3], filters=[4, 4])).eval()
    seqs = sample_sequences(lm, 5, 6, 1, generator=torch.Generator().manual_seed(0))
    q = rollout_rewards(lm, d, seqs, 1, 3, generator=torch.Generator().manual_seed(0))
    assert q.shape == (5, 6) and bool(((q > 0) & (q < 1)).all())
    torch.testing.assert_close(q[:, -1], torch.sigmoid(d(seqs)))  # the last word: D of the sentence itself


def test_both_players_move_as_the_objective_says() -> None:
    """Toy game: real sentences use only the tokens 1 and 2. D steps lower D's loss; then, D fixed, policy-gradient
    steps raise G's expected reward E[D(Y)] (the same thing as raising D's loss on fresh samples)."""
    torch.manual_seed(0)
    V, T, B = 6, 6, 32
    lm = RNNLM(RNNLMConfig(vocab_size=V, n_embd=16, n_hidden=16, n_layer=1))
    d = CNNDiscriminator(CNNDiscriminatorConfig(vocab_size=V, n_embd=16, widths=[2, 3], filters=[16, 16], dropout=0.0))
    gen = torch.Generator().manual_seed(0)

    def real() -> torch.Tensor:
        return torch.randint(1, 3, (B, T), generator=gen)

    def fake() -> torch.Tensor:
        return sample_sequences(lm, B, T, 0, generator=gen)

    def d_loss() -> float:
        with torch.no_grad():
            return discriminator_loss(d, real(), fake()).loss_sum.item() / (2 * B)

    def reward() -> float:
        with torch.no_grad():
            return torch.sigmoid(d(sample_sequences(lm, 256, T, 0, generator=torch.Generator().manual_seed(5)))).mean().item()

    opt_d = torch.optim.Adam(d.parameters(), lr=1e-2)
    before = d_loss()
    for _ in range(40):
        opt_d.zero_grad()
        out = discriminator_loss(d, real(), fake())
        (out.loss_sum / out.n_targets).backward()
        opt_d.step()
    after_d = d_loss()
    assert after_d < 0.5 * before  # D learns to tell them apart

    d.eval()
    opt_g = torch.optim.Adam(lm.parameters(), lr=1e-2)
    reward_before = reward()
    for _ in range(25):
        y = fake()
        q = rollout_rewards(lm, d, y, 0, 4, generator=gen)
        opt_g.zero_grad()
        out = policy_gradient_loss(lm, y, q, 0, None)
        (out.loss_sum / out.n_targets).backward()
        opt_g.step()
    assert reward() > reward_before + 0.1  # G learns to fool the fixed D
    assert d_loss() > after_d  # so D's loss rises again: the min-max


def test_verdict_names_the_winner() -> None:
    # lower temperatures: better samples (oracle NLL), worse coverage (NLL-test)
    rows = [{"model": "mle", "temperature": t, "oracle_nll": 3 + t, "nll_test": 4 - t} for t in (0.8, 1.0)]
    gan = {"model": "seqgan", "temperature": 1.0, "oracle_nll": 3.9, "nll_test": 3.3}
    assert verdict([*rows, gan], oracle=True).startswith("MLE wins: at temperature 0.8")
    assert verdict([*rows, {**gan, "nll_test": 3.1}], oracle=True).startswith("SeqGAN wins")


_TINY = dict(oracle_vocab=30, oracle_hidden=8, n_train=200, n_test=40, seq_len=8, g_embd=8, g_hidden=8, d_embd=8,
             d_filters=4, batch_size=8, mle_steps=6, d_pretrain_steps=2, adv_rounds=2, g_steps=1, d_steps=1,
             rollouts=2, eval_samples=20, temperatures=[0.8])


def _train(out: Path, interrupt_at: int | None = None, resume: bool = False):
    stage = {"gan": False}

    def progress(p: Progress) -> None:
        if p.message and p.message.startswith("stage 2/2"):
            stage["gan"] = True
        if interrupt_at is not None and stage["gan"] and p.info and p.info.get("step") == interrupt_at:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C in the middle of the adversarial stage

    train = TrainConfig(eval_every=3, log_every=1, ckpt_every=2, device="cpu", precision="fp32", tensorboard=False,
                        seed=3)
    return train_seqgan(out, settings=SeqGANSettings(**_TINY), resume=resume, train=train, progress=progress)


def _losses(run: Path) -> list[float]:
    return [r["train_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "train_loss" in r]


def test_experiment_resumes_exactly(tmp_path: Path) -> None:
    whole = _train(tmp_path / "a")
    assert not whole.stopped and len(whole.rows) == 4 and whole.verdict
    assert whole.gan["steps"] == 2 + 2 * 2 and "val_d_acc" in whole.gan["val"]
    stopped = _train(tmp_path / "b", interrupt_at=3)
    assert stopped.stopped and (tmp_path / "b" / "mle" / "done.json").is_file()
    assert not (tmp_path / "b" / "gan" / "done.json").exists()
    resumed = _train(tmp_path / "b", resume=True)
    assert not resumed.stopped and resumed.rows == whole.rows
    for stage in ("mle", "gan"):
        assert _losses(tmp_path / "a" / stage) == _losses(tmp_path / "b" / stage)
    a, b = (load_file(str(tmp_path / r / "gan" / "model.safetensors")) for r in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_real_text_verb(tmp_path: Path, sample_text: str, capsys) -> None:
    corpus = tmp_path / "plays.txt"
    corpus.write_text(sample_text[:30_000], encoding="utf-8")
    args = ["seqgan", "--out", str(tmp_path / "run"), "--data", str(corpus), "--seq-len", "10", "--n-train", "150",
            "--n-test", "30", "--vocab-size", "300", "--batch-size", "8", "--mle-steps", "4", "--d-pretrain-steps",
            "1", "--adv-rounds", "1", "--rollouts", "2", "--eval-samples", "10", "--temperatures", "0.7",
            "--eval-every", "0", "--device", "cpu", "--precision", "fp32"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "BLEU-4" in out and "self-BLEU-4" in out and ("MLE wins" in out or "SeqGAN wins" in out)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert {r["model"] for r in results["rows"]} == {"mle", "seqgan"}
    assert (tmp_path / "run" / "tokenizer.json").is_file()
