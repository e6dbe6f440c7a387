"""The command-line convention of run.py and train_head.py (bad input is one line on stderr and exit status 2),
and the flags run.py and bench.py share."""
import argparse
import sys


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


def add_runtime_flags(parser: argparse.ArgumentParser) -> None:
    """How a model runs: chat template or raw text, device, dtype, compiled or graphed rounds, prefill chunks."""
    template = parser.add_mutually_exclusive_group()
    template.add_argument("--chat", dest="chat", action="store_true", default=None,
                          help="apply the chat template (default for models that ship one)")
    template.add_argument("--raw", dest="chat", action="store_false", help="use prompt text as it is")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--compile", action="store_true",
                        help="compile the decode rounds with torch.compile (inside the CUDA graphs on CUDA); compile "
                             "time is reported apart from decode time")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="on CUDA, run rounds without capturing CUDA graphs (graphs are the CUDA default)")
    parser.add_argument("--prefill-chunk", type=positive_int, default=512,
                        help="prompt tokens per prefill forward (each chunk sees the whole prefix; default 512)")
