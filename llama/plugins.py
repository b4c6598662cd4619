"""Packages that extend llama/ from a higher floor (quant/: GPTQ folders, the int4 and NF4
quantizers) name themselves in setup.py's entry points, group `llama_toolkit.plugins`, and are
imported here on first need. So `python -m llama.export` reads a GPTQ folder and
`load_model(quant="int4")` finds its quantizer, while llama/ imports nothing of theirs."""
from functools import cache
from importlib.metadata import entry_points

GROUP = "llama_toolkit.plugins"


@cache
def load_plugins() -> None:
    """Import every installed plugin once (importing one registers what it adds)."""
    for entry in entry_points(group=GROUP):
        entry.load()
