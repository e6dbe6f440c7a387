"""`python run.py ...` in a checkout: the `nanojet-run` command that `pip install .` installs
(its code: nanojet/tools/run.py)."""
import sys

from nanojet.tools.entry_points import nanojet_run

if __name__ == "__main__":
    sys.exit(nanojet_run())
