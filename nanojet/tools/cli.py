"""The command-line convention of run.py, bench.py and train_head.py, and the flags run.py and bench.py share.

Bad input is one line on stderr and exit status 2; Ctrl-C is one line and exit status 130 (what a shell
reports for an interrupted command); a reader that closes the pipe early (`run.py ... | head -2`) ends the
program quietly. Light on purpose: nothing here imports torch, so `--help` stays instant."""
import argparse
import math
import os
import signal
import sys

INTERRUPTED_EXIT = 130  # 128 + SIGINT


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print its whole usage block first
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def finite_float(text: str) -> float:
    """argparse type: a float that is neither NaN nor infinite (float("nan") parses, then samples token 0)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _quiet_exit_hook(kind, value, traceback) -> None:
    if issubclass(kind, KeyboardInterrupt):
        _flush_quietly()
        print("interrupted", file=sys.stderr, flush=True)
        os._exit(INTERRUPTED_EXIT)  # sys.exit is not allowed inside an excepthook
    if issubclass(kind, BrokenPipeError):
        # The reader has what it wanted. Point stdout at /dev/null so the interpreter's final flush cannot
        # raise the same error again while shutting down.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        os._exit(0)
    sys.__excepthook__(kind, value, traceback)


def _flush_quietly() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):
            pass


def install_exit_handlers() -> None:
    """Make an uncaught Ctrl-C (KeyboardInterrupt) print one line and exit 130, and a closed stdout pipe
    (BrokenPipeError) exit 0 without a traceback. Call it first thing in a script, before heavy imports, so
    Ctrl-C while torch loads is covered too. A loop that must reach a safe point first (train_head.py saves a
    checkpoint) uses DeferredInterrupt."""
    sys.excepthook = _quiet_exit_hook


class DeferredInterrupt:
    """Once armed (inside `with`), Ctrl-C only sets `requested`, for a loop to stop at its next safe point
    (train_head.py: after the optimizer step in flight, which half-applied would corrupt the checkpoint); a second
    Ctrl-C raises KeyboardInterrupt at once. Before `arm()`, Ctrl-C interrupts as usual."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> "DeferredInterrupt":
        return self

    def arm(self) -> None:
        self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # On stdout, with the progress line: stderr keeps its one closing line.
        print("\nCtrl-C: stopping after this step (Ctrl-C again stops at once)", flush=True)

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def add_runtime_flags(parser: argparse.ArgumentParser) -> None:
    """How a model runs: chat template or raw text, device, dtype, compiled or graphed rounds, prefill chunks."""
    template = parser.add_mutually_exclusive_group()
    template.add_argument("--chat", dest="chat", action="store_true", default=None,
                          help="apply the chat template (default for models that ship one)")
    template.add_argument("--raw", dest="chat", action="store_false", help="use prompt text as it is")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where to run (auto: CUDA if available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="weights and KV dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--compile", action="store_true",
                        help="compile the decode rounds with torch.compile (inside the CUDA graphs on CUDA); compile "
                             "time is reported apart from decode time")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="on CUDA, run rounds without capturing CUDA graphs (graphs are the CUDA default)")
    parser.add_argument("--prefill-chunk", type=positive_int, default=512,
                        help="prompt tokens per prefill forward (each chunk sees the whole prefix; default 512)")
