"""`python -m nanojet.serve`: the OpenAI-compatible server (nanojet/serve/server.py)."""
import sys

from nanojet.tools.cli import install_exit_handlers

install_exit_handlers()  # Ctrl-C while the model loads: one line, exit 130 (serving, it drains and exits 0)

from nanojet.serve.server import main

sys.exit(main())
