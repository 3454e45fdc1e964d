"""LoRA runs: continued pretraining, classification and seq2seq with --lora, an int8 base, loading for
generation, merge-lora, the CLI, and the inputs that are refused (leaving nothing behind)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import zenlm
import zenlm.seq2seq as s2s
from zenlm.adapter import load_base, merge_lora_run
from zenlm.cli import main
from zenlm.errors import CheckpointError, ConfigError
from zenlm.models.bert import Bert, get_bert_preset
from zenlm.models.int8 import Int8Linear
from zenlm.models.lora import LoRAConfig, has_lora, lora_layers, weights_fingerprint
from zenlm.recipes.finetune_classify import finetune_classify
from zenlm.recipes.finetune_seq2seq import finetune_seq2seq
from zenlm.recipes.pretrain import pretrain
from zenlm.recipes.quantize import quantize_run
from zenlm.rundir import load_run
from zenlm.tokenizer import train_tokenizer
from zenlm.train.checkpoint import save_model
from zenlm.train.loop import TrainConfig
from zenlm.train.optim import OptimConfig

SMALL = dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, block_size=64)


pytestmark = pytest.mark.usefixtures("one_thread")


def _train(steps: int, **kw) -> TrainConfig:
    return TrainConfig(**{"max_steps": steps, "eval_every": 0, "ckpt_every": 0, "log_every": 1, "device": "cpu",
                          "precision": "fp32", "tensorboard": False, **kw})


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in rows if "train_loss" in r]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory, char_data: Path) -> Path:
    """A Llama-layout GPT pretrained briefly on the sample text (char tokens)."""
    out = tmp_path_factory.mktemp("lora") / "base"
    pretrain(char_data, out, model="llama-tiny", model_overrides=SMALL, batch_size=8, seq_len=64,
             train=_train(30), optim=OptimConfig(name="adamw", lr=3e-3, warmup_steps=5))
    return out


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory, char_data: Path, base_run: Path) -> Path:
    out = tmp_path_factory.mktemp("lora") / "cont"
    pretrain(char_data, out, init=base_run, lora=LoRAConfig(rank=4, alpha=8, targets=("attn", "mlp")),
             batch_size=8, seq_len=64, train=_train(25), optim=OptimConfig(name="muon", lr=1e-2, warmup_steps=2))
    return out


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids)


def test_continued_pretraining_with_lora_saves_only_adapters(lora_run: Path, base_run: Path) -> None:
    losses = _losses(lora_run)
    assert losses[-1] < losses[0], losses
    assert (lora_run / "adapter.safetensors").is_file() and not (lora_run / "model.safetensors").exists()
    adapter = load_file(str(lora_run / "adapter.safetensors"))
    assert adapter and all(".lora_a" in k or ".lora_b" in k for k in adapter)
    assert adapter["blocks.0.attn.qkv.lora_a.q.weight"].shape == (4, 64)  # Llama layout: a pair per part
    assert adapter["blocks.0.attn.qkv.lora_b.k.weight"].shape == (32, 4)  # 2 kv heads of 16
    saved = yaml.safe_load((lora_run / "config.yaml").read_text())
    section = saved["lora"]
    assert section == json.loads((lora_run / "adapter_config.json").read_text())
    assert section["base"]["run"] == str(base_run.resolve()) and saved["init"] == str(base_run.resolve())
    assert section["base"]["fingerprint"] == weights_fingerprint(load_base(base_run)[0])
    assert (section["rank"], section["alpha"], section["modules"]["blocks.1.mlp.gate"]) == (4, 8.0, None)
    ckpt = lora_run / "checkpoints" / "step-000025"
    assert set(load_file(str(ckpt / "model.safetensors"))) == set(adapter)  # checkpoints are adapter-sized
    assert (lora_run / "tokenizer.json").read_bytes() == (base_run / "tokenizer.json").read_bytes()


def test_a_lora_run_loads_merged_generates_and_merges_to_a_plain_run(lora_run: Path, base_run: Path,
                                                                      tmp_path: Path) -> None:
    ids = torch.randint(0, 60, (2, 20), generator=torch.Generator().manual_seed(0))
    lm = zenlm.load(lora_run, device="cpu")
    assert not has_lora(lm.model)  # merged into the weights: as fast as the base
    unmerged = load_run(lora_run, device="cpu", merge=False).model
    assert has_lora(unmerged)
    adapted = _logits(unmerged, ids)
    torch.testing.assert_close(_logits(lm.model, ids), adapted)
    assert (adapted - _logits(zenlm.load(base_run, device="cpu").model, ids)).abs().max() > 1e-3
    assert isinstance(lm.generate("ROMEO:", max_new_tokens=8, temperature=0), str)
    merged = merge_lora_run(lora_run, tmp_path / "merged")
    assert (merged / "model.safetensors").is_file() and "lora" not in yaml.safe_load((merged / "config.yaml").read_text())
    torch.testing.assert_close(_logits(zenlm.load(merged, device="cpu").model, ids), adapted)
    with pytest.raises(ConfigError, match="already exists"):
        merge_lora_run(lora_run, merged)
    with pytest.raises(ConfigError, match="not a LoRA run"):
        merge_lora_run(merged, tmp_path / "again")
    with pytest.raises(ConfigError, match="merge it first"):
        quantize_run(lora_run, tmp_path / "q")


def test_resume_continues_a_lora_run(tmp_path: Path, char_data: Path, base_run: Path) -> None:
    out = tmp_path / "r"
    kw = dict(batch_size=4, seq_len=32, optim=OptimConfig(name="adamw", lr=1e-2, warmup_steps=0))
    pretrain(char_data, out, init=base_run, lora=LoRAConfig(rank=2, targets="attn"), train=_train(4), **kw)
    first = load_file(str(out / "adapter.safetensors"))
    res = pretrain(char_data, out, resume=True, train=_train(8), **kw)
    assert res.step == 8
    second = load_file(str(out / "adapter.safetensors"))
    assert set(second) == set(first) and any(not torch.equal(first[k], second[k]) for k in first)


def test_int8_base_with_lora_trains_loads_and_merges(tmp_path: Path, char_data: Path, base_run: Path) -> None:
    """QLoRA-style on a CPU: the base stays int8, only float adapters train."""
    q = quantize_run(base_run, tmp_path / "int8").out
    out = tmp_path / "qlora"
    pretrain(char_data, out, init=q, lora=LoRAConfig(rank=4, targets="all"), batch_size=8, seq_len=64,
             train=_train(20), optim=OptimConfig(name="adamw", lr=1e-2, warmup_steps=2))
    losses = _losses(out)
    assert losses[-1] < losses[0], losses
    assert yaml.safe_load((out / "config.yaml").read_text())["lora"]["base"]["quantization"] == "int8-weight-only"
    lm = zenlm.load(out, device="cpu", dtype="fp32")  # adapters stay beside the int8 layers; fp32 activations
    assert all(isinstance(layer.base, Int8Linear) for _, layer in lora_layers(lm.model))
    ids = torch.randint(0, 60, (1, 16), generator=torch.Generator().manual_seed(1))
    merged = zenlm.load(merge_lora_run(out, tmp_path / "merged"), device="cpu")
    assert not any(isinstance(m, Int8Linear) for m in merged.model.modules())  # float32: W = q * s + s' B A
    torch.testing.assert_close(_logits(merged.model, ids), _logits(lm.model, ids), rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="int8 weights, which cannot be trained"):
        pretrain(char_data, tmp_path / "full", init=q, train=_train(1))
    assert not (tmp_path / "full").exists()


TOPICS = {"sport": "match goal team player coach".split(), "food": "bread cheese soup bake apple".split()}


def test_classify_with_lora_trains_adapters_and_head(tmp_path: Path, base_run: Path) -> None:
    rng = random.Random(0)
    rows = [{"text": " ".join(rng.choices("the a of and to in".split(), k=5) + rng.choices(words, k=3)), "label": k}
            for k, words in TOPICS.items() for _ in range(40)]
    data = tmp_path / "topics.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    res = finetune_classify(base_run, data, tmp_path / "clf", epochs=10, batch_size=8, max_len=48, patience=0,
                            lr=2e-3, train=TrainConfig(device="cpu", precision="fp32", tensorboard=False, seed=0,
                                                       log_every=1),
                            lora=LoRAConfig(rank=4, targets="attn"))
    out = res.run_dir
    losses = _losses(out)
    assert sum(losses[-5:]) < sum(losses[:5]), losses
    adapter = load_file(str(out / "adapter.safetensors"))
    assert {"head.weight", "head.bias"} <= set(adapter)  # the head trains with the adapters
    assert all(k.startswith("head.") or ".lora_" in k for k in adapter)
    clf = zenlm.load(out, device="cpu")
    texts = ["goal team match the", "bread soup the cheese"]
    preds = clf.classify(texts)  # type: ignore[attr-defined]
    merged = zenlm.load(merge_lora_run(out, tmp_path / "merged"), device="cpu")
    again = merged.classify(texts)  # type: ignore[attr-defined]
    assert [p["label"] for p in again] == [p["label"] for p in preds] == ["sport", "food"]
    assert [p["prob"] for p in again] == pytest.approx([p["prob"] for p in preds], abs=1e-5)


def test_classify_with_lora_on_a_bert(tmp_path: Path, wordpiece_tok) -> None:
    torch.manual_seed(0)
    cfg = get_bert_preset("bert-tiny", vocab_size=wordpiece_tok.vocab_size, n_layer=1, d_model=32, n_head=2,
                          d_ff=64, max_len=64)
    base = tmp_path / "bert"
    base.mkdir()
    wordpiece_tok.save(base)
    (base / "config.yaml").write_text(yaml.safe_dump({"model": cfg.to_dict()}))
    save_model(Bert(cfg), base / "model.safetensors")
    rows = [{"text": f"{w} and the {w}", "label": k} for k, words in TOPICS.items() for w in words * 4]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "clf"
    assert main(["finetune", "classify", "--base", str(base), "--data", str(data), "--out", str(out), "--epochs", "1",
                 "--batch-size", "8", "--max-len", "16", "--device", "cpu", "--precision", "fp32", "--lora",
                 "--lora-rank", "2", "--lora-targets", "q", "v"]) == 0
    adapter = load_file(str(out / "adapter.safetensors"))
    assert set(adapter) == {"head.weight", "head.bias", "backbone.blocks.0.qkv.lora_a.q.weight",
                            "backbone.blocks.0.qkv.lora_b.q.weight", "backbone.blocks.0.qkv.lora_a.v.weight",
                            "backbone.blocks.0.qkv.lora_b.v.weight"}
    clf = zenlm.load(out, device="cpu")
    assert not has_lora(clf.model) and clf.classify(["goal"])[0]["label"] in TOPICS  # type: ignore[attr-defined]


def test_seq2seq_with_lora_on_an_encoder_decoder(tmp_path: Path) -> None:
    tok = train_tokenizer(["abcdefgh "], kind="char")
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 6))) for _ in range(200)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"source": w, "target": w[::-1]}) + "\n" for w in words))
    common = dict(batch_size=16, label_smoothing=0.0, val_fraction=0.1,
                  optim=OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=5, weight_decay=0.0))
    finetune_seq2seq(data, tmp_path / "base", model="encdec-tiny", tokenizer=tok, train=_train(15), **common)
    finetune_seq2seq(data, tmp_path / "lora", init=tmp_path / "base", train=_train(25),
                     lora=LoRAConfig(rank=4, targets="all"), **common)
    losses = _losses(tmp_path / "lora")
    assert losses[-1] < losses[0], losses
    adapter = load_file(str(tmp_path / "lora" / "adapter.safetensors"))
    assert any(".cross_attn.kv.lora_a" in k for k in adapter)
    lm = s2s.load(tmp_path / "lora", device="cpu")
    assert not has_lora(lm.model) and isinstance(lm.generate("abc", num_beams=1), str)
    with pytest.raises(ConfigError, match="give the run to adapt with --init"):
        finetune_seq2seq(data, tmp_path / "x", lora=LoRAConfig(), tokenizer=tok, train=_train(1))
    assert not (tmp_path / "x").exists()
    assert main(["finetune", "seq2seq", "--data", str(data), "--init", str(tmp_path / "base"), "--out",
                 str(tmp_path / "cli"), "--max-steps", "2", "--device", "cpu", "--precision", "fp32", "--lora",
                 "--lora-targets", "attn", "--lora-dropout", "0.1"]) == 0
    assert yaml.safe_load((tmp_path / "cli" / "config.yaml").read_text())["lora"]["dropout"] == 0.1


def test_bad_inputs_are_refused_and_leave_nothing(tmp_path: Path, char_data: Path, base_run: Path,
                                                  lora_run: Path) -> None:
    with pytest.raises(ConfigError, match=r"'attn\.c_attn' match no linear layer.*blocks\.\*\.attn\.qkv"):
        pretrain(char_data, tmp_path / "t", init=base_run, lora=LoRAConfig(targets=("attn.c_attn",)),
                 train=_train(1))
    with pytest.raises(ConfigError, match="give the run to adapt with --init"):
        pretrain(char_data, tmp_path / "t", lora=LoRAConfig(), train=_train(1))
    with pytest.raises(ConfigError, match="is a LoRA run.*merge-lora"):
        pretrain(char_data, tmp_path / "t", init=lora_run, train=_train(1))
    assert not (tmp_path / "t").exists()

    def copy_of(run: Path, name: str) -> Path:
        dst = tmp_path / name
        dst.mkdir()
        for f in run.iterdir():
            if f.is_file():
                (dst / f.name).write_bytes(f.read_bytes())
        return dst

    # an adapter that does not fit its base: a tensor of another shape is named
    moved = copy_of(lora_run, "moved")
    adapter = load_file(str(moved / "adapter.safetensors"))
    adapter["blocks.1.attn.proj.lora_a.weight"] = torch.zeros(4, 32)
    save_file(adapter, str(moved / "adapter.safetensors"))
    with pytest.raises(CheckpointError, match=r"tensor 'blocks\.1\.attn\.proj\.lora_a\.weight' has shape \(4, 32\) "
                                              r"but the model expects \(4, 64\).*does not fit the base"):
        zenlm.load(moved, device="cpu")
    # a base with other weights (of the same or of other shapes): the fingerprint tells
    cfg = yaml.safe_load((moved / "config.yaml").read_text())
    for name, n_embd in (("retrained", 64), ("wider", 32)):
        other = tmp_path / name
        pretrain(char_data, other, model="llama-tiny", model_overrides={**SMALL, "n_embd": n_embd}, train=_train(1),
                 batch_size=2, seq_len=16)
        cfg["lora"]["base"]["run"] = str(other)
        (moved / "config.yaml").write_text(yaml.safe_dump(cfg))
        with pytest.raises(CheckpointError, match="not the ones its adapters were trained on"):
            zenlm.load(moved, device="cpu")
    cfg["lora"]["base"]["run"] = str(tmp_path / "gone")
    (moved / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CheckpointError, match="base run .*gone.* is missing"):
        zenlm.load(moved, device="cpu")


def test_cli_lora_pretrain_generate_merge(tmp_path: Path, char_data: Path, base_run: Path, capsys) -> None:
    out, merged = tmp_path / "cli", tmp_path / "cli-merged"
    common = ["--data", str(char_data), "--init", str(base_run), "--out", str(out), "--max-steps", "3",
              "--batch-size", "2", "--seq-len", "16", "--device", "cpu", "--precision", "fp32", "--eval-every", "0",
              "--eval-tokens", "256"]
    assert main(["pretrain", *common, "--lora-rank", "2"]) == 2
    assert "add --lora" in capsys.readouterr().err
    assert main(["pretrain", *common, "--lora", "--lora-targets", "nothing"]) == 2
    assert "'nothing' match no linear layer" in capsys.readouterr().err and not out.exists()
    assert main(["pretrain", *common, "--lora", "--lora-rank", "2", "--lora-alpha", "4", "--lora-targets", "q",
                 "v"]) == 0
    section = yaml.safe_load((out / "config.yaml").read_text())["lora"]
    assert (section["rank"], section["alpha"], section["modules"]["blocks.0.attn.qkv"]) == (2, 4.0, ["q", "v"])
    assert main(["generate", str(out), "ROMEO:", "--max-new-tokens", "4", "--temperature", "0", "--device",
                 "cpu"]) == 0
    assert main(["merge-lora", str(out), "--out", str(merged)]) == 0
    assert (merged / "model.safetensors").is_file()


def test_chat_and_serve_a_lora_run(lora_run: Path, monkeypatch, capsys) -> None:
    """zenlm chat and the OpenAI-compatible server load a LoRA run like any run: the served text is the merged
    model's, through the official client."""
    import io

    import openai

    from zenlm.serve.app import ServerThread, create_app

    monkeypatch.setattr("sys.stdin", io.StringIO("ROMEO\n/quit\n"))
    assert main(["chat", str(lora_run), "--temperature", "0", "--max-new-tokens", "6", "--device", "cpu"]) == 0
    assert "assistant: " in capsys.readouterr().out
    lm = zenlm.load(lora_run, device="cpu")
    want = lm.generate("ROMEO:", max_new_tokens=8, temperature=0)
    app = create_app(lm.model, lm.tokenizer, model_id="lora", max_concurrency=2, max_queue=2, model_kind="base")
    with ServerThread(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=30)
        got = client.completions.create(model="lora", prompt="ROMEO:", max_tokens=8, temperature=0)
    assert got.choices[0].text == want


def test_a_lora_run_is_reproducible_and_two_fsdp_processes_compute_it(tmp_path: Path) -> None:
    """The adapters start from the run's seed (their random A matrices were drawn before the run seeded the
    generator: the same command gave different adapters), and two FSDP2 processes compute the very run of one,
    trained token rows included."""
    import os
    import subprocess
    import sys

    from zenlm.data.corpus import shakespeare_char_text

    fixture = Path(__file__).parent / "fixtures" / "runs" / "gpt"
    (tmp_path / "c.txt").write_text(shakespeare_char_text()[:60_000], encoding="utf-8")
    assert main(["prepare", "--corpus", str(tmp_path / "c.txt"), "--tokenizer", str(fixture),
                 "--out", str(tmp_path / "data")]) == 0
    args = ["pretrain", "--data", str(tmp_path / "data"), "--init", str(fixture), "--lora", "--lora-tokens",
            "<|eos|>", "--grad-accum", "2", "--max-steps", "4", "--batch-size", "4", "--device", "cpu",
            "--threads", "1"]
    for name in ("one", "again"):
        assert main([*args, "--out", str(tmp_path / name)]) == 0
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "zenlm",
                          *args, "--strategy", "fsdp", "--out", str(tmp_path / "fsdp")], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    want = load_file(str(tmp_path / "one" / "adapter.safetensors"))
    assert {"tok_emb.rows", "lm_head.rows"} <= set(want)
    for name in ("again", "fsdp"):
        got = load_file(str(tmp_path / name / "adapter.safetensors"))
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=lambda m, k=k, n=name: f"{n} {k}: {m}")
