"""The encoder-decoder model: config, presets, caches, padding, embeddings sharing, rebuild from config.yaml."""

from __future__ import annotations

import pytest
import torch
import yaml

from zenlm.errors import ConfigError
from zenlm.models.encdec import ENCDEC_PRESETS, EncDecConfig, EncoderDecoder, get_encdec_preset
from zenlm.models.registry import config_from_dict
from zenlm.rundir import build_model_from_run


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(**kw) -> EncoderDecoder:
    torch.manual_seed(0)
    return EncoderDecoder(get_encdec_preset("encdec-tiny", vocab_size=50, **kw)).eval()


@pytest.mark.parametrize("kw", [dict(pos="learned"), dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False)])
def test_kv_cached_decoding_equals_uncached(kw):
    model = _model(**kw)
    src = torch.randint(0, 50, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 6:] = False
    tgt = torch.randint(0, 50, (3, 7))
    with torch.no_grad():
        full = model(src, tgt, mask)
        memory = model.encode(src, mask)
        cache = model.make_cache(memory, mask)
        parts = [model.decode(tgt[:, :3], cache=cache)]  # prefill 3 positions, then one at a time
        parts += [model.decode(tgt[:, t : t + 1], cache=cache) for t in range(3, 6)]
        parts.append(model.decode(tgt[:, 6:7], cache=cache, last_only=True))
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-4)
    assert cache.pos == 7


def test_padding_does_not_change_the_output():
    model = _model()
    src = torch.randint(3, 50, (1, 5))
    tgt = torch.randint(3, 50, (1, 4))
    padded = torch.cat([src, torch.full((1, 3), 7)], dim=1)
    mask = torch.tensor([[True] * 5 + [False] * 3])
    with torch.no_grad():
        torch.testing.assert_close(model(padded, tgt, mask), model(src, tgt), atol=1e-5, rtol=1e-4)


def test_decoder_is_causal_and_reads_the_source():
    model = _model()
    src = torch.randint(0, 50, (1, 6))
    tgt = torch.randint(0, 50, (1, 5))
    with torch.no_grad():
        base = model(src, tgt)
        later = tgt.clone()
        later[0, 4] = (later[0, 4] + 1) % 50
        torch.testing.assert_close(model(src, later)[:, :4], base[:, :4])  # the future is not seen
        other = (src + 1) % 50
        assert not torch.allclose(model(other, tgt), base)  # the source matters


def test_cache_reorder_follows_rows():
    model = _model()
    src = torch.randint(0, 50, (2, 5))
    tgt = torch.randint(0, 50, (2, 3))
    with torch.no_grad():
        memory = model.encode(src)
        cache = model.make_cache(memory)
        model.decode(tgt[:, :2], cache=cache)
        cache.reorder(torch.tensor([1, 1]))
        got = model.decode(tgt[[1, 1], 2:3], cache=cache)
        want = model(src[[1, 1]], tgt[[1, 1]])[:, 2:3]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_shared_and_separate_embeddings():
    shared = _model()
    separate = _model(share_embeddings=False, tie_embeddings=False)
    V, C = 50, 64
    assert shared.src_emb is None and shared.lm_head is None
    assert separate.num_params() - shared.num_params() == 2 * V * C
    loss = separate(torch.randint(0, V, (2, 4)), torch.randint(0, V, (2, 3))).sum()
    loss.backward()
    assert separate.src_emb.weight.grad is not None and separate.lm_head.weight.grad is not None


def test_config_validation_and_presets():
    for name in ENCDEC_PRESETS:
        cfg = get_encdec_preset(name, vocab_size=1000)
        assert cfg.mlp_hidden and cfg.n_embd % cfg.n_head == 0
    assert get_encdec_preset("t5-small", vocab_size=32128).n_embd == 512
    with pytest.raises(ConfigError, match="unknown encoder-decoder preset"):
        get_encdec_preset("nope")
    with pytest.raises(ConfigError, match="unknown model settings"):
        get_encdec_preset("encdec-tiny", n_layers=3)
    with pytest.raises(ConfigError):
        EncDecConfig(n_embd=65, n_head=2)
    with pytest.raises(ConfigError):
        EncDecConfig(pos="none")  # cross-attention has no positions, so the stacks need their own
    with pytest.raises(ConfigError):
        EncDecConfig(n_enc_layer=0)


def test_over_long_inputs_are_refused():
    model = _model()
    with pytest.raises(ConfigError, match="max_source_len"):
        model.encode(torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(ConfigError, match="max_target_len"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 65, dtype=torch.long))
    cache = model.make_cache(model.encode(torch.zeros(1, 4, dtype=torch.long)), max_len=2)
    model.decode(torch.zeros(1, 2, dtype=torch.long), cache=cache)
    with pytest.raises(ConfigError, match="overflow"):
        model.decode(torch.zeros(1, 1, dtype=torch.long), cache=cache)


def test_config_yaml_rebuilds_the_model(tmp_path):
    cfg = get_encdec_preset("encdec-tiny", vocab_size=77, pos="rope")
    again = config_from_dict(cfg.to_dict())
    assert again == cfg
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": cfg.to_dict()}))
    model, rebuilt, _ = build_model_from_run(tmp_path)
    assert isinstance(model, EncoderDecoder) and rebuilt == cfg
    with pytest.raises(ConfigError, match="unknown EncDecConfig fields"):
        config_from_dict({**cfg.to_dict(), "n_layer": 3})
