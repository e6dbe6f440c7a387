"""Every run.py flag refuses a bad value with one stderr line and exit status 2 (run in-process: the same code
path as the command line, without a Python start per case)."""
import pytest
import torch

from nanojet.tools import run

# flag values -> a word the one-line message must contain (what is wrong, so the user knows what to fix)
BAD_FLAGS = [
    (["--budget", "0"], "budget"),
    (["--budget", "600"], "budget"),
    (["--width", "0"], "width"),
    (["--width", "9000"], "width"),
    (["--depth", "0"], "depth"),
    (["--top-p", "0"], "top_p"),
    (["--top-p", "1.5"], "top_p"),
    (["--top-k", "-1"], "top_k"),
    (["--seed", "-1"], "seed"),
    (["--head", "/nonexistent/head"], "/nonexistent/head"),
    (["--kv-memory-gb", "0.000001"], "kv"),
    (["--dtype", "fp8"], "--dtype"),
    (["--chat", "--raw"], "--raw"),
    (["--prefill-chunk", "-4"], "--prefill-chunk"),
    (["--max-new-tokens", "x"], "--max-new-tokens"),
    (["--max-model-len", "4"], "context holds 4"),  # the prompt fills the context (token healing would shorten it)
]


def run_main(args: list[str], capsys) -> tuple[int, list[str]]:
    try:
        code = run.main(args)
    except SystemExit as stop:  # argparse refusals exit from inside parse_args
        code = stop.code
    captured = capsys.readouterr()
    assert code == 0 or captured.out == ""  # nothing reaches stdout before an error (not even the prefill's token)
    return code, captured.err.strip().splitlines()


@pytest.mark.parametrize("flags, word", BAD_FLAGS, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_flag_value_is_one_line_and_exit_2(flags, word, capsys):
    code, lines = run_main(["--prompt", "def f(x):", "--max-new-tokens", "4", "--device", "cpu", *flags], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error:") and word in lines[0], lines


def test_empty_prompt_is_refused(capsys):
    code, lines = run_main(["--prompt", "", "--device", "cpu"], capsys)
    assert code == 2 and len(lines) == 1 and "empty" in lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_refused(capsys):
    code, lines = run_main(["--prompt", "x", "--device", "cuda"], capsys)
    assert code == 2 and len(lines) == 1 and "CUDA" in lines[0]


def test_the_stats_line_says_where_speculation_is_not_exact_by_construction(capsys):
    """bf16 on the CPU runs torch's products, which round a row differently among a tree's rows: the stats line
    says speculative output may differ; fp32 on the CPU and every CUDA dtype print no caveat there (the CUDA
    kernels are row-invariant; fp32 CPU is exact in every test, which --json records)."""
    from nanojet.llm import exactness
    assert exactness(torch.device("cuda"), torch.bfloat16) is None
    assert "not by construction" in exactness(torch.device("cpu"), torch.float32)
    argv = ["--prompt", "def f(x):", "--max-new-tokens", "3", "--device", "cpu", "--budget", "4"]
    code, lines = run_main(argv + ["--dtype", "bfloat16"], capsys)
    assert code == 0 and "speculative output may differ from plain decoding (bfloat16 on the CPU" in lines[-1]
    code, lines = run_main(argv + ["--dtype", "float32"], capsys)
    assert code == 0 and "may differ" not in lines[-1] and "tok/s" in lines[-1]
