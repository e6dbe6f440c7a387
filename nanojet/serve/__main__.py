"""`python -m nanojet.serve`: the OpenAI-compatible server (nanojet/serve/server.py)."""
import sys

from nanojet.serve.server import main

sys.exit(main())
