"""PEFT interop: LoRA runs exported as PEFT adapters and PEFT adapters imported as LoRA runs, with the same fp32
logits as ``peft.PeftModel`` on the exported base, and ``merge_and_unload`` equal to ``zenlm merge-lora``, for
the GPT-2 (fused c_attn, Conv1D) and Llama (separate q/k/v, grouped-query) layouts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import zenlm
from zenlm.adapter import load_base, lora_section, merge_lora_run, write_lora_run
from zenlm.cli import main
from zenlm.convert.hf import export_hf
from zenlm.convert.peft import export_peft, import_peft
from zenlm.errors import ConfigError, DataError
from zenlm.models.gpt import GPT
from zenlm.models.lora import LoRAConfig, adapter_state_dict, apply_lora, weights_fingerprint
from zenlm.presets import get_preset
from zenlm.tokenizer import Tokenizer
from zenlm.train.checkpoint import save_model

tf = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

V = 640  # the session tokenizer has 600 tokens
SHAPES = {
    "gpt2": ("classic-char", dict(n_layer=2, n_embd=32, n_head=4, block_size=32)),
    "llama": ("llama-tiny", dict(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, block_size=32, mlp_hidden=48)),
}
# what PEFT users typically adapt: GPT-2's fused c_attn and the MLP input; Llama's q and v (not k), o and down
PEFT_TARGETS = {"gpt2": ["c_attn", "c_fc"], "llama": ["q_proj", "v_proj", "o_proj", "down_proj"]}
OUR_TARGETS = {"gpt2": ("all",), "llama": ("q", "v", "attn.proj", "mlp")}


def _base_run(out: Path, layout: str, tok: Tokenizer, **overrides: int) -> Path:
    """A base run with random weights (and nonzero norm gains/biases, so every tensor matters)."""
    preset, fields = SHAPES[layout]
    torch.manual_seed(0)
    model = GPT(get_preset(preset, vocab_size=V, **{**fields, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    out.mkdir(parents=True)
    tok.save(out)
    (out / "config.yaml").write_text(yaml.safe_dump({"model": model.config.to_dict(), "objective": "causal-lm"}))
    save_model(model, out / "model.safetensors")
    return out


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def layout(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def base(layout: str, tmp_path_factory: pytest.TempPathFactory, bpe_tok: Tokenizer) -> tuple[Path, Path]:
    """(our base run, its transformers export)."""
    root = tmp_path_factory.mktemp(f"peft-{layout}")
    run = _base_run(root / "base", layout, bpe_tok)
    return run, export_hf(run, root / "base-hf")


def _ids() -> torch.Tensor:
    return torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(0))


def _hf(path: Path) -> torch.nn.Module:
    return tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _ours(run: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return zenlm.load(run, device="cpu").model(ids)


def _trained_lora_run(base_run: Path, out: Path, cfg: LoRAConfig) -> Path:
    """A LoRA run whose A and B have random values, as after training."""
    model, base_saved = load_base(base_run)
    fingerprint = weights_fingerprint(model)
    section = lora_section(cfg, apply_lora(model, cfg), base_run, fingerprint, base_saved)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapter_state_dict(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return write_lora_run(out, {"model": base_saved["model"], "objective": "causal-lm", "lora": section},
                          adapter_state_dict(model), base_run)


def test_export_loads_in_peft_with_equal_logits_and_merges_equally(layout: str, base: tuple[Path, Path],
                                                                    tmp_path: Path) -> None:
    base_run, base_hf = base
    run = _trained_lora_run(base_run, tmp_path / "lora", LoRAConfig(rank=4, alpha=8, targets=OUR_TARGETS[layout]))
    out = export_peft(run, tmp_path / "peft", base_model=str(base_hf))
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"]) == ("LORA", "CAUSAL_LM", 4, 8.0)
    assert config["base_model_name_or_path"] == str(base_hf)
    assert config["fan_in_fan_out"] is (layout == "gpt2")
    assert sorted(config["target_modules"]) == sorted(
        ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"] if layout == "gpt2" else
        ["self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"])
    ids = _ids()
    model = peft.PeftModel.from_pretrained(_hf(base_hf), out).eval()
    with torch.no_grad():
        theirs = model(ids).logits
    ours = _ours(run, ids)
    torch.testing.assert_close(ours, theirs)
    with torch.no_grad():
        assert (theirs - _hf(base_hf)(ids).logits).abs().max() > 1e-3  # the adapters do change the model
    # merge_and_unload == merge-lora: the same weights, tensor by tensor, and the same logits
    merged_theirs = model.merge_and_unload()
    merged_ours = export_hf(merge_lora_run(run, tmp_path / "merged"), tmp_path / "merged-hf")
    ours_sd = load_file(str(merged_ours / "model.safetensors"))
    theirs_sd = merged_theirs.state_dict()
    for name, t in ours_sd.items():
        torch.testing.assert_close(t, theirs_sd[name], msg=name)
    with torch.no_grad():
        torch.testing.assert_close(_ours(tmp_path / "merged", ids), merged_theirs(ids).logits)
    # the CLI writes the same adapter
    assert main(["convert", "to-hf", str(run), "--out", str(tmp_path / "cli"), "--base-model", "my/base"]) == 0
    assert json.loads((tmp_path / "cli" / "adapter_config.json").read_text())["base_model_name_or_path"] == "my/base"
    a, b = load_file(str(out / "adapter_model.safetensors")), load_file(str(tmp_path / "cli" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="is a LoRA run: export its adapters as a PEFT adapter"):
        export_hf(run, tmp_path / "via-export-hf")


@pytest.mark.parametrize("rslora", [False, True])
def test_import_of_a_peft_adapter_gives_peft_logits_and_round_trips(layout: str, base: tuple[Path, Path],
                                                                    tmp_path: Path, rslora: bool) -> None:
    base_run, base_hf = base
    torch.manual_seed(2)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=PEFT_TARGETS[layout],
                          task_type="CAUSAL_LM", init_lora_weights=False, use_rslora=rslora,
                          fan_in_fan_out=layout == "gpt2")  # GPT-2's Conv1D layers
    model = peft.get_peft_model(_hf(base_hf), cfg).eval()
    model.save_pretrained(tmp_path / "theirs")
    run = import_peft(tmp_path / "theirs", base_run, tmp_path / "run")
    ids = _ids()
    with torch.no_grad():
        theirs = model(ids).logits
        assert (theirs - _hf(base_hf)(ids).logits).abs().max() > 1e-3  # B is not zero: the adapter does something
    torch.testing.assert_close(_ours(run, ids), theirs)
    section = yaml.safe_load((run / "config.yaml").read_text())["lora"]
    assert section["alpha"] == pytest.approx(8 * 2.0 if rslora else 8)  # rsLoRA: alpha / sqrt(r) = alpha' / r
    if layout == "llama":  # q and v adapted, k not: one pair per adapted part of our fused projection
        assert section["modules"]["blocks.0.attn.qkv"] == ["q", "v"]
    # back to PEFT: the very same tensors, and the same logits
    export_peft(run, tmp_path / "again")
    a, b = load_file(str(tmp_path / "theirs" / "adapter_model.safetensors")), \
        load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        again = peft.PeftModel.from_pretrained(_hf(base_hf), tmp_path / "again").eval()(ids).logits
    torch.testing.assert_close(again, theirs)


def _edit(src: Path, dst: Path, **changes: object) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def test_unsupported_adapters_are_refused_naming_the_field(base: tuple[Path, Path], layout: str, tmp_path: Path,
                                                           bpe_tok: Tokenizer) -> None:
    base_run, base_hf = base
    model = peft.get_peft_model(_hf(base_hf), peft.LoraConfig(r=2, target_modules=PEFT_TARGETS[layout][:1],
                                                              fan_in_fan_out=layout == "gpt2"))
    model.save_pretrained(tmp_path / "ok")
    for field, value in [("peft_type", "PREFIX_TUNING"), ("use_dora", True), ("task_type", "SEQ_CLS"),
                         ("modules_to_save", ["score"]), ("rank_pattern", {"c_attn": 8}), ("bias", "all")]:
        bad = _edit(tmp_path / "ok", tmp_path / f"bad-{field}", **{field: value})
        with pytest.raises(ConfigError, match=f"{field}=.* is not supported"):
            import_peft(bad, base_run, tmp_path / "out")
        assert not (tmp_path / "out").exists()
    # an adapter for a wider base: its tensors do not fit this one
    wide = _base_run(tmp_path / "wide", layout, bpe_tok, n_embd=64)
    with pytest.raises(DataError, match=r"lora_A\.weight has shape \(2, 32\), but the base .*wide with r=2 needs "
                                        r"\(2, 64\)"):
        import_peft(tmp_path / "ok", wide, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
    # the CLI: a PEFT directory needs --base
    assert main(["convert", "from-hf", str(tmp_path / "ok"), "--out", str(tmp_path / "out")]) == 2
    assert main(["convert", "from-hf", str(tmp_path / "ok"), "--base", str(base_run), "--out",
                 str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "adapter.safetensors").is_file()


def test_split_adapters_cannot_become_gpt2s_single_c_attn_pair(tmp_path: Path, bpe_tok: Tokenizer) -> None:
    base_run = _base_run(tmp_path / "base", "gpt2", bpe_tok)
    run = _trained_lora_run(base_run, tmp_path / "split", LoRAConfig(rank=2, targets="qkv", qkv="split"))
    with pytest.raises(ConfigError, match="one LoRA pair per part.*qkv='fused'"):
        export_peft(run, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_trainable_token_rows_round_trip_through_peft(layout: str, base: tuple[Path, Path], tmp_path: Path) -> None:
    """LoRA with trainable token rows is PEFT's trainable_token_indices: exported, PEFT computes our logits
    (the chosen tokens in the input and in the output), merges to our merge-lora, and the import gives the
    same tensors back."""
    base_run, base_hf = base
    tokens = (1, 5, 9)
    run = _trained_lora_run(base_run, tmp_path / "lora", LoRAConfig(rank=4, alpha=8, targets=OUR_TARGETS[layout],
                                                                     tokens=tokens))
    out = export_peft(run, tmp_path / "peft", base_model=str(base_hf))
    config = json.loads((out / "adapter_config.json").read_text())
    tied = layout == "gpt2"
    assert config["trainable_token_indices"] == (
        list(tokens) if tied else {"embed_tokens": list(tokens), "lm_head": list(tokens)})
    ids = _ids()
    ids[:, ::4] = 5  # a chosen token in the input
    model = peft.PeftModel.from_pretrained(_hf(base_hf), out).eval()
    with torch.no_grad():
        theirs = model(ids).logits
    torch.testing.assert_close(_ours(run, ids), theirs)
    merged_theirs = model.merge_and_unload()
    merge_lora_run(run, tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(_ours(tmp_path / "merged", ids), merged_theirs(ids).logits)
    back = import_peft(out, base_run, tmp_path / "back")
    assert yaml.safe_load((back / "config.yaml").read_text())["lora"]["tokens"] == list(tokens)
    torch.testing.assert_close(_ours(back, ids), theirs)
    export_peft(back, tmp_path / "again", base_model=str(base_hf))
    a, b = load_file(str(out / "adapter_model.safetensors")), load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any("trainable_tokens_delta" in k for k in a)
    # the ids name tokens the tensors do not fit: refused, naming the field
    bad = _edit(out, tmp_path / "bad", trainable_token_indices=[1, 5])
    with pytest.raises(DataError, match="trainable token rows"):
        import_peft(bad, base_run, tmp_path / "out")
    assert not (tmp_path / "out").exists()
