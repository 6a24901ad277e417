"""dpokit.runtime.memory: freed activation-sized blocks leave the process during CPU training (glibc only)."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dpokit.train.run as api
from dpokit.config import TrainConfig

SRC = str(Path(__file__).resolve().parents[2] / "src")
glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")

# Frees one 8 MiB tensor (glibc then raises its mmap threshold to 8 MiB), allocates 100 tensors of 2 MiB, frees
# all but the last (which sits on top of them in the heap when they come from the heap) and prints how much of
# the freed 198 MiB is still resident.
RETAINED = """
import sys, torch
from dpokit.runtime.memory import return_freed_blocks
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
    from dpokit.runtime.memory import return_freed_blocks

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert return_freed_blocks() is False


def _preloadable_allocator() -> str | None:
    """mimalloc (cmeel-mimalloc), jemalloc or tcmalloc where this machine has one (DPOKIT_TEST_MALLOC names a
    library file to use)."""
    import ctypes.util

    from dpokit.runtime.memory import find_malloc

    names = [os.environ.get("DPOKIT_TEST_MALLOC"), find_malloc("auto"), ctypes.util.find_library("jemalloc"),
             ctypes.util.find_library("tcmalloc_minimal"), ctypes.util.find_library("tcmalloc")]
    return next((name for name in names if name), None)


@glibc_only
@pytest.mark.skipif(_preloadable_allocator() is None, reason="no mimalloc/jemalloc/tcmalloc here to preload")
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


# --- the allocator the dpokit command runs on (DPOKIT_MALLOC) ---

from dpokit.runtime.memory import (JEMALLOC_CONF, MIMALLOC_SETTINGS, ONEDNN_CACHE, PRELOADED, cap_onednn_cache,  # noqa: E402
                                   find_malloc, malloc_environment)
from dpokit.errors import DpokitError  # noqa: E402

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="LD_PRELOAD is Linux's")


@linux_only
def test_system_an_earlier_reexec_or_a_users_preload_leave_the_environment_alone():
    assert malloc_environment({"DPOKIT_MALLOC": "system"}) is None
    assert malloc_environment({PRELOADED: "/x/libmimalloc.so"}) is None
    assert malloc_environment({"LD_PRELOAD": "/opt/lib/libtcmalloc.so.4"}) is None


@linux_only
def test_a_library_file_is_preloaded_before_what_the_user_preloads(tmp_path):
    library = tmp_path / "libmymalloc.so"
    library.write_bytes(b"")
    environment = malloc_environment({"DPOKIT_MALLOC": str(library), "LD_PRELOAD": "libother.so", "HOME": "/h"})
    assert environment["LD_PRELOAD"] == f"{library}:libother.so"
    assert environment[PRELOADED] == str(library) and environment["HOME"] == "/h"
    assert "MALLOC_CONF" not in environment


@linux_only
def test_jemalloc_gets_the_launchers_settings_unless_the_user_gave_some(tmp_path):
    library = tmp_path / "libjemalloc.so.2"
    library.write_bytes(b"")
    assert malloc_environment({"DPOKIT_MALLOC": str(library)})["MALLOC_CONF"] == JEMALLOC_CONF
    assert malloc_environment({"DPOKIT_MALLOC": str(library), "MALLOC_CONF": "narenas:1"})["MALLOC_CONF"] == "narenas:1"


@linux_only
def test_mimalloc_keeps_freed_pages_unless_the_user_says_otherwise(tmp_path):
    library = tmp_path / "libmimalloc.so.3"
    library.write_bytes(b"")
    environment = malloc_environment({"DPOKIT_MALLOC": str(library)})
    assert all(environment[k] == v for k, v in MIMALLOC_SETTINGS.items()) and "MALLOC_CONF" not in environment
    assert malloc_environment({"DPOKIT_MALLOC": str(library), "MIMALLOC_PURGE_DELAY": "10"})["MIMALLOC_PURGE_DELAY"] == "10"


def test_an_allocator_that_is_not_there_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(DpokitError, match="DPOKIT_MALLOC=.*no such library file"):
        find_malloc(str(tmp_path / "missing.so"))
    import dpokit.runtime.memory as cpu_memory

    monkeypatch.setattr(cpu_memory, "_mimalloc_from_wheel", lambda: None)
    monkeypatch.setattr(cpu_memory, "_system_library", lambda name: None)
    with pytest.raises(DpokitError, match="DPOKIT_MALLOC=mimalloc: not found .*pip install cmeel-mimalloc"):
        find_malloc("mimalloc")
    with pytest.raises(DpokitError, match="DPOKIT_MALLOC=jemalloc: not found"):
        find_malloc("jemalloc")
    assert find_malloc("auto") is None and malloc_environment({}) is None  # auto without one: glibc, quietly


def _maps_of_a_dpokit_run(tmp_path, tiny_model_dir, sentiment_data, **env) -> tuple[subprocess.CompletedProcess, str]:
    """A one-step `python -m dpokit.cli.main dpo` run; its result and the libraries its process had mapped at the end
    (written by a sitecustomize that dumps /proc/self/maps at exit)."""
    hook = tmp_path / f"hook-{env.get('DPOKIT_MALLOC', 'auto')}"
    hook.mkdir()
    maps = hook / "maps.txt"
    (hook / "sitecustomize.py").write_text(
        "import atexit, os, pathlib\n"
        f"atexit.register(lambda: os.system('cp /proc/%d/maps {maps}' % os.getpid()))\n"
        f"atexit.register(lambda: pathlib.Path('{hook / 'onednn.txt'}').write_text(os.environ.get('{ONEDNN_CACHE}', '')))\n")
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("LD_PRELOAD", PRELOADED, "DPOKIT_MALLOC", ONEDNN_CACHE)}
    environment.update(PYTHONPATH=os.pathsep.join([str(hook), SRC]), OMP_NUM_THREADS="1", **env)
    result = subprocess.run([sys.executable, "-m", "dpokit.cli.main", "dpo", "--model", tiny_model_dir, "--data",
                             sentiment_data["train"], "--output", str(hook / "run"), "--batch-size", "2",
                             "--max-steps", "1", "--no-save-final", "--threads", "1"],
                            capture_output=True, text=True, env=environment)
    return result, maps.read_text() if maps.exists() else ""


@linux_only
@pytest.mark.skipif(find_malloc("auto") is None, reason="neither mimalloc (cmeel-mimalloc) nor jemalloc here")
def test_the_command_runs_on_the_allocator_it_found_and_says_so(tmp_path, tiny_model_dir, sentiment_data):
    library = find_malloc("auto")
    result, maps = _maps_of_a_dpokit_run(tmp_path, tiny_model_dir, sentiment_data)
    assert result.returncode == 0, result.stderr
    assert os.path.basename(os.path.realpath(library)) in maps  # mapped into the process that trained
    name = "mimalloc" if "mimalloc" in library.name else "jemalloc"
    assert f"malloc: {name}, chosen by dpokit" in result.stdout

    system, maps = _maps_of_a_dpokit_run(tmp_path, tiny_model_dir, sentiment_data, DPOKIT_MALLOC="system")
    assert system.returncode == 0, system.stderr
    assert name not in maps and "malloc: " in system.stdout and f"malloc: {name}" not in system.stdout


# --- oneDNN's kernel cache (ONEDNN_PRIMITIVE_CACHE_CAPACITY) ---

# Runs 1,200 bfloat16 matmuls of 400 different shapes (a forward, an input gradient and a weight gradient of a
# linear layer at 800-1,199 tokens, as steps of varied lengths do) and prints how much the process grew.
BF16_SHAPES = """
import sys, torch
from dpokit.runtime.memory import cap_onednn_cache
if sys.argv[1] == "capped":
    cap_onednn_cache()
torch.set_num_threads(1)
def rss():
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS:')) / 1024
w = torch.randn(1024, 256, dtype=torch.bfloat16)
x, g = torch.randn(1200, 256, dtype=torch.bfloat16), torch.randn(1200, 1024, dtype=torch.bfloat16)
before = rss()
for m in range(800, 1200):
    torch.nn.functional.linear(x[:m], w), g[:m] @ w, g[:m].t() @ x[:m]
print(rss() - before)
"""


def test_the_cache_is_capped_unless_the_user_set_its_size():
    environ = {}
    assert cap_onednn_cache(environ) and environ == {ONEDNN_CACHE: "64"}
    environ = {ONEDNN_CACHE: "1024"}
    assert not cap_onednn_cache(environ) and environ == {ONEDNN_CACHE: "1024"}
    environ = {ONEDNN_CACHE: " "}  # set but empty: oneDNN's default, so the cap applies
    assert cap_onednn_cache(environ) and environ[ONEDNN_CACHE] == "64"


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                    reason="oneDNN does not run bfloat16 matmuls on this CPU")
def test_capping_the_cache_in_process_keeps_less_of_varied_bfloat16_matmuls():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ("LD_PRELOAD", ONEDNN_CACHE)}
    env["PYTHONPATH"] = SRC
    grown = {setting: float(subprocess.run([sys.executable, "-c", BF16_SHAPES, setting], capture_output=True,
                                           text=True, env=env, check=True).stdout)
             for setting in ("default", "capped")}
    assert grown["capped"] < grown["default"] - 100, grown  # measured: 509 against 735 MiB


def test_the_command_caps_the_cache(tmp_path, tiny_model_dir, sentiment_data):
    result, _ = _maps_of_a_dpokit_run(tmp_path, tiny_model_dir, sentiment_data, DPOKIT_MALLOC="system")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "hook-system" / "onednn.txt").read_text() == "64"
