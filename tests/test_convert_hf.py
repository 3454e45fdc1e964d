"""Hugging Face interop: import GPT-2 / Llama-family checkpoints and export zenlm runs, with numerical parity.

Every reference model is a tiny random `transformers` model built from a config (no downloads), saved with
``save_pretrained`` next to a small tokenizer trained here, and converted with the same code the CLI uses.
"""

from __future__ import annotations

import json
import pickle
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import zenlm
from zenlm.cli import main
from zenlm.config import GPTConfig
from zenlm.convert.hf import export_hf, import_hf
from zenlm.errors import ConfigError, DataError
from zenlm.generate import GenerationConfig, generate_ids
from zenlm.models.gpt import GPT
from zenlm.tokenizer import Tokenizer, train_tokenizer
from zenlm.train.checkpoint import save_model

tf = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! "
        "Sphinx of black quartz, judge my vow. Ünïcödé façade, 中文文本 and 😀 emoji.\n") * 40
CHAT = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi!"}]
V = 384  # model vocabulary (the tokenizers below have fewer tokens: the model's table is padded)


# ------------------------------------------------------------------------------------------ fixtures


def _gpt2_tokenizer() -> tf.PreTrainedTokenizerFast:
    """A GPT-2 style byte-level BPE with <|endoftext|> as bos/eos/unk."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator([TEXT], trainers.BpeTrainer(
        vocab_size=320, special_tokens=[AddedToken("<|endoftext|>", special=True)], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    eot = "<|endoftext|>"
    return tf.PreTrainedTokenizerFast(tokenizer_object=hf, bos_token=eot, eos_token=eot, unk_token=eot)


def _llama_tokenizer() -> tf.PreTrainedTokenizerFast:
    """A Llama style BPE (SentencePiece-like: ▁ for spaces, byte fallback) with <s>, </s>, <unk> and a
    chat template (saved by transformers 5 as chat_template.jinja)."""
    from tokenizers import decoders, models, normalizers, trainers

    hf = tokenizers.Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    hf.train_from_iterator([TEXT], trainers.BpeTrainer(
        vocab_size=340, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=[f"<0x{i:02X}>" for i in range(256)]))
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=hf, bos_token="<s>", eos_token="</s>",
                                     unk_token="<unk>")
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
                         "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")
    return tok


LLAMA_COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=1,
                    eos_token_id=2)
HF_MODELS = {
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(
        vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)),
    "llama-gqa-untied": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
        **LLAMA_COMMON, num_key_value_heads=2, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
    "llama-tied-bias": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
        **LLAMA_COMMON, num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
    "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**LLAMA_COMMON, num_key_value_heads=2,
                                                          tie_word_embeddings=True)),
    "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**LLAMA_COMMON, num_key_value_heads=2, head_dim=8,
                                                          tie_word_embeddings=False)),
    "llama3-rope-scaling": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
        **LLAMA_COMMON, num_key_value_heads=2, tie_word_embeddings=True, rope_parameters={
            "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**LLAMA_COMMON, num_key_value_heads=2,
                                                                sliding_window=None)),
}


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Weights with enough spread that a wrong mapping (or a swapped norm gain) changes the argmax."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=g) if name.endswith("weight")
                        else 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


def _save_hf(name: str, root: Path) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = HF_MODELS[name]()
    _randomise(model, seed=len(name))
    model.eval()
    src = root / name
    model.save_pretrained(src)
    (_gpt2_tokenizer() if name == "gpt2" else _llama_tokenizer()).save_pretrained(src)
    return src, model


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, torch.nn.Module]]:
    root = tmp_path_factory.mktemp("hf")
    return {name: _save_hf(name, root) for name in HF_MODELS}


def _ids(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def _their_logits(hf_model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(x).logits.float()


TOL: dict = {}  # torch.testing.assert_close defaults for fp32: rtol 1.3e-6, atol 1e-5


# ------------------------------------------------------------------------------------------ import


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_import_logits_greedy_and_cache_match_transformers(hf_models, tmp_path: Path, name: str) -> None:
    src, hf_model = hf_models[name]
    run = import_hf(src, tmp_path / "run")
    lm = zenlm.load(run, device="cpu")
    model = lm.model
    x = _ids(2, 48)
    expected = _their_logits(hf_model, x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, **TOL)

    # greedy decoding, 20 new tokens, through both libraries' own generate
    prompt = x[:1, :8]
    hf_model.generation_config.eos_token_id = None  # never stop early: compare all 20 tokens
    with torch.no_grad():
        theirs = hf_model.generate(prompt, do_sample=False, max_new_tokens=20, pad_token_id=0)[0, 8:].tolist()
    ours = list(generate_ids(model, prompt[0].tolist(),
                             GenerationConfig(max_new_tokens=20, temperature=0.0, stop_at_eos=False)))
    assert ours == theirs and len(ours) == 20

    # KV-cache path: prefill 16, then one token at a time, against theirs with past_key_values
    with torch.no_grad():
        cache = model.make_cache(2)
        ours_steps = [model(x[:, :16], cache=cache)]
        out = hf_model(x[:, :16], use_cache=True)
        theirs_steps, past = [out.logits.float()], out.past_key_values
        for t in range(16, 28):
            ours_steps.append(model(x[:, t : t + 1], cache=cache))
            out = hf_model(x[:, t : t + 1], past_key_values=past, use_cache=True)
            theirs_steps.append(out.logits.float())
            past = out.past_key_values
    torch.testing.assert_close(torch.cat(ours_steps, 1), torch.cat(theirs_steps, 1), **TOL)
    torch.testing.assert_close(torch.cat(ours_steps, 1), expected[:, :28], **TOL)

    # exported again, transformers computes the same logits as the original model
    out = export_hf(run, tmp_path / "exported")
    again = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    expected_arch = "LlamaForCausalLM" if name.startswith(("llama", "mistral")) else type(hf_model).__name__
    assert type(again).__name__ == expected_arch
    torch.testing.assert_close(_their_logits(again, x), expected, **TOL)


def test_imported_tokenizer_keeps_ids_special_tokens_and_chat_template(hf_models, tmp_path: Path) -> None:
    for name, eos, with_template in [("gpt2", "<|endoftext|>", False), ("llama-gqa-untied", "</s>", True)]:
        src, _ = hf_models[name]
        run = import_hf(src, tmp_path / name)
        ours, theirs = Tokenizer.load(run), tf.AutoTokenizer.from_pretrained(src)
        sample = "Sphinx of black quartz, 中文 😀 judge my vow."
        assert ours.encode(sample) == theirs(sample, add_special_tokens=False).input_ids
        assert ours.decode(ours.encode(sample)) == theirs.decode(theirs(sample).input_ids)
        long = TEXT * 4  # longer than the pieces zenlm encodes long texts in
        assert ours.encode(long) == theirs(long, add_special_tokens=False).input_ids
        assert ours.eos_id == theirs.eos_token_id == theirs.convert_tokens_to_ids(eos)
        assert ours.bos_id == theirs.bos_token_id
        if with_template:  # transformers 5 keeps it in chat_template.jinja; zenlm inlines it
            assert ours.chat_template == theirs.chat_template and "[assistant]" in ours.chat_template
        gen = json.loads((run / "generation_config.json").read_text())
        assert gen["eos_token_id"] == theirs.eos_token_id
        # the run generates and stops at EOS like any zenlm run
        lm = zenlm.load(run, device="cpu")
        assert isinstance(lm.generate("The quick", max_new_tokens=5, temperature=0), str)


def test_special_tokens_come_from_the_model_config_when_the_tokenizer_config_names_none(
    hf_models, tmp_path: Path
) -> None:
    src = _copy(hf_models["gpt2"][0], tmp_path / "gpt2")  # like the original GPT-2 repository
    (src / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    tok = Tokenizer.load(import_hf(src, tmp_path / "run"))
    assert tok.eos_id == tok.bos_id == tok.token_to_id("<|endoftext|>") == 0


def test_mistral_sliding_window_caps_the_context(hf_models, tmp_path: Path) -> None:
    src, _ = hf_models["mistral"]
    cfg = json.loads((src / "config.json").read_text())
    cfg["sliding_window"] = 32
    src2 = _copy(src, tmp_path / "m")
    (src2 / "config.json").write_text(json.dumps(cfg))
    run = import_hf(src2, tmp_path / "run")
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["block_size"] == 32


def test_legacy_bin_imports_through_weights_only_and_pickled_code_is_refused(
    hf_models, tmp_path: Path
) -> None:
    src, hf_model = hf_models["llama-gqa-untied"]
    legacy = _copy(src, tmp_path / "legacy")
    (legacy / "model.safetensors").unlink()
    torch.save(hf_model.state_dict(), legacy / "pytorch_model.bin")
    model = zenlm.load(import_hf(legacy, tmp_path / "run"), device="cpu").model
    x = _ids(1, 20)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _their_logits(hf_model, x), **TOL)

    marker = tmp_path / "code-ran"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    with open(legacy / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": Evil()}, f, protocol=2)
    with pytest.raises(DataError, match="pytorch_model.bin"):
        import_hf(legacy, tmp_path / "run2")
    assert not marker.exists()


def test_base_model_names_and_mask_buffers_are_accepted(hf_models, tmp_path: Path) -> None:
    """Like the original GPT-2 repository: names without "transformer.", causal-mask buffers included."""
    src, hf_model = hf_models["gpt2"]
    old = _copy(src, tmp_path / "old")
    tensors = {k: v.contiguous() for k, v in hf_model.transformer.state_dict().items()}
    tensors["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    save_file(tensors, str(old / "model.safetensors"))
    model = zenlm.load(import_hf(old, tmp_path / "run"), device="cpu").model
    x = _ids(1, 20)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _their_logits(hf_model, x), **TOL)


def test_sharded_safetensors_import(hf_models, tmp_path: Path) -> None:
    src, hf_model = hf_models["gpt2"]
    sharded = tmp_path / "sharded"
    hf_model.save_pretrained(sharded, max_shard_size="20KB")
    _gpt2_tokenizer().save_pretrained(sharded)
    assert (sharded / "model.safetensors.index.json").is_file()
    model = zenlm.load(import_hf(sharded, tmp_path / "run"), device="cpu").model
    x = _ids(1, 20)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _their_logits(hf_model, x), **TOL)


# ------------------------------------------------------------------------------------------ errors


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_errors_name_the_key_and_the_file(hf_models, tmp_path: Path) -> None:
    src, _ = hf_models["llama-gqa-untied"]
    # unsupported architecture
    bad = _copy(src, tmp_path / "falcon")
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "architectures": ["FalconForCausalLM"],
                                                 "model_type": "falcon"}))
    with pytest.raises(ConfigError, match=r"config\.json.*FalconForCausalLM"):
        import_hf(bad, tmp_path / "o1")
    # unsupported option: rope scaling
    (bad / "config.json").write_text(json.dumps({**cfg, "rope_parameters": {
        "rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}))
    with pytest.raises(ConfigError, match=r"config\.json.*rope_type='yarn'"):
        import_hf(bad, tmp_path / "o2")
    # shape mismatch: config.json says a wider MLP than the weights have
    (bad / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 64}))
    with pytest.raises(DataError, match=r"model\.safetensors.*'model\.layers\.0\.mlp\.gate_proj\.weight'.*"
                                        r"\(48, 32\).*\(64, 32\)"):
        import_hf(bad, tmp_path / "o3")
    # a missing tensor
    (bad / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(bad / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(DataError, match=r"model\.safetensors.*'model\.layers\.1\.self_attn\.k_proj\.weight'"):
        import_hf(bad, tmp_path / "o4")
    # an unexpected one
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(16, 32)
    tensors["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(DataError, match=r"model\.safetensors.*'model\.layers\.0\.self_attn\.extra\.weight'"):
        import_hf(bad, tmp_path / "o5")
    # missing files
    (bad / "model.safetensors").unlink()
    with pytest.raises(DataError, match=r"no weights.*model\.safetensors"):
        import_hf(bad, tmp_path / "o6")
    (bad / "config.json").unlink()
    with pytest.raises(DataError, match=r"config\.json is missing"):
        import_hf(bad, tmp_path / "o7")
    no_tok = _copy(src, tmp_path / "no-tok")
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(DataError, match=r"tokenizer\.json is missing"):
        import_hf(no_tok, tmp_path / "o8")
    # an existing run is not overwritten by accident
    run = import_hf(src, tmp_path / "o9")
    with pytest.raises(ConfigError, match="overwrite"):
        import_hf(src, run)
    import_hf(src, run, overwrite=True)


def test_bert_checkpoints_go_to_the_bert_converter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "bert"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    calls = []
    fake = types.ModuleType("zenlm.convert.hf_bert")
    fake.import_bert = lambda s, o, **kw: calls.append((Path(s), Path(o))) or Path(o)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "zenlm.convert.hf_bert", fake)
    assert import_hf(src, tmp_path / "out") == tmp_path / "out"
    assert calls == [(src, tmp_path / "out")]


# ------------------------------------------------------------------------------------------ export


def _trained_llama_run(tmp_path: Path) -> Path:
    """A run made by zenlm's own pretraining recipe (a few steps on a tiny prepared corpus)."""
    from zenlm.data.corpus import open_corpus
    from zenlm.data.shards import prepare
    from zenlm.recipes.pretrain import pretrain
    from zenlm.train.loop import TrainConfig
    from zenlm.train.optim import OptimConfig

    (tmp_path / "c.txt").write_text(TEXT * 3, encoding="utf-8")
    corpus = open_corpus(str(tmp_path / "c.txt"), val_fraction=0.1)
    tok = train_tokenizer(corpus.texts("train"), kind="bpe", vocab_size=300)
    prepare(corpus, tok, tmp_path / "data")
    run = tmp_path / "run"
    pretrain(tmp_path / "data", run, model="llama-tiny", batch_size=4, seq_len=32, eval_tokens=256,
             model_overrides=dict(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, block_size=64, rope_theta=5e5),
             train=TrainConfig(max_steps=3, eval_every=0, log_every=1, ckpt_every=0, device="cpu",
                               precision="fp32", tensorboard=False),
             optim=OptimConfig(name="adamw", lr=1e-2, warmup_steps=0))
    return run


def _random_gpt2_run(tmp_path: Path) -> Path:
    """A run directory holding a randomly initialised GPT-2-shaped zenlm model and a zenlm BPE tokenizer."""
    run = tmp_path / "gpt2-run"
    run.mkdir()
    tok = train_tokenizer([TEXT], kind="bpe", vocab_size=300)
    tok.save(run)
    cfg = GPTConfig(vocab_size=304, block_size=64, n_layer=2, n_head=4, n_embd=32, init_std=0.2)
    torch.manual_seed(3)
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    save_model(model, run / "model.safetensors")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": cfg.to_dict()}))
    return run


@pytest.mark.parametrize("kind", ["llama-trained", "gpt2-random"])
def test_export_loads_in_transformers_with_same_logits_and_ids(tmp_path: Path, kind: str) -> None:
    run = _trained_llama_run(tmp_path) if kind == "llama-trained" else _random_gpt2_run(tmp_path)
    out = export_hf(run, tmp_path / "hf")
    for f in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
              "tokenizer_config.json"):
        assert (out / f).is_file(), f
    lm = zenlm.load(run, device="cpu")
    theirs = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(theirs).__name__ == ("LlamaForCausalLM" if kind == "llama-trained" else "GPT2LMHeadModel")
    x = torch.randint(0, lm.tokenizer.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(lm.model(x), _their_logits(theirs, x), **TOL)

    hf_tok = tf.AutoTokenizer.from_pretrained(out)
    sample = "Sphinx of black quartz, 中文 😀 judge my vow.\n"
    assert hf_tok(sample, add_special_tokens=False).input_ids == lm.tokenizer.encode(sample)
    assert hf_tok.decode(lm.tokenizer.encode(sample)) == sample
    assert hf_tok.eos_token == "<|eos|>" and hf_tok.eos_token_id == lm.tokenizer.eos_id
    assert hf_tok.bos_token_id == lm.tokenizer.bos_id and hf_tok.pad_token_id == lm.tokenizer.pad_id
    assert hf_tok.apply_chat_template(CHAT, tokenize=False) == \
        "<|bos|>user:\nHello there<|eos|>\nassistant:\nHi!<|eos|>\n"
    assert theirs.generation_config.eos_token_id == lm.tokenizer.eos_id
    assert hf_tok.model_max_length == lm.config.block_size

    # same greedy continuation (no early stop) on both sides
    prompt = lm.tokenizer.encode("The quick brown")
    theirs.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = theirs.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=20,
                              pad_token_id=0)[0, len(prompt):].tolist()
    assert list(generate_ids(lm.model, prompt, GenerationConfig(max_new_tokens=20, temperature=0.0,
                                                                stop_at_eos=False))) == ref

    # and back: importing the export gives the same weights
    again = zenlm.load(import_hf(out, tmp_path / "again"), device="cpu")
    for k, v in lm.model.state_dict().items():
        torch.testing.assert_close(again.model.state_dict()[k], v, atol=0, rtol=0)


def test_rope_scaling_config_and_frequencies() -> None:
    from zenlm.models.layers import rope_frequencies

    plain = rope_frequencies(8, 1e4)
    torch.testing.assert_close(rope_frequencies(8, 1e4, {"rope_type": "linear", "factor": 4.0}), plain / 4)
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64}
    scaled = rope_frequencies(8, 1e4, llama3)
    assert scaled[0] == plain[0] and scaled[-1] == plain[-1] / 8  # short wavelengths kept, long ones scaled
    GPTConfig(pos="rope", rope_scaling=llama3)
    with pytest.raises(ConfigError, match="rope_type"):
        GPTConfig(pos="rope", rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ConfigError, match="low_freq_factor"):
        GPTConfig(pos="rope", rope_scaling={"rope_type": "llama3", "factor": 2.0})


def test_export_refuses_models_without_a_transformers_twin(tmp_path: Path) -> None:
    for kw, field in [(dict(mlp="relu2", pos="rope", norm="rmsnorm"), "mlp='relu2'"),
                      (dict(logit_softcap=30.0), "logit_softcap"),
                      (dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, qkv_bias=True,
                            attn_proj_bias=True, mlp_bias=True, qk_norm=True), "qkv_bias")]:
        run = tmp_path / field.split("=")[0]
        run.mkdir()
        cfg = GPTConfig(vocab_size=304, block_size=16, n_layer=1, n_head=2, n_embd=16, **kw)
        (run / "config.yaml").write_text(yaml.safe_dump({"model": cfg.to_dict()}))
        with pytest.raises(ConfigError, match=field):
            export_hf(run, tmp_path / "out")
    (run := tmp_path / "encdec").mkdir()  # encoder-decoders: see tests/test_convert_hf_encoders.py
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"arch": "encdec", "pos": "rope"}}))
    with pytest.raises(ConfigError, match="pos='rope'"):
        export_hf(run, tmp_path / "out")


# ------------------------------------------------------------------------------------------ CLI


def test_cli_convert_round_trip_and_errors(hf_models, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src, _ = hf_models["qwen2"]
    run, out = tmp_path / "run", tmp_path / "hf"
    assert main(["convert", "from-hf", str(src), "--out", str(run)]) == 0
    assert main(["convert", "to-hf", str(run), "--out", str(out), "--dtype", "bf16"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["torch_dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_file(str(out / "model.safetensors")).values())
    capsys.readouterr()
    assert main(["convert", "from-hf", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(["convert", "from-hf", str(src), "--from-hub", "a/b", "--out", str(tmp_path / "y")]) == 2
    assert "either" in capsys.readouterr().err


def test_from_hub_downloads_then_converts_the_local_copy(hf_models, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    hub = pytest.importorskip("huggingface_hub")
    src, _ = hf_models["gpt2"]
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):  # no network in tests
        calls.append((repo_id, revision, tuple(allow_patterns)))
        return str(src)

    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download)
    assert main(["convert", "from-hf", "--from-hub", "org/tiny-gpt2", "--revision", "main",
                 "--out", str(tmp_path / "run")]) == 0
    assert calls == [("org/tiny-gpt2", "main", ("*.json", "*.jinja", "model*.safetensors"))]
    assert zenlm.load(tmp_path / "run", device="cpu").config.pos == "learned"
