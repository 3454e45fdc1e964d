"""zenlm.scoring: token scores read from one log-softmax, worked through a block of rows at a time, and the head
applied a piece of positions at a time."""

from __future__ import annotations

import weakref

import torch

import zenlm.scoring
from zenlm.scoring import map_logits, score_tokens


def test_scores_are_the_same_bits_whatever_the_block_of_rows(monkeypatch):
    torch.manual_seed(0)
    logits_TV = torch.randn(10, 50) * 4
    logits_TV[3, 7] = float("-inf")  # a token the model rules out
    targets_T = torch.randint(0, 50, (10,))
    targets_T[3] = 7
    whole = zenlm.scoring._score_block(logits_TV, targets_T, 4)  # every row in one go
    monkeypatch.setattr(zenlm.scoring, "SCORE_BLOCK", 3 * 50)  # blocks of 3 rows: 3 + 3 + 3 + 1
    blocks = score_tokens(logits_TV, targets_T, 4)
    for got, want in zip(blocks, whole, strict=True):
        assert torch.equal(got, want)
    assert blocks.logprob_T.shape == (10,) and blocks.top_logprob_TK.shape == (10, 4)
    assert blocks.logprob_T[3] == float("-inf")
    # the check the scores promise: a token that is the most likely one has exactly the best top value
    best = blocks.greedy_T
    assert torch.equal(blocks.logprob_T[best], blocks.top_logprob_TK[best, 0])
    want_lp = torch.log_softmax(logits_TV, -1).gather(-1, targets_T[:, None])[:, 0]
    torch.testing.assert_close(blocks.logprob_T, want_lp)
    assert score_tokens(logits_TV, targets_T).top_id_TK.shape == (10, 0)


def test_map_logits_holds_one_piece_at_a_time(monkeypatch):
    """Pieces of at most SCORING_LOGITS logits, in order; each is let go before the next is made."""
    monkeypatch.setattr(zenlm.scoring, "SCORING_LOGITS", 4 * 6)
    w_VC = torch.randn(6, 5)
    h_NC = torch.randn(10, 5)
    alive: list[int] = []
    made: list[object] = []

    def head(x_1nC: torch.Tensor) -> torch.Tensor:
        alive.append(sum(r() is not None for r in made))  # earlier pieces still referenced somewhere
        out = x_1nC @ w_VC.T
        made.append(weakref.ref(out))
        return out

    pieces = map_logits(head, h_NC, 6, lambda rows, logits: (rows, logits.sum(-1)))
    assert [(r.start, r.stop) for r, _ in pieces] == [(0, 4), (4, 8), (8, 12)]
    torch.testing.assert_close(torch.cat([s for _, s in pieces]), (h_NC @ w_VC.T).sum(-1))
    assert alive == [0, 0, 0]
