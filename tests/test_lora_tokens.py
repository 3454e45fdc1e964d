"""Trainable token rows beside LoRA (zenlm.models.lora.TokenRows / TokenRowsHead, PEFT's trainable_token_indices):
the exact no-op start, what the rows replace in the embedding and in the head, that only the chosen rows learn,
merging, an int8 base, the chunked head loss, and the chat recipe's default (the end-of-turn token's rows)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zenlm.errors import ConfigError
from zenlm.models.bert import Bert, get_bert_preset
from zenlm.models.gpt import GPT
from zenlm.models.int8 import quantize_int8
from zenlm.models.lora import (
    LoRAConfig,
    TokenRows,
    TokenRowsHead,
    adapter_state_dict,
    apply_lora,
    has_lora,
    merge_and_unload,
)
from zenlm.presets import get_preset
from zenlm.train.head_loss import head_cross_entropy

V = 96
IDS = (1, 7, 40)


def _gpt(tied: bool, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(get_preset("llama-tiny", vocab_size=V, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, block_size=32,
                          tie_embeddings=tied)).eval()


def _ids(seed: int = 0, shape: tuple[int, int] = (2, 12)) -> torch.Tensor:
    x = torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))
    x[:, ::3] = IDS[seed % len(IDS)]  # the chosen tokens occur in the input
    return x


def _randomise(model: torch.nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("tied", [True, False])
def test_token_rows_start_as_a_no_op_and_replace_exactly_their_rows(tied: bool) -> None:
    model = _gpt(tied)
    x = _ids()
    with torch.no_grad():
        before = model(x)
    apply_lora(model, LoRAConfig(rank=2, targets=("attn",), tokens=IDS))
    assert isinstance(model.tok_emb, TokenRows) and isinstance(model.lm_head, TokenRowsHead)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)  # rows start as copies (equal up to the order of sums)
    trained = adapter_state_dict(model)
    assert "tok_emb.rows" in trained and ("lm_head.rows" in trained) is (not tied)
    assert trained["tok_emb.rows"].shape == (len(IDS), 32)
    _randomise(model)
    rows = model.tok_emb.rows
    with torch.no_grad():
        emb = model.tok_emb(x)
        base = model.tok_emb.base(x)
        for k, i in enumerate(IDS):
            hit = x == i
            torch.testing.assert_close(emb[hit], rows[k].expand(int(hit.sum()), -1))
        other = ~torch.isin(x, torch.tensor(IDS))
        torch.testing.assert_close(emb[other], base[other], rtol=0, atol=0)
        h = torch.randn(5, 32)
        z = model.lm_head(h)
        head_rows = rows if tied else model.lm_head.rows
        torch.testing.assert_close(z[:, list(IDS)], h @ head_rows.T)
        base_w = model.tok_emb.base.weight if tied else model.lm_head.base.weight
        keep = [v for v in range(V) if v not in IDS]
        torch.testing.assert_close(z[:, keep], (h @ base_w.T)[:, keep])


@pytest.mark.parametrize("tied", [True, False])
def test_only_the_chosen_rows_get_gradients_through_the_chunked_head_loss(tied: bool) -> None:
    model = _gpt(tied)
    apply_lora(model, LoRAConfig(rank=2, targets=("mlp",), tokens=IDS))
    _randomise(model)
    model.train()
    x = _ids(1)
    h = model.features(x).flatten(0, 1)
    y = x.roll(-1, dims=1).flatten()
    # chunks of 4 rows (the checkpointed path a head that is not one plain matrix takes) equal one chunk
    loss = head_cross_entropy(model, h, y, chunk_elements=4 * V)
    ref = F.cross_entropy(model.head(h), y, reduction="sum")
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert model.tok_emb.base.weight.grad is None  # the table itself stays frozen
    assert model.tok_emb.rows.grad is not None and model.tok_emb.rows.grad.abs().sum() > 0
    if not tied:
        assert model.lm_head.base.weight.grad is None and model.lm_head.rows.grad.abs().sum() > 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or n.endswith(".rows") for n in trainable)


@pytest.mark.parametrize("tied", [True, False])
def test_merge_and_unload_equals_the_unmerged_model(tied: bool) -> None:
    model = _gpt(tied)
    apply_lora(model, LoRAConfig(rank=2, tokens=IDS))
    _randomise(model)
    x = _ids(2)
    with torch.no_grad():
        unmerged = model(x)
        merge_and_unload(model)
        assert not has_lora(model)
        assert type(model.tok_emb) is torch.nn.Embedding and (model.lm_head is None) is tied
        torch.testing.assert_close(model(x), unmerged, rtol=1e-4, atol=1e-4)  # B A folded in: another rounding


def test_token_rows_on_a_frozen_int8_base_tied_to_its_head() -> None:
    model = quantize_int8(_gpt(tied=True))
    x = _ids()
    with torch.no_grad():
        before = model(x)
    apply_lora(model, LoRAConfig(rank=2, tokens=IDS))
    assert model.lm_head.tied  # the int8 head shares the int8 table: one set of rows
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)
    assert set(adapter_state_dict(model)) >= {"tok_emb.rows"} and "lm_head.rows" not in adapter_state_dict(model)
    _randomise(model)
    loss = F.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten())
    loss.backward()
    assert model.tok_emb.rows.grad.abs().sum() > 0
    with torch.no_grad():
        unmerged = model(x)
        merge_and_unload(model)
        assert model.lm_head is None  # a float tied model again
        torch.testing.assert_close(model(x), unmerged, rtol=1e-4, atol=1e-4)


def test_token_settings_are_checked() -> None:
    assert LoRAConfig().tokens == ("auto",) and LoRAConfig().token_ids == ()
    assert LoRAConfig(tokens="1, 7").token_ids == (1, 7)
    assert LoRAConfig(tokens=("none",)).token_ids == ()
    with pytest.raises(ConfigError, match="token strings"):
        _ = LoRAConfig(tokens=("<|eos|>",)).token_ids
    with pytest.raises(ConfigError, match="stand alone"):
        LoRAConfig(tokens=("auto", "3"))
    with pytest.raises(ConfigError, match="not ids of this 96-row embedding"):
        apply_lora(_gpt(True), LoRAConfig(rank=2, tokens=(V + 3,)))
    bert = Bert(get_bert_preset("bert-tiny", vocab_size=V, d_model=16, n_head=2, d_ff=32, max_len=16))
    with pytest.raises(ConfigError, match="decoder-only language models.*--lora-tokens none"):
        apply_lora(bert, LoRAConfig(rank=2, tokens=(3,)))
    with pytest.raises(ConfigError, match="carries a LoRA adapter already"):
        apply_lora(_gpt(False), LoRAConfig(rank=2, targets=("lm_head",), tokens=(3,)))


def test_with_tokens_reads_token_strings_and_auto(bpe_tok) -> None:  # noqa: ANN001 - the session tokenizer
    eos = bpe_tok.eos_id
    assert LoRAConfig(tokens=("<|eos|>", "5")).with_tokens(bpe_tok).tokens == (eos, 5)
    assert LoRAConfig().with_tokens(bpe_tok, auto=[eos]).tokens == (eos,)
    assert LoRAConfig(tokens=("none",)).with_tokens(bpe_tok, auto=[eos]).tokens == ()
    with pytest.raises(ConfigError, match="not one token of this tokenizer"):
        LoRAConfig(tokens=("no such token",)).with_tokens(bpe_tok)


def test_the_lora_tokens_flag(capsys) -> None:  # noqa: ANN001
    from zenlm.cli import main
    from zenlm.cli.common import lora_config

    flags = {"lora": True, "lora_rank": 8, "lora_alpha": 16.0, "lora_dropout": 0.0, "lora_targets": ["all"],
             "lora_qkv": "auto", "lora_tokens": ["<|eos|>", "5"]}
    assert lora_config(dict(flags)).tokens == ("<|eos|>", 5)
    with pytest.raises(ConfigError, match="--lora-tokens set"):
        lora_config({**flags, "lora": None, "lora_tokens": ["none"]})
    try:
        rc = main(["finetune", "chat", "--help"])
    except SystemExit as e:  # argparse's help exits
        rc = e.code
    assert rc == 0 and "--lora-tokens" in capsys.readouterr().out
