"""The command-line convention of run.py and train_head.py: bad input is one line on stderr and exit status 2."""
import argparse
import sys


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print its whole usage block first
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
