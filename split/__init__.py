"""Reshard checkpoints for tensor parallelism (any M shards -> N, or merge to 1) and cut them
into layer-wise stage files, streaming one row block at a time. Entry point: split_model.py.

    source.py   any checkpoint (through llama.formats' readers) or stage folder, checked, in row blocks
    reshard.py  the tensor-parallel plan (llama.layers' split dims) and split_checkpoint()
    stages.py   the layer-wise stage plan
    output.py   streaming safetensors writer, .pth files, output checks, split.json manifest
"""
from split.reshard import default_out, split_checkpoint

__all__ = ["split_checkpoint", "default_out"]
