"""Optimiser groups by structure: which parameters Muon trains, for every architecture and through wrappers."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import torch.distributed as dist
from torch import nn

from zenlm.config import GPTConfig
from zenlm.models.bert import Bert, BertConfig
from zenlm.models.classifier import SequenceClassifier
from zenlm.models.encdec import EncDecConfig, EncoderDecoder
from zenlm.models.gpt import GPT
from zenlm.train.optim import OptimConfig, build_optimizers, roles_of

GPT_SHAPE = dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)
LLAMA_STYLE = dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, qk_norm=True, n_kv_head=1)
ENCDEC_SHAPE = dict(vocab_size=50, max_source_len=16, max_target_len=16, n_enc_layer=2, n_dec_layer=2, n_head=2,
                    n_embd=32)
BERT_SHAPE = dict(vocab_size=50, d_model=32, n_layer=2, n_head=2, d_ff=64, max_len=16)


def names_in(opts: list[torch.optim.Optimizer], model: nn.Module) -> list[list[str]]:
    """Each param group of each optimiser as the list of its parameters' names, in order."""
    name = {id(p): n for n, p in model.named_parameters()}
    return [[name[id(p)] for p in g["params"]] for o in opts for g in o.param_groups]


def hidden_of(model: nn.Module, *stacks: nn.ModuleList) -> list[str]:
    """The names of the 2-D parameters inside the given block stacks, in the model's parameter order."""
    inside = {id(p) for stack in stacks for p in stack.parameters() if p.ndim == 2}
    return [n for n, p in model.named_parameters() if id(p) in inside]


# ------------------------------------------------------------------------ same groups as the name rule for GPT


@pytest.mark.parametrize("shape", [{"tie_embeddings": True}, {"tie_embeddings": False},
                                   {"tie_embeddings": False, **LLAMA_STYLE}], ids=["tied", "untied", "llama"])
def test_gpt_groups_equal_the_former_name_rule(shape: dict) -> None:
    """Checkpoints of earlier runs resume: the same parameters in the same optimiser groups, in the same order."""
    model = GPT(GPTConfig(**GPT_SHAPE, **shape))
    named = list(model.named_parameters())

    def former_hidden(n: str, p: torch.Tensor) -> bool:  # the rule these groups were chosen by before
        return p.ndim == 2 and n.startswith("blocks.") and not any(e in n for e in ("tok_emb", "pos_emb", "lm_head"))

    expected_muon = [
        [n for n, p in named if not former_hidden(n, p) and p.ndim >= 2],
        [n for n, p in named if p.ndim < 2],
        [n for n, p in named if former_hidden(n, p)],
    ]
    assert names_in(build_optimizers(model, OptimConfig(name="muon"), "cpu"), model) == expected_muon
    expected_adamw = [[n for n, p in named if p.ndim >= 2], [n for n, p in named if p.ndim < 2]]
    assert names_in(build_optimizers(model, OptimConfig(name="adamw"), "cpu"), model) == expected_adamw
    assert ("lm_head.weight" in expected_muon[0]) is not shape["tie_embeddings"]


# ----------------------------------------------------------------------- every architecture, by its structure


def _gpt(tied: bool) -> tuple[nn.Module, list[str]]:
    m = GPT(GPTConfig(**GPT_SHAPE, tie_embeddings=tied))
    return m, hidden_of(m, m.blocks)


def _bert() -> tuple[nn.Module, list[str]]:
    m = Bert(BertConfig(**BERT_SHAPE))
    return m, hidden_of(m, m.blocks)


def _encdec(**kw: object) -> tuple[nn.Module, list[str]]:
    m = EncoderDecoder(EncDecConfig(**ENCDEC_SHAPE, **kw))
    return m, hidden_of(m, m.enc_blocks, m.dec_blocks)


def _classifier(backbone: str) -> tuple[nn.Module, list[str]]:
    bb = Bert(BertConfig(**BERT_SHAPE)) if backbone == "bert" else GPT(GPTConfig(**GPT_SHAPE))
    m = SequenceClassifier(bb, 3, "cls" if backbone == "bert" else "last")
    return m, hidden_of(m, bb.blocks)


ARCHITECTURES: dict[str, Callable[[], tuple[nn.Module, list[str]]]] = {
    "gpt-tied": lambda: _gpt(True),
    "gpt-untied": lambda: _gpt(False),
    "bert": _bert,
    "encdec": _encdec,
    "encdec-untied-rope": lambda: _encdec(tie_embeddings=False, share_embeddings=False, pos="rope", norm="rmsnorm"),
    "classifier-bert": lambda: _classifier("bert"),
    "classifier-gpt": lambda: _classifier("gpt"),
}


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_muon_gets_exactly_the_hidden_matrices(arch: str) -> None:
    torch.manual_seed(0)
    model, hidden = ARCHITECTURES[arch]()
    opts = build_optimizers(model, OptimConfig(name="muon"), "cpu")
    assert [type(o).__name__ for o in opts] == ["AdamW", "Muon"]
    matrices, gains, muon = names_in(opts, model)
    assert hidden and muon == hidden
    # every trainable parameter is in exactly one group; embeddings and heads are AdamW's matrices
    assert sorted(matrices + gains + muon) == sorted(n for n, _ in model.named_parameters())
    roles = {n: r for n, _, r in roles_of(model)}
    assert all(roles[n] in ("embedding", "head") for n in matrices)
    assert any(roles[n] == "embedding" for n in matrices)
    heads = {n for n in roles if roles[n] == "head"}
    expected_heads = {"bert": {"pooler", "mlm_dense"}, "gpt-untied": {"lm_head"},
                      "encdec-untied-rope": {"lm_head"}}.get(arch, set())
    if arch.startswith("classifier"):
        expected_heads = {"head"} | ({"backbone.pooler", "backbone.mlm_dense"} if arch.endswith("bert") else set())
    assert {n.rsplit(".", 1)[0] for n in heads} == expected_heads


def test_muon_trains_the_encoder_decoder(tmp_path: Path) -> None:
    """Muon (not an AdamW fallback) trains the encoder-decoder's hidden matrices, and the loss falls."""
    from zenlm.recipes.finetune_seq2seq import seq2seq_loss
    from zenlm.train.loop import TrainConfig, fit

    torch.manual_seed(0)
    model = EncoderDecoder(EncDecConfig(**ENCDEC_SHAPE))
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(4, 50, (8, 8), generator=gen)

    def get_batch(step: int, micro: int) -> tuple[torch.Tensor, ...]:  # learn to copy the source
        tgt_in = torch.cat([torch.full((8, 1), 1), rows[:, :-1]], 1)
        return rows, torch.ones_like(rows, dtype=torch.bool), tgt_in, rows

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train = TrainConfig(max_steps=30, eval_every=0, log_every=1, ckpt_every=0, device="cpu", precision="fp32",
                        tensorboard=False)
    res = fit(model, get_batch, seq2seq_loss, tmp_path, train, OptimConfig(name="muon", lr=1e-2, warmup_steps=0))
    ckpt = next((tmp_path / "checkpoints").iterdir())
    assert '"Muon"' in (ckpt / "trainer.json").read_text()
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["train_loss"]
    assert res.train_loss is not None and res.train_loss < 0.5 * first
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert set(hidden_of(model, model.enc_blocks, model.dec_blocks)) <= set(moved)


# --------------------------------------------------------------------------------------------------- wrappers


@pytest.fixture(scope="module")
def process_group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A one-process gloo group on the CPU: enough for DDP and FSDP2 to wrap a model."""
    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def unwrapped(names: list[list[str]], prefix: str = "module.") -> list[list[str]]:
    return [[n.removeprefix(prefix) for n in group] for group in names]


@pytest.mark.usefixtures("process_group")
def test_ddp_gives_the_same_groups() -> None:
    from torch.nn.parallel import DistributedDataParallel

    for make in (ARCHITECTURES["gpt-untied"], ARCHITECTURES["encdec"], ARCHITECTURES["classifier-bert"]):
        model, _ = make()
        plain = build_optimizers(model, OptimConfig(name="muon"), "cpu")
        ddp = DistributedDataParallel(model)
        wrapped = build_optimizers(ddp, OptimConfig(name="muon"), "cpu")
        assert unwrapped(names_in(wrapped, ddp)) == names_in(plain, model)
        assert [p for o in wrapped for g in o.param_groups for p in g["params"]] == \
            [p for o in plain for g in o.param_groups for p in g["params"]]  # the very same tensors


@pytest.mark.usefixtures("process_group")
def test_fsdp2_sharded_model_gives_the_same_groups() -> None:
    from torch.distributed.fsdp import fully_shard

    for make in (ARCHITECTURES["gpt-untied"], ARCHITECTURES["encdec"]):
        model, _ = make()
        expected = names_in(build_optimizers(model, OptimConfig(name="muon"), "cpu"), model)
        for block in [m for m in model.modules() if type(m).__name__.endswith("Block")]:
            fully_shard(block)
        fully_shard(model)
        assert type(model).__name__.startswith("FSDP")  # really sharded: parameters are DTensors now
        assert names_in(build_optimizers(model, OptimConfig(name="muon"), "cpu"), model) == expected


class LoRALinear(nn.Module):
    """A minimal LoRA layer as a wrapper would add it: ``base(x) + x A^T B^T``, the base frozen."""

    param_roles: ClassVar[dict[str, str]] = {"lora_a": "adapter", "lora_b": "adapter"}

    def __init__(self, base: nn.Linear, rank: int = 2) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features) * 0.01)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x @ self.lora_a.T @ self.lora_b.T


def test_lora_adapters_go_to_adamw_and_frozen_weights_nowhere(caplog: pytest.LogCaptureFixture) -> None:
    model = GPT(GPTConfig(**GPT_SHAPE, tie_embeddings=False))
    for block in model.blocks:
        block.attn.qkv = LoRALinear(block.attn.qkv)
    matrices, gains, muon = names_in(build_optimizers(model, OptimConfig(name="muon"), "cpu"), model)
    assert {n for n in matrices if "lora" in n} == {f"blocks.{i}.attn.qkv.lora_{x}" for i in (0, 1) for x in "ab"}
    assert not any("qkv.base" in n for n in matrices + gains + muon)  # frozen: in no optimiser
    assert muon == [n for n in hidden_of(model, model.blocks) if "qkv" not in n]  # the rest still uses Muon
    assert model(torch.randint(0, 50, (1, 4))).shape == (1, 4, 50)

    # everything frozen but the adapters: no hidden matrix is left, AdamW trains the adapters (and says so)
    for n, p in model.named_parameters():
        p.requires_grad_("lora" in n)
    with caplog.at_level(logging.WARNING, logger="zenlm.train.optim"):
        opts = build_optimizers(model, OptimConfig(name="muon"), "cpu")
    assert [type(o).__name__ for o in opts] == ["AdamW"]
    assert sorted(names_in(opts, model)[0]) == sorted(n for n, _ in model.named_parameters() if "lora" in n)
    assert "no trainable hidden matrix" in caplog.text


def test_inner_declarations_win_and_mistakes_are_caught() -> None:
    model = GPT(GPTConfig(**GPT_SHAPE, tie_embeddings=False))
    model.lm_head = LoRALinear(model.lm_head)  # an adapter on the head: the adapter's own declaration wins
    roles = {n: r for n, _, r in roles_of(model)}
    assert roles["lm_head.lora_a"] == "adapter" and "lm_head.base.weight" not in roles

    class Typo(nn.Module):
        param_roles: ClassVar[dict[str, str]] = {"haed": "head"}

        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(2, 2)

    with pytest.raises(AssertionError, match="haed"):
        roles_of(Typo())
