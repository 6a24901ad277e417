"""dpokit.cpu_memory: freed activation-sized blocks leave the process during CPU training (glibc only)."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

import dpokit.api as api
from dpokit.config import TrainConfig

SRC = str(Path(__file__).resolve().parents[1] / "src")
glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")

# Frees one 8 MiB tensor (glibc then raises its mmap threshold to 8 MiB), allocates 100 tensors of 2 MiB, frees
# all but the last (which sits on top of them in the heap when they come from the heap) and prints how much of
# the freed 198 MiB is still resident.
RETAINED = """
import sys, torch
from dpokit.cpu_memory import return_freed_blocks
def rss():
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS:')) / 1024
applied = return_freed_blocks() if sys.argv[1] == "on" else False
big = torch.ones(2 << 20); del big
before = rss()
blocks = [torch.ones(1 << 19) for _ in range(100)]
last = blocks.pop(); del blocks
print(applied, rss() - before)
"""


def _retained_mib(setting: str, preload: str | None = None) -> tuple[bool, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    env["PYTHONPATH"] = SRC
    if preload:
        env["LD_PRELOAD"] = preload
    out = subprocess.run([sys.executable, "-c", RETAINED, setting], capture_output=True, text=True, env=env,
                         check=True).stdout.split()
    return out[0] == "True", float(out[1])


@glibc_only
def test_freed_blocks_stay_resident_without_the_setting_and_leave_with_it():
    applied_off, retained_off = _retained_mib("off")
    applied_on, retained_on = _retained_mib("on")
    assert not applied_off and applied_on
    assert retained_off > 150  # the pattern does keep freed memory in glibc's heap by default
    assert retained_on < 20  # 198 MiB were freed; only the 2 MiB block still held may remain


@glibc_only
def test_a_threshold_the_user_set_is_left_alone(monkeypatch):
    from dpokit.cpu_memory import return_freed_blocks

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert return_freed_blocks() is False


def _preloadable_allocator() -> str | None:
    """jemalloc or tcmalloc where this machine has one (DPOKIT_TEST_MALLOC names a library file to use)."""
    import ctypes.util

    names = [os.environ.get("DPOKIT_TEST_MALLOC"), ctypes.util.find_library("jemalloc"),
             ctypes.util.find_library("tcmalloc_minimal"), ctypes.util.find_library("tcmalloc")]
    return next((name for name in names if name), None)


@glibc_only
@pytest.mark.skipif(_preloadable_allocator() is None, reason="no jemalloc/tcmalloc here to preload")
def test_a_preloaded_allocator_is_left_alone():
    applied, _ = _retained_mib("on", preload=_preloadable_allocator())
    assert not applied  # glibc's mallopt would not reach the malloc torch calls


@pytest.mark.parametrize("asked", [True, False])
def test_cpu_training_applies_it_before_the_model_is_loaded_when_asked(asked, tiny_model_dir, sentiment_data, tmp_path,
                                                                       monkeypatch):
    order = []
    monkeypatch.setattr(api, "return_freed_blocks", lambda: order.append("freed blocks") or True)
    real_load = api.load_policy
    monkeypatch.setattr(api, "load_policy", lambda *a, **k: order.append("load") or real_load(*a, **k))
    config = TrainConfig(model=tiny_model_dir, data=sentiment_data["train"], output=str(tmp_path / "run"),
                         batch_size=2, max_steps=1, lora_r=4, save_final=False, threads=1, return_freed_memory=asked)
    api.train_dpo(config)
    assert order == (["freed blocks", "load"] if asked else ["load"])
