"""Next-token cross-entropy with the output head applied in chunks of rows: the [N, V] logits never exist at once.

For the N scored positions of a batch (hidden states h_n after the final norm, targets y_n)::

    z_n      = h_n W^T                          # [V] logits; W = the head [V, C] (soft-capped when the model caps)
    loss_sum = sum_n ( logsumexp_v z_nv - z_n,y_n )

At GPT-2's vocabulary (V = 50257) the logits, their log-probabilities and their gradient are the largest
activations of a training step: at 4 x 256 tokens each is 1024 x 50257 floats (206 MB), more than all twelve
blocks keep for the backward pass. Here the rows go through in chunks of R (R x V ~ ``CHUNK_ELEMENTS``), and
because the loss is a plain sum, each chunk's gradient is complete as soon as its logits are known::

    p        = softmax(z_c)                     # [R, V], one chunk
    dL/dz_c  = p - onehot(y_c)                  # (times 1 - (z/cap)^2 under a soft cap)
    dL/dh_c  = dL/dz_c W                        # [R, C], kept for the backward pass
    dL/dW   += dL/dz_c^T h_c                    # [V, C], only when W is trained (not under LoRA)

so one chunk's logits live at a time and nothing is recomputed: the backward pass only multiplies the kept
gradients by the scalar it receives (1 / the step's target count, see :mod:`zenlm.train.step`). The sums are
the unchunked ones in another order (equal to float rounding); matrix products run in the autocast dtype as
the model's own head does. A head that is not one plain matrix (LoRA on ``lm_head``, an int8 head) goes
through ``torch.utils.checkpoint`` per chunk instead: the same loss, each chunk's logits recomputed in the
backward pass.

Small problems (N x V up to ``CHUNK_ELEMENTS``, e.g. a character-level model's V = 82) take the plain path,
``cross_entropy(model.head(h), y)``: one chunk would gain nothing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from zenlm.data.batches import IGNORE_INDEX

CHUNK_ELEMENTS = 1 << 23  # logits per chunk (32 MB in float32): 166 rows at V = 50257, 1024 at V = 8192


class _ChunkedHeadCE(torch.autograd.Function):
    """sum_n CE(h_n W^T, y_n) over row chunks, the gradients computed chunk by chunk in the forward pass (see
    the module docstring). h_NC [N, C], w_VC [V, C] in the dtype the products run in; y_N [N] int64 (all
    scored); softcap: None or the cap; rows: rows per chunk. Returns a float32 scalar."""

    @staticmethod
    def forward(ctx: Any, h_NC: Tensor, w_VC: Tensor, y_N: Tensor, softcap: float | None, rows: int) -> Tensor:
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss = torch.zeros((), dtype=torch.float32, device=h_NC.device)
        grad_h_NC = torch.empty_like(h_NC) if want_h else None
        grad_w_VC = torch.zeros(w_VC.shape, dtype=torch.float32, device=w_VC.device) if want_w else None
        with torch.autocast(h_NC.device.type, enabled=False):
            for s in range(0, h_NC.shape[0], rows):
                h_RC, y_R = h_NC[s : s + rows], y_N[s : s + rows]
                z_RV = (h_RC @ w_VC.T).float()
                t_RV = None
                if softcap is not None:
                    t_RV = torch.tanh(z_RV / softcap)
                    z_RV = softcap * t_RV
                lse_R = torch.logsumexp(z_RV, dim=-1)
                loss += (lse_R - z_RV.gather(1, y_R[:, None])[:, 0]).sum()
                if not (want_h or want_w):
                    continue
                g_RV = z_RV.sub_(lse_R[:, None]).exp_()  # softmax, in the logits' memory
                g_RV[torch.arange(len(y_R), device=y_R.device), y_R] -= 1.0
                if t_RV is not None:
                    g_RV *= 1.0 - t_RV * t_RV
                g_RV = g_RV.to(h_NC.dtype)
                if grad_h_NC is not None:
                    grad_h_NC[s : s + rows] = g_RV @ w_VC
                if grad_w_VC is not None:
                    grad_w_VC += (g_RV.T @ h_RC).float()
        ctx.save_for_backward(grad_h_NC, grad_w_VC)
        ctx.w_dtype = w_VC.dtype
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        grad_h_NC, grad_w_VC = ctx.saved_tensors
        scale = grad_loss.float()
        gh = None if grad_h_NC is None else (grad_h_NC * scale).to(grad_h_NC.dtype)
        gw = None if grad_w_VC is None else (grad_w_VC * scale).to(ctx.w_dtype)
        return gh, gw, None, None, None


def head_matrix(model: nn.Module) -> Tensor | None:
    """The output head of a GPT as one plain matrix W [V, C] (``lm_head.weight``, or ``tok_emb.weight`` when
    tied), or None when it is something else (LoRA on the head, int8 weights)."""
    head = getattr(model, "lm_head", 0)
    if head is None:
        emb = getattr(model, "tok_emb", None)
        return emb.weight if type(emb) is nn.Embedding else None
    return head.weight if type(head) is nn.Linear else None


def _plain_ce(head: nn.Module, h_NC: Tensor, y_N: Tensor) -> Tensor:
    return F.cross_entropy(head(h_NC).float(), y_N, reduction="sum")


def head_cross_entropy(model: nn.Module, h_NC: Tensor, y_N: Tensor, *, chunk_elements: int | None = None
                       ) -> Tensor:
    """sum_n -log softmax(head(h_n))[y_n] for a GPT ``model``: h_NC [N, C] final hidden states (after
    ``norm_f``), y_N [N] targets (every one scored) -> float32 scalar. Chunked when N x V > ``chunk_elements``
    (default :data:`CHUNK_ELEMENTS`)."""
    V = model.config.vocab_size
    rows = max(1, (chunk_elements or CHUNK_ELEMENTS) // V)
    if h_NC.shape[0] <= rows:  # one chunk: the plain path
        return _plain_ce(model.head, h_NC, y_N)
    weight = head_matrix(model)
    if weight is None:  # any other head: checkpoint each chunk (recomputed in the backward pass)
        return sum((checkpoint(_plain_ce, model.head, h_NC[s : s + rows], y_N[s : s + rows], use_reentrant=False)
                    for s in range(0, h_NC.shape[0], rows)), torch.zeros((), device=h_NC.device))
    dev = h_NC.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h_NC.dtype
    return _ChunkedHeadCE.apply(h_NC.to(dtype), weight.to(dtype), y_N, model.config.logit_softcap, rows)


def next_token_loss(model: nn.Module, x_BT: Tensor, labels_BT: Tensor, *, masked: bool = True) -> Tensor:
    """Summed next-token cross-entropy of a causal LM: x_BT [B, T] inputs, labels_BT [B, T] the next tokens
    (``IGNORE_INDEX`` where not scored) -> float32 scalar.

    A GPT reads the inputs once (``features``) and only the scored positions go through the head
    (:func:`head_cross_entropy`: a chat batch's user turns and padding cost no logits at all). masked: False
    when every position is scored (pretraining windows), which saves finding them. Any other model, and a
    model being compiled (the compiler fuses the head and the loss itself), computes ``model(x_BT)``."""
    from zenlm.models.gpt import GPT

    if not isinstance(model, GPT) or torch.compiler.is_compiling():
        logits_BTV = model(x_BT)
        return F.cross_entropy(logits_BTV.float().flatten(0, 1), labels_BT.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")
    h_NC, y_N = model.features(x_BT).flatten(0, 1), labels_BT.flatten()
    if masked:
        keep_N = (y_N != IGNORE_INDEX).nonzero()[:, 0]
        h_NC, y_N = h_NC.index_select(0, keep_N), y_N.index_select(0, keep_N)
    return head_cross_entropy(model, h_NC, y_N)


__all__ = ["CHUNK_ELEMENTS", "head_cross_entropy", "head_matrix", "next_token_loss"]
