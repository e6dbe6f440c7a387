"""`python train_head.py ...` in a checkout: the `nanojet-train` command that `pip install .` installs
(its code: nanojet/tools/train_head.py)."""
import sys

from nanojet.tools.entry_points import nanojet_train

if __name__ == "__main__":
    sys.exit(nanojet_train())
