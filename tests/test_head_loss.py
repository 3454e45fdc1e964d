"""The chunked output head + cross-entropy (zenlm.train.head_loss) gives the unchunked loss and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zenlm.config import GPTConfig
from zenlm.data.batches import IGNORE_INDEX
from zenlm.models.gpt import GPT
from zenlm.models.lora import LoRAConfig, apply_lora
from zenlm.train.head_loss import head_cross_entropy, head_matrix, next_token_loss

V = 300


def _model(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=V, n_layer=1, n_head=2, n_embd=32, block_size=32, **kw))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (3, 24), generator=g)
    y = torch.randint(0, V, (3, 24), generator=g)
    y[0, :9] = IGNORE_INDEX  # a prompt that is not scored
    y[2, 20:] = IGNORE_INDEX  # padding
    return x, y


def _loss_and_grads(model: torch.nn.Module, fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = fn()
    (loss / 7).backward()  # the training step divides by the step's target count
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kw", [{}, {"tie_embeddings": False, "logit_softcap": 5.0}], ids=["tied", "untied+softcap"])
def test_chunked_loss_and_gradients_equal_the_unchunked_ones(kw) -> None:
    model = _model(**kw)
    x, y = _batch()

    def plain() -> torch.Tensor:
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")

    def chunked() -> torch.Tensor:
        h, t = model.features(x).flatten(0, 1), y.flatten()
        keep = (t != IGNORE_INDEX).nonzero()[:, 0]
        return head_cross_entropy(model, h[keep], t[keep], chunk_elements=7 * V)  # 7 rows per chunk

    ref, ref_grads = _loss_and_grads(model, plain)
    got, grads = _loss_and_grads(model, chunked)
    torch.testing.assert_close(got, ref)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=name)


def test_next_token_loss_scores_only_the_labelled_positions() -> None:
    model = _model()
    x, y = _batch()
    ref = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    torch.testing.assert_close(next_token_loss(model, x, y), ref)
    y_all = y.clamp_min(0)
    ref_all = F.cross_entropy(model(x).flatten(0, 1), y_all.flatten(), reduction="sum")
    torch.testing.assert_close(next_token_loss(model, x, y_all, masked=False), ref_all)


def test_a_lora_head_goes_through_checkpointed_chunks_with_the_same_gradients() -> None:
    model = _model(tie_embeddings=False)
    apply_lora(model, LoRAConfig(rank=2, targets=("lm_head", "attn")))
    for p in model.parameters():  # B starts at zero: give the adapters values so their gradients are not trivial
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    assert head_matrix(model) is None
    x, y = _batch()
    t = y.flatten()
    keep = (t != IGNORE_INDEX).nonzero()[:, 0]

    def plain() -> torch.Tensor:
        return F.cross_entropy(model(x).flatten(0, 1)[keep], t[keep], reduction="sum")

    def chunked() -> torch.Tensor:
        return head_cross_entropy(model, model.features(x).flatten(0, 1)[keep], t[keep], chunk_elements=5 * V)

    ref, ref_grads = _loss_and_grads(model, plain)
    got, grads = _loss_and_grads(model, chunked)
    torch.testing.assert_close(got, ref)
    assert ref_grads and grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=name)


def test_frozen_head_gets_no_gradient_and_bf16_autocast_stays_close(monkeypatch) -> None:
    monkeypatch.setattr("zenlm.train.head_loss.CHUNK_ELEMENTS", 4 * V)  # chunks of 4 rows
    model = _model()
    model.tok_emb.weight.requires_grad_(False)  # as under LoRA: the tied head is frozen
    x, y = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX,
                              reduction="sum")
        got = next_token_loss(model, x, y)
    got.backward()
    assert model.tok_emb.weight.grad is None
    assert model.blocks[0].attn.qkv.weight.grad is not None
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=0.0)
    with torch.no_grad():  # evaluation: the loss only
        torch.testing.assert_close(next_token_loss(model, x, y), F.cross_entropy(
            model(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"))
