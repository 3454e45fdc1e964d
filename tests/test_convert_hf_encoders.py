"""`zenlm convert to-hf` for BERT runs, BERT classifier runs and encoder-decoder runs: what transformers loads
from the export computes what zenlm computes (fp32, torch.testing.assert_close at its default tolerances),
and its tokenizer gives the ids zenlm feeds the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import zenlm
from zenlm.cli import main
from zenlm.convert.hf import export_hf
from zenlm.convert.hf_bert import bert_state_from_hf
from zenlm.data.classify import encode_for_model, pad_batch
from zenlm.errors import ConfigError
from zenlm.models.bert import Bert, get_bert_preset
from zenlm.models.encdec import EncoderDecoder, get_encdec_preset
from zenlm.tokenizer import Tokenizer, train_tokenizer
from zenlm.train.checkpoint import save_model

tf = pytest.importorskip("transformers")

TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! "
        "Sphinx of black quartz, judge my vow. Ünïcödé façade, 中文文本 and emoji.\n") * 30
TEXTS = ["The quick brown fox.", "Pack my box with five dozen liquor jugs, judge my vow!", "中文文本", "a"]


def _spread(model: torch.nn.Module, seed: int) -> None:
    """Move norm gains and biases off their initial values, so a misplaced one changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


def _bert_run(root: Path, tok: Tokenizer, *, initialised_heads: list[str] | None = None) -> Path:
    run = root / ("bert-imported" if initialised_heads else "bert")
    run.mkdir()
    tok.save(run)
    cfg = get_bert_preset("bert-tiny", vocab_size=tok.vocab_size + 4, max_len=64, d_model=32, n_head=4, d_ff=64)
    torch.manual_seed(0)
    model = Bert(cfg)
    _spread(model, 1)
    save_model(model, run / "model.safetensors")
    saved = {"model": cfg.to_dict(), "objective": "mlm"}
    if initialised_heads:
        saved["source"] = {"format": "huggingface", "architecture": "bert", "initialised_heads": initialised_heads}
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    return run


@pytest.fixture(scope="module")
def wp_tok() -> Tokenizer:
    return train_tokenizer([TEXT], kind="wordpiece", vocab_size=200)


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory: pytest.TempPathFactory, wp_tok: Tokenizer) -> Path:
    return _bert_run(tmp_path_factory.mktemp("bert"), wp_tok)


def _batch(lm, texts=TEXTS) -> tuple[torch.Tensor, torch.Tensor]:
    seqs = encode_for_model(lm.tokenizer, texts, lm.max_len, encoder=True)
    return pad_batch(seqs, lm.tokenizer.pad_id)


def _same_ids(out: Path, lm, texts=TEXTS) -> None:
    """transformers' tokenizer from the export gives the ids (and mask) zenlm feeds the model."""
    ids, mask = _batch(lm, texts)
    theirs = tf.AutoTokenizer.from_pretrained(out)(texts, padding=True, return_tensors="pt")
    assert theirs["input_ids"].tolist() == ids.tolist()
    assert theirs["attention_mask"].tolist() == mask.tolist()
    assert bool((theirs["token_type_ids"] == 0).all())


# ------------------------------------------------------------------------------------------ BERT


def test_bert_run_exports_as_masked_lm_with_same_hidden_states_and_logits(bert_run, tmp_path: Path) -> None:
    out = export_hf(bert_run, tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["BertForMaskedLM"] and cfg["model_type"] == "bert"
    lm = zenlm.load(bert_run, device="cpu")
    ids, mask = _batch(lm)
    _same_ids(out, lm)
    with torch.no_grad():
        ours_h = lm.model(ids, mask)
        ours_mlm = lm.model.mlm_logits(ours_h)
        mlm = tf.AutoModelForMaskedLM.from_pretrained(out).eval()
        assert type(mlm).__name__ == "BertForMaskedLM"
        torch.testing.assert_close(mlm(input_ids=ids, attention_mask=mask).logits, ours_mlm)
        base = tf.AutoModel.from_pretrained(out).eval()  # the encoder alone: BertModel
        torch.testing.assert_close(base(input_ids=ids, attention_mask=mask).last_hidden_state, ours_h)
    # the tied decoder is not stored twice, and nothing of ours is left out but the untrained pooler
    names = set(load_file(str(out / "model.safetensors")))
    assert "cls.predictions.decoder.weight" not in names and not any("pooler" in n for n in names)
    # imported back, the weights are ours
    back, missing = bert_state_from_hf(load_file(str(out / "model.safetensors")), lm.config)
    assert missing == ["pooler.weight", "pooler.bias"]
    for k, v in back.items():
        torch.testing.assert_close(v, lm.model.state_dict()[k], atol=0, rtol=0)


def test_imported_encoder_without_mlm_head_exports_as_bert_model(tmp_path: Path, wp_tok: Tokenizer) -> None:
    run = _bert_run(tmp_path, wp_tok, initialised_heads=["mlm_bias", "mlm_dense", "mlm_ln"])
    out = export_hf(run, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertModel"]
    lm = zenlm.load(run, device="cpu")
    ids, mask = _batch(lm)
    base = tf.AutoModel.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = base(input_ids=ids, attention_mask=mask)
        h = lm.model(ids, mask)
        torch.testing.assert_close(theirs.last_hidden_state, h)
        torch.testing.assert_close(theirs.pooler_output, lm.model.pool(h))
    assert torch.allclose(lm.embed(TEXTS), torch.nn.functional.normalize(
        (theirs.last_hidden_state * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1), atol=1e-6)


def _classifier_run(bert_run: Path, root: Path, pooling: str) -> Path:
    from zenlm.recipes.finetune_classify import finetune_classify
    from zenlm.train.loop import TrainConfig

    rows = [{"text": t, "label": label} for t, label in [("a quick fox", "animal"), ("the lazy dog", "animal"),
                                                         ("liquor jugs", "thing"), ("my box", "thing"),
                                                         ("black quartz", "thing"), ("a brown fox", "animal")] * 3]
    data = root / f"rows-{pooling}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = root / f"clf-{pooling}"
    finetune_classify(bert_run, data, out, pooling=pooling, val_fraction=0.34, max_len=16, batch_size=4, epochs=1,
                      patience=0, train=TrainConfig(device="cpu", seed=0, tensorboard=False))
    return out


def test_bert_classifier_exports_as_sequence_classification(bert_run, tmp_path: Path) -> None:
    run = _classifier_run(bert_run, tmp_path, "cls")
    out = export_hf(run, tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["BertForSequenceClassification"]
    assert cfg["id2label"] == {"0": "animal", "1": "thing"} and cfg["label2id"] == {"animal": 0, "thing": 1}
    lm = zenlm.load(run, device="cpu")
    theirs = tf.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert theirs.config.id2label == {0: "animal", 1: "thing"}
    ids, mask = _batch(lm)
    _same_ids(out, lm)
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids, attention_mask=mask).logits, lm.model(ids, mask))
    probs = torch.softmax(theirs(input_ids=ids, attention_mask=mask).logits, -1)
    assert [theirs.config.id2label[int(i)] for i in probs.argmax(-1)] == [p["label"] for p in lm.classify(TEXTS)]

    mean = _classifier_run(bert_run, tmp_path, "mean")  # the default pooling has no transformers counterpart
    with pytest.raises(ConfigError, match=r"pooling='mean'.*--pooling cls"):
        export_hf(mean, tmp_path / "hf2")
    assert not (tmp_path / "hf2").exists()


# ------------------------------------------------------------------------------------------ encoder-decoder


def _encdec_run(root: Path, tok: Tokenizer, name: str, **overrides) -> Path:
    run = root / name
    run.mkdir()
    tok.save(run)
    cfg = get_encdec_preset("encdec-tiny", vocab_size=tok.vocab_size + 6, n_embd=32, n_head=4, max_source_len=48,
                            max_target_len=24, **overrides)
    torch.manual_seed(2)
    model = EncoderDecoder(cfg)
    _spread(model, 3)
    save_model(model, run / "model.safetensors")
    settings = {"arch": "encdec", "max_source_tokens": 47, "max_target_tokens": 23, "bos_id": tok.bos_id,
                "eos_id": tok.eos_id, "pad_id": tok.pad_id, "sep_id": tok.bos_id}
    (run / "config.yaml").write_text(yaml.safe_dump({"model": cfg.to_dict(), "seq2seq": settings}))
    return run


@pytest.fixture(scope="module")
def bpe_tok() -> Tokenizer:
    return train_tokenizer([TEXT], kind="bpe", vocab_size=300)


@pytest.mark.parametrize("variant", [{}, {"mlp": "relu2", "tie_embeddings": False}])
def test_encdec_exports_as_blenderbot_with_same_logits_and_greedy_output(tmp_path: Path, bpe_tok: Tokenizer,
                                                                          variant: dict) -> None:
    from zenlm.beam import BeamConfig, beam_search_encdec

    run = _encdec_run(tmp_path, bpe_tok, "s2s", **variant)
    out = export_hf(run, tmp_path / "hf")
    s2s = zenlm.load(run, device="cpu")
    theirs = tf.AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    assert type(theirs).__name__ == "BlenderbotForConditionalGeneration"

    srcs = [s2s._source_ids(t) for t in TEXTS]  # source ids + <|eos|>, as zenlm reads them
    tok = tf.AutoTokenizer.from_pretrained(out)
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    src, src_mask = pad_batch(srcs, bpe_tok.pad_id)
    assert enc["input_ids"].tolist() == src.tolist() and enc["attention_mask"].tolist() == src_mask.tolist()

    tgt = torch.randint(0, bpe_tok.vocab_size, (len(TEXTS), 12), generator=torch.Generator().manual_seed(0))
    tgt[:, 0] = bpe_tok.bos_id
    with torch.no_grad():
        ours = s2s.model(src, tgt, src_mask.bool())
        ref = theirs(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt).logits
    torch.testing.assert_close(ref, ours)

    # greedy decoding with transformers' own generate equals ours, token for token
    for ids in srcs[:2]:
        hyp = beam_search_encdec(s2s.model, [ids], BeamConfig(num_beams=1, max_new_tokens=15),
                                 start_id=bpe_tok.bos_id, eos_id=bpe_tok.eos_id, pad_id=bpe_tok.pad_id)[0][0]
        with torch.no_grad():
            gen = theirs.generate(torch.tensor([ids]), do_sample=False, num_beams=1, max_new_tokens=15)[0].tolist()
        assert gen[0] == bpe_tok.bos_id
        assert [t for t in gen[1:] if t != bpe_tok.eos_id] == [t for t in hyp.tokens if t != bpe_tok.eos_id]


def test_encdec_layouts_without_a_counterpart_are_refused_naming_the_settings(tmp_path: Path,
                                                                              bpe_tok: Tokenizer) -> None:
    for preset, needles in [("encdec-small", ["pos='rope'", "norm='rmsnorm'", "bias=False"]),
                            ("t5-small", ["pos='rope'", "norm='rmsnorm'", "bias=False", "norm_eps=1e-06"])]:
        run = tmp_path / preset
        run.mkdir()
        cfg = get_encdec_preset(preset, vocab_size=320, n_enc_layer=1, n_dec_layer=1)
        (run / "config.yaml").write_text(yaml.safe_dump({"model": cfg.to_dict()}))
        with pytest.raises(ConfigError) as err:
            export_hf(run, tmp_path / "out")
        for needle in needles:
            assert needle in str(err.value)
    run = _encdec_run(tmp_path, bpe_tok, "swiglu", mlp="swiglu")
    with pytest.raises(ConfigError, match=r"mlp='swiglu' \(Blenderbot's MLP is not gated\)"):
        export_hf(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_to_hf_names_the_loader(bert_run, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["convert", "to-hf", str(bert_run), "--out", str(tmp_path / "hf")]) == 0
    assert "BertForMaskedLM" in capsys.readouterr().out
    run = tmp_path / "t5"
    run.mkdir()
    cfg = get_encdec_preset("t5-small", vocab_size=320, n_enc_layer=1, n_dec_layer=1)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": cfg.to_dict()}))
    assert main(["convert", "to-hf", str(run), "--out", str(tmp_path / "hf2")]) == 2
    assert "zenlm: error:" in capsys.readouterr().err
