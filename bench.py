"""`python bench.py ...` in a checkout: the `nanojet-bench` command that `pip install .` installs
(its code: nanojet/tools/bench.py)."""
import sys

from nanojet.tools.entry_points import nanojet_bench

if __name__ == "__main__":
    sys.exit(nanojet_bench())
