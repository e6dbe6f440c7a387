"""Give a trained draft head a draft vocabulary: the N most frequent tokens of training text (nanojet/model/draft_vocab.py).

    python scripts/set_draft_vocab.py nanojet/weights/qwen3-stdlib-tiny/head-causal --size 1024
    python scripts/set_draft_vocab.py HEAD_DIR --size 32768 --model DIR --data text.jsonl
    python scripts/set_draft_vocab.py HEAD_DIR --none          # remove it: draft over the whole vocabulary

`train_head.py --draft-vocab N` picks the vocabulary while training; this writes one into a head that exists, which
needs no retraining: the head keeps its weights and scores only the chosen rows of the target's lm_head, so output
stays exactly plain decoding's and only acceptance can change. The text: the model's built-in corpus (training split)
or a jsonl file read as train_head.py reads it. EOS is always included. Bad input: one line on stderr, exit 2.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nanojet.llm import DEFAULT_MODEL  # noqa: E402
from nanojet.model.config import ModelConfig  # noqa: E402
from nanojet.model.draft_vocab import FILE_NAME, save_draft_vocab, select_draft_vocab  # noqa: E402
from nanojet.tokenizer import Tokenizer  # noqa: E402
from nanojet.tools.cli import install_exit_handlers, positive_int  # noqa: E402
from nanojet.train.data import load_corpus  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("head", type=Path, help="the draft head's directory (config.json, model.safetensors)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--size", type=positive_int, metavar="N", help="tokens in the draft vocabulary")
    which.add_argument("--none", action="store_true", help="remove the head's draft vocabulary")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the target (its tokenizer and vocabulary)")
    parser.add_argument("--data", default="builtin", help="builtin (the embedded model's corpus) or a .jsonl file")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return set_vocab(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def set_vocab(args: argparse.Namespace) -> int:
    if not (args.head / "config.json").is_file():
        raise FileNotFoundError(f"no draft head at {args.head} (its config.json is missing); give a head directory")
    if args.none:
        (args.head / FILE_NAME).unlink(missing_ok=True)
        print(f"{args.head}: drafts over the whole vocabulary")
        return 0
    config = ModelConfig.from_dir(args.model)
    tokenizer = Tokenizer.from_dir(args.model)
    if args.data == "builtin" and Path(args.model).resolve() != DEFAULT_MODEL.resolve():
        raise ValueError("--data builtin is the embedded model's corpus; give --data FILE.jsonl for another model")
    stream = torch.tensor(load_corpus(args.data, tokenizer, args.model, regen=False, device="cpu"))
    vocab = select_draft_vocab(stream, config.vocab_size, args.size, always=tokenizer.eos_token_ids)
    save_draft_vocab(args.head, vocab)
    counts = torch.bincount(stream, minlength=config.vocab_size)
    share = float(counts[vocab].sum()) / max(1, int(counts.sum()))
    print(f"{args.head / FILE_NAME}: {vocab.numel()} tokens, {100 * share:.1f}% of the {stream.numel():,} tokens of "
          f"--data {args.data}")
    return 0


if __name__ == "__main__":
    install_exit_handlers()
    sys.exit(main())
