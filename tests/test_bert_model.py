"""The BERT encoder itself: config checks, presets, parameter count, padding, heads, rebuilding from a dict."""

import pytest
import torch

from zenlm.errors import ConfigError
from zenlm.models.bert import BERT_PRESETS, Bert, BertConfig, get_bert_preset
from zenlm.models.registry import config_from_dict


@pytest.mark.parametrize("name", list(BERT_PRESETS))
def test_presets_count_their_parameters(name: str) -> None:
    cfg = get_bert_preset(name, vocab_size=1000)
    with torch.device("meta"):
        model = Bert(cfg)
    assert model.num_params() == cfg.num_params()
    assert config_from_dict(cfg.to_dict()) == cfg


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="divisible"):
        BertConfig(d_model=30, n_head=4)
    with pytest.raises(ConfigError, match="dropout"):
        BertConfig(dropout=1.0)
    with pytest.raises(ConfigError, match="unknown BERT preset"):
        get_bert_preset("bert-huge")
    with pytest.raises(ConfigError, match="unknown model settings"):
        get_bert_preset("bert-tiny", n_embd=64)
    with pytest.raises(ConfigError, match="unknown BertConfig fields"):
        config_from_dict({"arch": "bert", "width": 3})


def test_padding_does_not_change_real_positions_and_heads_have_their_shapes() -> None:
    torch.manual_seed(0)
    model = Bert(get_bert_preset("bert-tiny", vocab_size=100, d_model=32, n_head=4, d_ff=64, max_len=16)).eval()
    ids = torch.tensor([[2, 10, 11, 12, 3], [2, 20, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        h = model(ids, mask)
        alone = model(ids[1:, :3], mask[1:, :3])
        torch.testing.assert_close(h[1, :3], alone[0], atol=1e-5, rtol=1e-5)
        assert model.mlm_logits(h).shape == (2, 5, 100) and model.pool(h).shape == (2, 32)
        e = model.embed(ids, mask)
        torch.testing.assert_close(e.norm(dim=-1), torch.ones(2))
        torch.testing.assert_close(model.embed(ids, mask, normalize=False)[1], h[1, :3].mean(0))
    with pytest.raises(ConfigError, match="max_len"):
        model(torch.zeros(1, 17, dtype=torch.long))
