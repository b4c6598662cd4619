"""Layer-wise stages: N files `stage.NN.safetensors`, each a contiguous range of whole layers
(embedding in the first, norm and output in the last), balanced by bytes with the same planner
layer-wise placement uses (`llama.placement.plan_stages`), for placing stages on separate
machines or GPUs. Tensors are stored whole, with Meta names; `split.json` records each stage's
layer range as [layer_start, layer_stop).

The core loader does not read stage folders; `split_model.py` does, so a stage folder can be
merged back (`--n 1`), resharded for tensor parallelism, or re-staged.
"""
import re

from llama.errors import LlamaInputError
from llama.formats import Checkpoint
from llama.placement import plan_stages
from split.output import OutFile, Piece

_LAYER = re.compile(r"^layers\.(\d+)\.")


def unit_of(key: str, n_layers: int) -> int:
    """0: the embedding, 1..L: layer L-1, L+1: norm and output."""
    m = _LAYER.match(key)
    if m:
        return int(m.group(1)) + 1
    return 0 if key.startswith("tok_embeddings.") else n_layers + 1


def plan_layers(src: Checkpoint, n: int) -> tuple[list[OutFile], dict]:
    n_layers = src.args.n_layers
    units = n_layers + 2
    if n > units:
        raise LlamaInputError(f"--n {n}: a {n_layers}-layer model has only {units} units to stage (embedding, layers, norm+output)")
    unit_bytes = [0] * units
    for key, t in src.tensors.items():
        unit_bytes[unit_of(key, n_layers)] += t.nbytes
    stage_of = plan_stages(unit_bytes, [1.0] * n)
    files = [OutFile(f"stage.{j:02d}.safetensors") for j in range(n)]
    for key, t in src.tensors.items():
        files[stage_of[unit_of(key, n_layers)]].pieces.append(Piece(key, t))
    stages = []
    for j, f in enumerate(files):
        mine = [u for u in range(units) if stage_of[u] == j]
        layers = [u - 1 for u in mine if 1 <= u <= n_layers]
        start = layers[0] if layers else (n_layers if 0 not in mine else 0)
        stages.append({
            "file": f.name, "layer_start": start, "layer_stop": start + len(layers),
            "embedding": 0 in mine, "norm_output": units - 1 in mine, "bytes": f.nbytes,
        })
    return files, {"stages": stages}
