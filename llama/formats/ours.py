"""Our format: Meta's keys and fairscale layout in `consolidated.NN.safetensors` + `params.json`
(what we write: one file per tensor-parallel rank)."""
from pathlib import Path
from typing import Optional

from llama.files import save_safetensors
from llama.formats.meta import MetaLayout

OURS = MetaLayout("ours", ".safetensors")


def save_checkpoint(model, out_dir, state: Optional[dict] = None, rank: int = 0) -> None:
    """Write a Transformer in our format: params.json + consolidated.{rank:02d}.safetensors holding
    this tensor-parallel rank's slices (every rank calls it). `state` replaces model.state_dict()."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(model.state_dict() if state is None else state, out / f"consolidated.{rank:02d}.safetensors")
    if rank == 0:
        model.args.write_params_json(out / "params.json")
