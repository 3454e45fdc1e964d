"""Lean loading (zenlm.rundir.load_run, zenlm.load): the model is built on the meta device and each tensor is
read from model.safetensors straight into its chosen dtype (converted or quantised a block of rows at a time),
so a process holds the weights once. Checked by the peak memory of processes that load a ~240 MB run, by
comparing every tensor with the usual way of loading, and by damaged files that are refused by name.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import zenlm
import zenlm.device
from zenlm.config import GPTConfig
from zenlm.errors import CheckpointError, ConfigError
from zenlm.models.gpt import GPT
from zenlm.models.int8 import quantize_int8
from zenlm.models.layers import NarrowLinear
from zenlm.tokenizer import train_tokenizer
from zenlm.train.checkpoint import save_model

# VmHWM, the peak resident memory of this process's own address space (ru_maxrss would start at the peak of the
# process that started this one: the test runner's). VmHWM counts the pages of libtorch's code as well, and a
# first load pages in ~20 MB of it (the conversion and quantisation kernels, which differ from CPU to CPU): a
# small run is loaded the same way first, so the baseline has them and the difference is the weights alone.
PEAK = """
import json, sys
import torch, zenlm, zenlm.api, zenlm.rundir  # everything loading runs, imported before the baseline
zenlm.load(sys.argv[3], device="cpu", dtype=sys.argv[2])  # the same code paths, on a tiny run

def hwm():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM"))

base = hwm()  # KiB: everything imported, nothing loaded
lm = zenlm.load(sys.argv[1], device="cpu", dtype=sys.argv[2])
peak = hwm()
seen, weights = set(), 0
for t in [*lm.model.parameters(), *lm.model.buffers()]:
    if t.data_ptr() not in seen:
        seen.add(t.data_ptr())
        weights += t.numel() * t.element_size()
print(json.dumps({"extra": (peak - base) * 1024, "weights": weights}))
"""


def write_run(root: Path, cfg: GPTConfig, seed: int = 0) -> GPT:
    tok = train_tokenizer(["To be, or not to be, that is the question. " * 20], kind="char")
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(yaml.safe_dump({"model": model.config.to_dict()}, sort_keys=False))
    tok.save(root)
    save_model(model, root / "model.safetensors")
    return model


@pytest.fixture(scope="module")
def big_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of ~240 MB of fp32 weights (59M parameters: vocabulary 8192, width 1024, 4 layers), and beside it
    (``warm``) a tiny run of the same design that the peak-memory script loads first."""
    root = tmp_path_factory.mktemp("lean")
    write_run(root / "warm", GPTConfig(vocab_size=256, block_size=64, n_layer=1, n_head=2, n_embd=64))
    write_run(root / "run", GPTConfig(vocab_size=8192, block_size=256, n_layer=4, n_head=8, n_embd=1024))
    return root / "run"


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmHWM from Linux's /proc")
@pytest.mark.parametrize("dtype", ["auto", "bf16", "int8"])
def test_loading_holds_the_weights_once(big_run: Path, dtype: str) -> None:
    """The memory a process gains while loading stays within 1.2x the loaded weights' bytes (plus a little
    for Python objects): a second full copy (a random initialisation, the file read whole, fp32 tensors kept
    beside the converted ones) would need 2x and more."""
    # glibc's malloc raises its mmap threshold as large blocks are freed, after which it keeps freed blocks in
    # its heap: how much of the reading and quantising buffers stays resident then varies from run to run
    # (int8: 62-84 MB here for 59 MB of weights). A fixed threshold (glibc's default start value) leaves the
    # allocator out of the measurement: 61.6 MB, every run.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    res = subprocess.run([sys.executable, "-c", PEAK, str(big_run), dtype, str(big_run.parent / "warm")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout.strip().splitlines()[-1])
    file_bytes = (big_run / "model.safetensors").stat().st_size
    assert r["weights"] == pytest.approx(file_bytes / {"auto": 1, "bf16": 2, "int8": 4}[dtype], rel=0.05)
    assert r["extra"] <= 1.2 * r["weights"] + 10e6, (r, file_bytes)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GPT]:
    root = tmp_path_factory.mktemp("lean") / "small"
    cfg = GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, pos="rope",
                    norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False, init_std=0.3)
    return root, write_run(root, cfg)


def test_every_tensor_equals_the_usual_way_of_loading(small_run: tuple[Path, GPT]) -> None:
    root, model = small_run
    want = model.state_dict()
    fp32 = zenlm.load(root, device="cpu").model
    assert all(torch.equal(fp32.state_dict()[k], v) for k, v in want.items())
    assert all(not t.is_meta for t in [*fp32.parameters(), *fp32.buffers()])
    torch.testing.assert_close(fp32.rotary.cos, model.rotary.cos, rtol=0, atol=0)  # computed, not loaded
    bf16 = zenlm.load(root, device="cpu", dtype="bf16").model.state_dict()
    if zenlm.device.cpu_has_bf16():  # bf16 activations: every tensor as model.to(bf16) has it
        assert all(torch.equal(bf16[k], v.to(torch.bfloat16)) for k, v in want.items())
    # int8 while loading, a block of rows at a time: the int8 matrices and scales of quantize_int8
    q = zenlm.load(root, device="cpu", dtype="int8").model.state_dict()
    act = torch.bfloat16 if zenlm.device.cpu_has_bf16() else torch.float32
    ref = quantize_int8(copy.deepcopy(model)).state_dict()
    assert set(q) == set(ref)
    for k, v in ref.items():
        assert torch.equal(q[k], v.to(act) if v.is_floating_point() else v), k


def test_int8_and_bf16_on_a_cpu_without_native_bf16_compute_in_fp32(small_run, monkeypatch) -> None:
    root, model = small_run
    monkeypatch.setattr(zenlm.device, "cpu_has_bf16", lambda: False)
    x = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        want = model(x)
    bf16 = zenlm.load(root, device="cpu", dtype="bf16")
    assert bf16.precision.weights == "bf16" and bf16.precision.activations == "fp32"
    m = bf16.model
    assert isinstance(m.blocks[0].mlp.up, NarrowLinear) and m.blocks[0].mlp.up.weight.dtype == torch.bfloat16
    assert m.tok_emb.weight.dtype == torch.bfloat16 and m.norm_f.weight.dtype == torch.float32
    assert m.make_cache(1).dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(m(x), want, atol=0.05, rtol=0.05)  # bf16 weights, fp32 sums
    int8 = zenlm.load(root, device="cpu", dtype="int8")
    assert int8.precision.activations == "fp32" and int8.model.norm_f.weight.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(int8.model(x), want, atol=0.1, rtol=0.1)
    greedy = dict(max_new_tokens=8, temperature=0, compile=False)
    for lm in (bf16, int8):
        assert len(lm.generate("To be", **greedy)) > 0


def test_damaged_weights_are_refused_by_name(small_run, tmp_path: Path) -> None:
    root, model = small_run
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in root.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    data = (root / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) - 100])  # truncated
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        zenlm.load(bad, device="cpu")
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        zenlm.load(bad, device="cpu")
    broken = {k: v.clone() for k, v in model.state_dict().items()}
    broken["blocks.1.mlp.up.weight"][0, 0] = float("nan")
    save_model_dict(broken, bad / "model.safetensors")
    for dtype in ("auto", "bf16", "int8"):
        with pytest.raises(CheckpointError, match="blocks.1.mlp.up.weight.*NaN"):
            zenlm.load(bad, device="cpu", dtype=dtype)
    del broken["norm_f.weight"]
    save_model_dict(broken, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing keys.*norm_f.weight"):
        zenlm.load(bad, device="cpu")
    with pytest.raises(ConfigError, match="dtype 'int4' is not supported"):
        zenlm.load(root, device="cpu", dtype="int4")


def save_model_dict(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path))


@pytest.mark.parametrize("dtype", ["auto", "int8"])
def test_loading_does_not_import_the_compiler(small_run, dtype: str) -> None:
    """Building the model on the meta device computes nothing: computing the rotary tables there went through
    PyTorch's Python reference kernels, which import the compiler (~75 MB of resident memory, a second)."""
    script = ("import sys, zenlm\n"
              "lm = zenlm.load(sys.argv[1], device='cpu', dtype=sys.argv[2])\n"
              "assert lm.model.rotary.cos.device.type == 'cpu'\n"
              "print(sorted(m for m in ('torch._dynamo', 'torch._inductor', 'sympy') if m in sys.modules))\n")
    res = subprocess.run([sys.executable, "-c", script, str(small_run[0]), dtype], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "ZENLM_COMPILE": "0"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "[]"
