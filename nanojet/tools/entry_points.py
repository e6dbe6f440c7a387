"""The commands: `nanojet-run`, `nanojet-bench` and `nanojet-train` once installed (pyproject.toml's
[project.scripts]), and `python run.py`, `bench.py`, `train_head.py` in a checkout, which call the same functions.

Each installs the exit convention (nanojet/tools/cli.py) first and only then imports its command's module, where
torch loads, so Ctrl-C while it loads is one line too; it flushes stdout before returning the exit status, so a
full disk met at that last write is one line too, not the interpreter's 'Exception ignored' at exit."""
import sys

from nanojet.tools.cli import install_exit_handlers


def nanojet_run() -> int:
    """Generate text (nanojet/tools/run.py)."""
    install_exit_handlers()
    from nanojet.tools.run import main
    return _flushed(main())


def nanojet_bench() -> int:
    """Benchmark plain against speculative decoding (nanojet/tools/bench.py)."""
    install_exit_handlers()
    from nanojet.tools.bench import main
    return _flushed(main())


def nanojet_train() -> int:
    """Train a draft head (nanojet/tools/train_head.py)."""
    install_exit_handlers()
    from nanojet.tools.train_head import main
    return _flushed(main())


def _flushed(status: int) -> int:
    sys.stdout.flush()
    return status
