"""How "auto" picks a compute precision: bf16 only where the hardware computes it natively."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

import zenlm
import zenlm.device as device_mod
from zenlm.device import cpu_features, hardware_choices, resolve_precision
from zenlm.errors import ConfigError

CPU = torch.device("cpu")


@pytest.fixture
def fake_cpu(monkeypatch: pytest.MonkeyPatch):
    """Pretend to be another CPU: set PyTorch's feature checks (and /proc/cpuinfo's flags) to given values."""

    def set_cpu(*, avx512: bool = False, avx512_bf16: bool = False, amx: bool = False, machine: str = "x86_64",
                cpuinfo: set[str] | None = None, mkldnn_bf16: bool = True, capability: str = "AVX512") -> None:
        checks = {"_is_avx512_supported": avx512, "_is_avx512_bf16_supported": avx512_bf16,
                  "_is_amx_tile_supported": amx}
        for name, value in checks.items():
            monkeypatch.setattr(torch.cpu, name, lambda v=value: v, raising=False)
        # oneDNN says "bf16 supported" on any AVX-512 CPU (it emulates it): auto must not listen to it
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: mkldnn_bf16, raising=False)
        monkeypatch.setattr(device_mod.platform, "machine", lambda: machine)
        monkeypatch.setattr(device_mod, "_cpuinfo_flags", lambda: set(cpuinfo or ()))
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        cpu_features.cache_clear()

    yield set_cpu
    cpu_features.cache_clear()


@pytest.mark.parametrize(
    ("features", "expected"),
    [
        # the CPU of the report: AVX-512 without BF16 or AMX, oneDNN emulating bf16 -> fp32
        (dict(avx512=True, avx512_bf16=False, amx=False, mkldnn_bf16=True), "fp32"),
        (dict(avx512=True, avx512_bf16=True, amx=False), "bf16"),  # Cooper Lake, Zen 4 and later
        (dict(avx512=True, avx512_bf16=True, amx=True), "bf16"),  # Sapphire Rapids
        (dict(avx512=True, avx512_bf16=False, amx=True), "bf16"),  # AMX tiles alone suffice
        (dict(avx512=False, capability="AVX2", mkldnn_bf16=False), "fp32"),  # AVX2 only
        (dict(machine="aarch64", cpuinfo={"fp", "asimd", "bf16"}, capability="DEFAULT"), "bf16"),  # ARM + BF16
        (dict(machine="aarch64", cpuinfo={"fp", "asimd"}, capability="DEFAULT"), "fp32"),  # ARM without it
        (dict(machine="x86_64", cpuinfo={"bf16"}), "fp32"),  # an x86 cpuinfo flag is not ARM's extension
    ],
)
def test_auto_precision_follows_native_bf16(fake_cpu, features: dict, expected: str) -> None:
    fake_cpu(**features)
    assert resolve_precision("auto", CPU) == expected
    assert device_mod.cpu_has_bf16() == (expected == "bf16")
    choice = hardware_choices(CPU, "auto")
    assert choice.precision == expected
    assert (", native bf16" in choice.line()) == (expected == "bf16")
    assert choice.to_dict()["cpu"]["native_bf16"] == (expected == "bf16")


def test_explicit_precision_wins_and_emulated_bf16_is_flagged(fake_cpu) -> None:
    fake_cpu(avx512=True, avx512_bf16=False, amx=False)
    choice = hardware_choices(CPU, "bf16")
    assert choice.precision == "bf16" and choice.requested_precision == "bf16"
    assert "emulates bf16" in choice.line() and "as asked" in choice.line()
    assert hardware_choices(CPU, "fp32").note == ""
    fake_cpu(avx512=True, avx512_bf16=True)
    assert hardware_choices(CPU, "bf16").note == ""  # native: nothing to warn about


def test_line_names_hardware_precision_and_threads(fake_cpu) -> None:
    fake_cpu(avx512=True)
    line = hardware_choices(CPU, "auto").line()
    n = torch.get_num_threads()
    assert line == f"cpu: AVX-512, no native bf16 -> fp32 (chosen by --precision auto), {n} thread" + (
        "s" if n != 1 else "")


def test_cuda_and_bad_values(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", cuda) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", cuda) == "fp16"
    assert resolve_precision("auto", torch.device("mps")) == "fp32"
    with pytest.raises(ConfigError, match="fp16 is not supported on the CPU"):
        resolve_precision("fp16", CPU)
    with pytest.raises(ConfigError, match="choose auto, fp32, bf16 or fp16"):
        resolve_precision("int8", CPU)


def test_fit_shows_the_choice_and_saves_it_in_config_yaml(fake_cpu, tmp_path: Path) -> None:
    """A run on a CPU without native bf16 trains in fp32 under "auto", says so once, and records it."""
    from zenlm.models.gpt import GPT
    from zenlm.presets import get_preset
    from zenlm.recipes.pretrain import causal_lm_loss
    from zenlm.train.loop import TrainConfig, fit
    from zenlm.train.optim import OptimConfig

    fake_cpu(avx512=True, avx512_bf16=False, amx=False)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": {"arch": "gpt"}, "train": {"precision": "auto"}}))
    torch.manual_seed(0)
    model = GPT(get_preset("tiny", vocab_size=32, block_size=16))
    data = torch.randint(0, 32, (4, 17))
    seen: list[str] = []
    autocast_dtypes: list[torch.dtype | None] = []

    def loss_fn(m, batch):
        autocast_dtypes.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return causal_lm_loss(m, batch)

    fit(model, lambda s, m: (data[:, :-1], data[:, 1:]), loss_fn, tmp_path,
        TrainConfig(max_steps=2, eval_every=0, ckpt_every=0, device="cpu", precision="auto", tensorboard=False),
        OptimConfig(warmup_steps=0), progress=lambda p: seen.append(p.message or ""))
    assert autocast_dtypes == [None, None]  # fp32: no autocast
    lines = [m for m in seen if m.startswith("cpu: ")]
    assert lines == [f"cpu: AVX-512, no native bf16 -> fp32 (chosen by --precision auto), "
                     f"{torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''}"]
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["resolved"]["precision"] == "fp32"
    assert saved["resolved"]["requested_precision"] == "auto"
    assert saved["resolved"]["cpu"]["avx512"] is True and saved["resolved"]["cpu"]["native_bf16"] is False
    assert saved["train"] == {"precision": "auto"}  # what was asked stays as it was
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; GNU OpenMP is torch's runtime on Linux")
@pytest.mark.parametrize("keep", ["", "0", "1"])
def test_release_openmp_workers_lets_the_calling_threads_pool_go(keep):
    """In a fresh process (its OpenMP state is its own): after a parallel region on 2 threads the main thread
    keeps one worker thread; release_openmp_workers ends it (and a later region starts one again), unless
    $ZENLM_KEEP_OPENMP_WORKERS says to keep it (1; 0 releases, as unset)."""
    code = textwrap.dedent("""
        import os, torch
        from zenlm.device import release_openmp_workers
        torch.set_num_threads(2)
        x = torch.randn(4_000_000)
        def tasks():
            return len(os.listdir(f"/proc/{os.getpid()}/task"))
        x.exp()
        before = tasks()
        released = release_openmp_workers()
        after = tasks()
        x.exp()
        print(released, before - after, tasks() - after)
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(zenlm.__file__).parents[1])}
    env.pop("ZENLM_KEEP_OPENMP_WORKERS", None)
    if keep:
        env["ZENLM_KEEP_OPENMP_WORKERS"] = keep
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == (["False", "0", "0"] if keep == "1" else ["True", "1", "1"])


@pytest.mark.parametrize(("value", "want"), [("1", True), (" Yes ", True), ("on", True), ("TRUE", True),
                                             ("0", False), ("off", False), ("No", False), ("false", False),
                                             ("", None), ("maybe", None), (None, None)])
def test_env_switch_reads_the_projects_on_off_spellings(monkeypatch, value, want):
    from zenlm.device import env_switch

    if value is None:
        monkeypatch.delenv("ZENLM_TEST_SWITCH", raising=False)
    else:
        monkeypatch.setenv("ZENLM_TEST_SWITCH", value)
    assert env_switch("ZENLM_TEST_SWITCH") is want


def _anon_kb() -> int:
    """This process's resident anonymous memory in kB (/proc/self/status)."""
    return next(int(x.split()[1]) for x in Path("/proc/self/status").read_text().splitlines()
                if x.startswith("RssAnon:"))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's /proc/self/status")
def test_a_kv_cache_costs_memory_only_for_the_positions_written() -> None:
    """A CPU cache for a whole context is not resident until written: reading never-written positions (the
    compiled step reads whole blocks of key slots) costs nothing, and each position written costs its pages."""
    from zenlm.config import GPTConfig
    from zenlm.models.gpt import GPT

    model = GPT(GPTConfig(vocab_size=64, block_size=1024, n_layer=2, n_head=4, n_embd=256)).eval()
    before = _anon_kb()
    cache = model.make_cache(8, 1024)  # 4 buffers of 8 rows x 4 heads x 1024 positions x 64 floats: 32 MiB
    assert all(t.dtype == torch.float32 and t.is_contiguous() and t.data_ptr() % 4096 == 0
               for t in cache.k + cache.v)
    assert _anon_kb() - before < 4096  # made: (almost) nothing resident
    assert all(float(t.sum()) == 0.0 for t in cache.k + cache.v)  # zeros, read in full ...
    assert _anon_kb() - before < 4096  # ... and still (almost) nothing resident
    with torch.inference_mode():
        model(torch.randint(0, 64, (8, 10)), cache=cache)
    # 10 positions of 256 bytes in each of the 32 (row, head) planes of 256 KiB of 4 buffers: one page each
    assert _anon_kb() - before < 4096
    assert all(t[:, :, :10].abs().sum() > 0 and t[:, :, 10:].abs().sum() == 0 for t in cache.k + cache.v)
    small = device_mod.lazy_zeros((4, 4), dtype=torch.bfloat16)  # small tensors: plain torch.zeros
    assert small.dtype == torch.bfloat16 and small.sum() == 0
    big = device_mod.lazy_zeros((1 << 20,), dtype=torch.int8)  # a map of its own
    big[7] = 3  # the tensor keeps its memory alive by itself
    import gc

    gc.collect()
    assert int(big.sum()) == 3
    cache.k[0].fill_(1.0)  # written in full: resident in full (8 MiB) in the buffer's own map ...
    assert int(_smaps(cache.k[0].data_ptr(), "Anonymous:")[0]) >= 8192
    # ... and the measure above sees it beyond its bound of 4 MiB (not all 8: memory freed elsewhere in this
    # process meanwhile lowers its count; a full run once saw 6.4 MiB)
    assert _anon_kb() - before > 4096


def _smaps(address: int, field: str) -> list[str]:
    """The values of ``field`` (e.g. "VmFlags:", "Anonymous:") of the mapping of this process that holds
    ``address`` (Linux's /proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(a, 16) for a in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == field:
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def _vm_flags(address: int) -> set[str]:
    return set(_smaps(address, "VmFlags:"))


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage/enabled").exists(),
                    reason="a Linux kernel with transparent huge pages")
def test_a_cache_reserved_whole_asks_for_huge_pages_and_one_reserved_in_part_does_not() -> None:
    from zenlm.models.cache import KVCache

    pool = KVCache(1, 2, 2, 2048, 256, dtype=torch.float32)  # 8 MiB a buffer
    part = KVCache(1, 2, 2, 2048, 256, dtype=torch.float32)
    assert "hg" not in _vm_flags(pool.k[0].data_ptr() + (4 << 20))
    pool.reserve(slice(None), 0, 2048)  # the server's pool, generate_batch's: every row, every position
    part.reserve(0, 0, 100)  # generate's: the positions one sequence will fill
    for t in pool.k + pool.v:
        assert "hg" in _vm_flags(t.data_ptr() + (4 << 20))  # "hg": advised MADV_HUGEPAGE
        assert t.abs().sum() == 0
    assert all("hg" not in _vm_flags(t.data_ptr() + (4 << 20)) for t in part.k + part.v)
    assert not device_mod.advise_huge_pages(torch.zeros(1000))  # less than one huge page
    assert not device_mod.advise_huge_pages(pool.k[0].transpose(1, 2))  # not contiguous
