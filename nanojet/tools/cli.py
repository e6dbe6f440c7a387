"""The command-line convention of run.py, bench.py and train_head.py, and the flags run.py and bench.py share.

Bad input is one line on stderr and exit status 2, and so is a full disk (`run.py ... > /dev/full`); Ctrl-C is
one line and exit status 130, SIGTERM one line and 143 (what a shell reports for a command stopped by that signal);
a reader that closes the pipe early (`run.py ... | head -2`) ends the program quietly, except where the work
outlives its reader (`say`: train_head.py keeps training). Light on purpose: nothing here imports torch, so
`--help` stays instant."""
import argparse
import contextlib
import errno
import math
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

INTERRUPTED_EXIT = 130  # 128 + SIGINT
TERMINATED_EXIT = 143  # 128 + SIGTERM
NO_ROOM = (errno.ENOSPC, errno.EDQUOT)  # a write failed for want of disk space


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


def check_writable(path: str | Path, flag: str) -> None:
    """ValueError (one line) unless `path` can be written: checked before a long run, not after it. A missing
    file is created and removed again, so a run that fails later leaves nothing behind."""
    path = Path(path)
    if not path.resolve().parent.is_dir():
        raise ValueError(f"cannot write {path} ({flag}): its directory does not exist")
    if path.is_dir():
        raise ValueError(f"cannot write {path} ({flag}): it is a directory; give a file name")
    if path.exists() and not path.is_file():
        return  # a device or a pipe (/dev/stdout): opening it now could block or consume it
    existed = path.exists()
    try:
        with path.open("a"):  # appending nothing leaves an existing file as it was
            pass
    except OSError as error:
        raise ValueError(f"cannot write {path} ({flag}): {error.strerror}") from None
    if not existed:
        path.unlink()


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a job scheduler, a container stop), raised as Ctrl-C is, so that `finally` blocks clean up
    on the way out."""


def stop_status(stop: KeyboardInterrupt) -> tuple[str, int]:
    """The closing word and exit status of a program stopped by a signal."""
    return ("terminated", TERMINATED_EXIT) if isinstance(stop, Terminated) else ("interrupted", INTERRUPTED_EXIT)


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def _quiet_exit_hook(kind, value, traceback) -> None:
    if issubclass(kind, KeyboardInterrupt):
        word, status = stop_status(value)
        _flush_quietly()
        print(word, file=sys.stderr, flush=True)
        os._exit(status)  # sys.exit is not allowed inside an excepthook
    if issubclass(kind, BrokenPipeError):
        # The reader has what it wanted. The interpreter's final flush must not raise the same error again.
        _silence_stdout()
        os._exit(0)
    if issubclass(kind, OSError) and value.errno in NO_ROOM:
        _silence_stdout()
        print(f"error: cannot write {value.filename or 'the output'}: {value.strerror}", file=sys.stderr, flush=True)
        os._exit(2)
    sys.__excepthook__(kind, value, traceback)


def _silence_stdout() -> None:
    """Point stdout at /dev/null: what it still buffers, and every later write, goes nowhere instead of failing."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _flush_quietly() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def _write_raw(fd: int, text: str) -> None:
    """Write from a signal handler: straight to the file descriptor, never through Python's buffered streams
    (which raise 'reentrant call' when the handler interrupted a print), and never failing."""
    try:
        os.write(fd, text.encode())
    except OSError:
        pass


def install_exit_handlers() -> None:
    """Make an uncaught Ctrl-C (KeyboardInterrupt) or SIGTERM print one line and exit 130 or 143, a full disk one
    line and exit 2, and a closed stdout pipe (BrokenPipeError) exit 0, all without a traceback. Called first
    thing (nanojet/tools/entry_points.py), before heavy imports, so a signal while torch loads is covered too. A
    loop that must reach a safe point first (train_head.py saves a checkpoint) arms a GracefulStop."""
    sys.excepthook = _quiet_exit_hook
    signal.signal(signal.SIGTERM, _raise_terminated)


def say(*values, **kwargs) -> None:
    """print() to stdout, flushed, for a program whose work outlives its reader (train_head.py): once stdout takes
    no more (`| head -1` has exited, the disk is full), it goes to /dev/null and the work carries on. A full disk is
    said once on stderr; a closed pipe is the reader's choice and said nowhere."""
    try:
        print(*values, **kwargs, flush=True)
    except OSError as error:
        _silence_stdout()
        if not isinstance(error, BrokenPipeError):
            print(f"note: cannot write to stdout ({error.strerror}); going on without printing there",
                  file=sys.stderr, flush=True)


class GracefulStop:
    """Stop a loop at a safe point on Ctrl-C or SIGTERM (train_head.py: after the optimizer step in flight, which
    half-applied would corrupt the checkpoint, and with a checkpoint).

    Once armed (inside `with`), the first signal only sets `requested`, for the loop to call `stop(message)` at
    its next safe point. A second signal ends the program at once (one line on stderr, exit 128 + its number),
    except inside `saving()`: a save always runs to its end, then the loop stops. The handler neither raises nor
    prints through Python's streams, either of which can end in a traceback: an exception raised at an arbitrary
    point can land in a `__del__` ('Exception ignored', and the exception is lost), and a print that interrupts a
    print fails ('reentrant call'). Before `arm()`, signals act as install_exit_handlers set them."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_number: int | None = None  # the last signal received
        self._saving = False
        self._stopping = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "GracefulStop":
        return self

    def arm(self) -> None:
        for number in (signal.SIGINT, signal.SIGTERM):
            self._previous[number] = signal.signal(number, self._handle)

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """A stretch that a second signal must not cut short (writing a checkpoint)."""
        self._saving = True
        try:
            yield
        finally:
            self._saving = False

    def stop(self, message: str) -> NoReturn:
        """End the run here: KeyboardInterrupt(message), Terminated(message) if the last signal was SIGTERM."""
        self._stopping = True
        raise (Terminated if self.signal_number == signal.SIGTERM else KeyboardInterrupt)(message)

    def _handle(self, number: int, frame) -> None:
        if self._stopping:
            return
        self.signal_number = number
        if not self.requested:
            self.requested = True
            name = "Ctrl-C" if number == signal.SIGINT else "SIGTERM"
            # On stdout, with the progress line: stderr keeps its one closing line.
            _write_raw(1, f"\n{name}: stopping after this step (Ctrl-C again stops at once)\n")
        elif not self._saving:  # outside a save nothing is half-written: only the step in flight is lost
            word = "terminated" if number == signal.SIGTERM else "interrupted"
            _write_raw(2, f"\n{word}: stopped at once, without saving the steps since the last checkpoint\n")
            os._exit(128 + number)

    def __exit__(self, *exc) -> None:
        for number, previous in self._previous.items():
            # After a stop signal the program is ending: a further one is ignored, so its closing line stays the one.
            signal.signal(number, signal.SIG_IGN if self.signal_number is not None else previous)


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
