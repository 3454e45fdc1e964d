"""The encoder-decoder against PyTorch's own ``torch.nn.Transformer`` with the same weights: same memory, same
logits (``torch.testing.assert_close`` at its default fp32 tolerances).

Our layer layout is nn.Transformer's with ``norm_first=True`` (pre-norm), a final norm after each stack, and
no dropout: an encoder layer is self-attention + MLP, a decoder layer self-attention + cross-attention + MLP.
nn.Transformer has neither rotary positions nor SwiGLU, so the reference covers learned positions (added to
the embeddings outside the layers, as we do) with LayerNorm + GELU (tanh) + biases (BART-like), and RMSNorm +
squared ReLU without biases (T5-like norms and MLP).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zenlm.models.encdec import EncoderDecoder, get_encdec_preset
from zenlm.models.layers import gelu_tanh, relu_squared

V = 61


def _copy_block_weights(ours: nn.Module, ref: nn.Module) -> None:
    """Our decoder/encoder block's parameters into the equivalent nn.Transformer{Encoder,Decoder}Layer."""
    sd: dict[str, torch.Tensor] = {}
    attn = ours.attn if hasattr(ours, "attn") else ours.self_attn
    sd["self_attn.in_proj_weight"] = attn.qkv.weight  # [q; k; v], heads in the same order
    sd["self_attn.out_proj.weight"] = attn.proj.weight
    if hasattr(ours, "cross_attn"):
        sd["multihead_attn.in_proj_weight"] = torch.cat([ours.cross_attn.q.weight, ours.cross_attn.kv.weight])
        sd["multihead_attn.out_proj.weight"] = ours.cross_attn.proj.weight
        norms = {"norm1": ours.norm_self, "norm2": ours.norm_cross, "norm3": ours.norm_mlp}
    else:
        norms = {"norm1": ours.norm_attn, "norm2": ours.norm_mlp}
    sd["linear1.weight"], sd["linear2.weight"] = ours.mlp.fc.weight, ours.mlp.proj.weight
    if ours.mlp.fc.bias is not None:
        sd["self_attn.in_proj_bias"], sd["self_attn.out_proj.bias"] = attn.qkv.bias, attn.proj.bias
        if hasattr(ours, "cross_attn"):
            sd["multihead_attn.in_proj_bias"] = torch.cat([ours.cross_attn.q.bias, ours.cross_attn.kv.bias])
            sd["multihead_attn.out_proj.bias"] = ours.cross_attn.proj.bias
        sd["linear1.bias"], sd["linear2.bias"] = ours.mlp.fc.bias, ours.mlp.proj.bias
    for name, norm in norms.items():
        for k, t in norm.state_dict().items():
            sd[f"{name}.{k}"] = t
    ref.load_state_dict(sd, strict=True)


def _reference(model: EncoderDecoder) -> nn.Transformer:
    cfg = model.config
    act = gelu_tanh if cfg.mlp == "gelu" else relu_squared
    ref = nn.Transformer(d_model=cfg.n_embd, nhead=cfg.n_head, num_encoder_layers=cfg.n_enc_layer,
                         num_decoder_layers=cfg.n_dec_layer, dim_feedforward=cfg.mlp_hidden, dropout=0.0,
                         activation=act, batch_first=True, norm_first=True, bias=cfg.bias,
                         layer_norm_eps=cfg.norm_eps)
    if cfg.norm == "rmsnorm":  # nn.Transformer builds LayerNorms; swap in RMSNorms of the same shape
        for module in list(ref.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, nn.LayerNorm):
                    setattr(module, name, nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps))
    for ours, theirs in zip(model.enc_blocks, ref.encoder.layers, strict=True):
        _copy_block_weights(ours, theirs)
    for ours, theirs in zip(model.dec_blocks, ref.decoder.layers, strict=True):
        _copy_block_weights(ours, theirs)
    ref.encoder.norm.load_state_dict(model.enc_norm.state_dict())
    ref.decoder.norm.load_state_dict(model.dec_norm.state_dict())
    return ref


@pytest.mark.filterwarnings("ignore:enable_nested_tensor")  # nn.Transformer notes it skips nested tensors
@pytest.mark.parametrize("kw", [
    dict(norm="layernorm", mlp="gelu", bias=True),  # BART-like
    dict(norm="rmsnorm", mlp="relu2", bias=False, norm_eps=1e-6),  # T5-like norms and MLP
])
def test_encoder_decoder_matches_torch_nn_transformer(kw):
    torch.manual_seed(0)
    model = EncoderDecoder(get_encdec_preset("encdec-tiny", vocab_size=V, pos="learned", init_std=0.2,
                                             **kw)).eval()
    ref = _reference(model)
    ref.train()  # dropout is 0; training mode keeps nn.Transformer off its fused inference path
    src = torch.randint(0, V, (3, 9))
    src_mask = torch.ones(3, 9, dtype=torch.bool)
    src_mask[1, 5:] = False  # a padded source
    src_mask[2, 8:] = False
    tgt = torch.randint(0, V, (3, 7))

    with torch.no_grad():
        ours_memory = model.encode(src, src_mask)
        ours_logits = model(src, tgt, src_mask)
        x_src = model.tok_emb(src) + model.enc_pos.weight[: src.shape[1]]  # embeddings: outside the layers
        x_tgt = model.tok_emb(tgt) + model.dec_pos.weight[: tgt.shape[1]]
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        memory = ref.encoder(x_src, src_key_padding_mask=~src_mask)
        out = ref.decoder(x_tgt, memory, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=~src_mask)
        ref_logits = out @ model.tok_emb.weight.T  # the head is tied to the token embeddings

    real = src_mask[:, :, None].expand_as(memory)
    torch.testing.assert_close(ours_memory[real], memory[real])  # padded positions are never read
    torch.testing.assert_close(ours_logits, ref_logits)
    assert ref_logits.std() > 0.1  # weights large enough that a wrong wiring would show
