"""`dpokit` command line: a thin face over dpokit.api. Errors are one line on stderr and exit code 2.

Parsing and every check that needs no model run before torch or transformers are imported, so `--help`,
`--version` and a mistyped option answer at once (tests/cli/test_main.py checks that they are not imported).
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys

from dpokit.cli.commands import MODULES as COMMAND_MODULES
from dpokit.cli.parser import Parser
from dpokit.errors import EXIT_INTERRUPTED, ConfigError, DpokitError, Interrupted
from dpokit.runtime.memory import cap_onednn_cache, reexec_with_malloc

# Commands that keep the C library's malloc: the demo's 1.3M-parameter model frees too little for a better malloc
# to pay for its own reserve (`python bench/bench_demo.py --repeats 2`: peak 622 MiB on mimalloc, 567 on glibc's).
KEEP_MALLOC = frozenset({"demo"})

def _quiet_progress_bars() -> None:
    """transformers' "Loading weights"/"Writing model shards" bars off (dpokit shows its own progress): through the
    environment while transformers is not imported yet, so that parsing and option checks stay fast."""
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    else:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _quiet_library_noise() -> None:
    """Two messages from the libraries under dpokit that every LoRA run printed and that no dpokit user can act on:
    peft asks transformers' deprecated ``is_gradient_checkpointing`` (a FutureWarning from the library's own
    code), and bitsandbytes, when imported on a CPU with AVX512-BF16, warns that an optional kernel it tries to
    fetch from the Hugging Face hub did not load (dpokit downloads nothing at run time and keeps bitsandbytes'
    built-in CPU path, dpokit.models.loading). Everything else is left as the libraries say it."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: "gemm_4bit_forward from kernels-community" not in record.getMessage())


def _warnings_as_lines() -> None:
    """dpokit's own warnings (DpokitWarning) as ``dpokit: warning: ...`` on stderr, without the source line of
    whichever library frame raised them; the libraries' warnings as Python prints them."""
    import warnings

    from dpokit.errors import DpokitWarning

    show = warnings.showwarning
    if getattr(show, "dpokit_lines", False):  # main() called again in the same process
        return

    def show_warning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DpokitWarning):
            print(f"dpokit: warning: {message}", file=file or sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    show_warning.dpokit_lines = True
    warnings.showwarning = show_warning


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every dpokit command."""
    from dpokit import __version__

    parser = Parser(prog="dpokit", description="Direct Preference Optimization for causal LMs.",
                    epilog="environment: DPOKIT_MALLOC=auto|mimalloc|jemalloc|system|FILE chooses the malloc dpokit "
                           "runs on (default auto: mimalloc, else jemalloc, else the C library's; README: Speed and "
                           "memory)")
    parser.add_argument("--version", action="version", version=f"dpokit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for module in COMMAND_MODULES:  # one module per command (dpokit/cli/)
        importlib.import_module(f"dpokit.cli.{module}").add_command(commands)
    return parser


def _another_process_failed(error: BaseException) -> bool:
    """Whether `error` is this process's side of another process's failure in a multi-process launch: a collective
    whose peer went away (gloo: "Connection closed by peer"), or any error of torch.distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and isinstance(error, getattr(distributed, "DistError", ())):
        return True
    return any(text in str(error) for text in ("Connection closed by peer", "Connection reset by peer",
                                                "remote worker crashing"))


def _process_group_up() -> bool:
    distributed = sys.modules.get("torch.distributed")  # not imported by --help, --version or an option's error
    return distributed is not None and distributed.is_available() and distributed.is_initialized()


def _exit_launched(code: int) -> None:
    """End a process of a multi-process launch: its process group destroyed (dpokit.train.run.end_processes), the
    exit handlers run and the output flushed, then exit without tearing the interpreter down. In that teardown a
    gloo worker thread still freeing a finished barrier's tensors needs the GIL, Python ends the thread, and the
    process aborts ("terminate called without an active exception", SIGABRT: seen in 1 of 3 to 6 ZeRO-3 runs of 2
    steps on CPU, after the run had finished, even with the process group destroyed)."""
    import atexit

    from dpokit.train.run import end_processes

    end_processes()  # every rank, after an error too: the others' collectives fail at once and they stop
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dpokit` command. In a multi-process launch (a process group up) it ends the process
    itself, with the command's exit code (see _exit_launched), rather than returning."""
    try:
        code = _main(argv)
    except SystemExit:
        raise
    except BaseException:  # a bug's traceback, as Python prints it
        if not _process_group_up():
            raise
        import traceback

        traceback.print_exc()
        code = 1
    if _process_group_up():
        _exit_launched(code)
    return code


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_progress_bars()
    _quiet_library_noise()
    _warnings_as_lines()
    try:
        if argv is None:  # the command line, not a call from Python: this process is dpokit's own
            if args.command not in KEEP_MALLOC:
                reexec_with_malloc()  # a leaner malloc (dpokit.runtime.memory)
            cap_onednn_cache()  # before the first bfloat16 matmul (dpokit.runtime.memory)
        args.func(args)
    except Interrupted as stop:
        argv = list(sys.argv[1:] if argv is None else argv)
        again = "dpokit " + " ".join(shlex.quote(a) for a in argv + ([] if "--resume" in argv else ["--resume"]))
        print(f"dpokit {args.command}: {stop}\nresume with: {again}"
              + ("   (under the same accelerate launch)" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""),
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except ConfigError as error:  # an option's fault: where to read about the options
        print(f"dpokit {args.command}: error: {error} (see dpokit {args.command} --help)", file=sys.stderr)
        return 2
    except DpokitError as error:
        print(f"dpokit {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the file system's word (full disk, permissions): one line, not a traceback
        where = f"{error.filename}: " if error.filename else ""
        print(f"dpokit {args.command}: error: {where}{error.strerror or error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dpokit {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if not _another_process_failed(error):
            raise
        # the failing process printed its own error: one line here, not a second traceback
        print(f"dpokit {args.command}: process {os.environ.get('RANK', '?')} stopped: another process of the "
              "launch failed (its error is above)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
