"""Model families. Importing this package registers the built-in ones with :mod:`zenlm.models.registry`.

A new family is one file here (config dataclass, nn.Module, presets) plus one ``register(...)`` below.
"""

from zenlm.config import GPTConfig
from zenlm.models.bert import BERT_PRESETS, Bert, BertConfig
from zenlm.models.encdec import ENCDEC_PRESETS, EncDecConfig, EncoderDecoder
from zenlm.models.gpt import GPT
from zenlm.models.registry import Architecture, register
from zenlm.models.vae import VAE_PRESETS, TextVAE, TextVAEConfig
from zenlm.presets import PRESETS as GPT_PRESETS

register(Architecture(
    name="gpt", title="GPT", config_class=GPTConfig, build=GPT, presets=GPT_PRESETS, default_preset="demo",
    description="decoder-only Transformer (GPT-2 and Llama families): next-token prediction and generation",
    capabilities=frozenset({"causal-lm", "generate", "classify", "embed"}),
))
register(Architecture(
    name="bert", title="BERT encoder", config_class=BertConfig, build=Bert, presets=BERT_PRESETS,
    default_preset="bert-mini",
    description="bidirectional encoder (post-LN BERT): masked-LM pretraining, embeddings, classification",
    capabilities=frozenset({"masked-lm", "classify", "embed"}),
    shape_names={"n_embd": ("d_model",), "block_size": ("max_len",)},
))
register(Architecture(
    name="encdec", title="encoder-decoder", config_class=EncDecConfig, build=EncoderDecoder,
    presets=ENCDEC_PRESETS, default_preset="encdec-small",
    description="encoder-decoder Transformer (T5 / BART layouts): source -> target",
    capabilities=frozenset({"seq2seq", "generate"}),
    shape_names={"n_layer": ("n_enc_layer", "n_dec_layer")},
))
register(Architecture(
    name="vae", title="sentence VAE", config_class=TextVAEConfig, build=TextVAE, presets=VAE_PRESETS,
    default_preset="vae-small",
    description="variational autoencoder of sentences (Bowman et al.): LSTM encoder -> Gaussian code -> "
                "LSTM decoder",
    capabilities=frozenset(), api="zenlm.vae:from_run",
))
