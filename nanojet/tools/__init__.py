"""Tools (not the runtime): the command-line conventions of the CLIs and the ahead-of-time kernel gate CI runs."""
