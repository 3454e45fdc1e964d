"""Model families. Importing this package registers the built-in ones with :mod:`zenlm.models.registry`.

A new family is one file here (config dataclass, nn.Module, presets) plus one ``register(...)`` below.
"""

from zenlm.config import GPTConfig
from zenlm.models.bert import BERT_PRESETS, Bert, BertConfig
from zenlm.models.encdec import ENCDEC_PRESETS, EncDecConfig, EncoderDecoder
from zenlm.models.gpt import GPT
from zenlm.models.ngram import NGRAM_PRESETS, NGramConfig, NGramLM
from zenlm.models.registry import Architecture, register
from zenlm.models.rnn import MLP_PRESETS, MLPLM, RNN_PRESETS, RNNLM, MLPLMConfig, RNNLMConfig
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

# The lower rungs of the ladder (docs/ladder.md): stateful causal LMs, no context window, no KV cache.
STATEFUL_LM = frozenset({"causal-lm", "stateful", "generate"})
register(Architecture(
    name="ngram", title="n-gram", config_class=NGramConfig, build=NGramLM.uniform, presets=NGRAM_PRESETS,
    default_preset="ngram-5", capabilities=STATEFUL_LM, count=NGramLM.from_ids, from_tensors=NGramLM,
    description="interpolated Kneser-Ney n-gram model: counted from the training ids, not trained",
))
register(Architecture(
    name="mlp", title="MLP LM", config_class=MLPLMConfig, build=MLPLM, presets=MLP_PRESETS,
    default_preset="mlp-small", capabilities=STATEFUL_LM,
    description="feed-forward LM (Bengio et al. 2003): the previous n-1 tokens' embeddings -> tanh -> softmax",
))
register(Architecture(
    name="rnn", title="recurrent LM", config_class=RNNLMConfig, build=RNNLM, presets=RNN_PRESETS,
    default_preset="lstm-small", capabilities=STATEFUL_LM, shape_names={"n_embd": ("n_embd", "n_hidden")},
    description="LSTM / GRU LM: embedding -> stacked recurrent layers -> softmax, trained with truncated BPTT",
))
