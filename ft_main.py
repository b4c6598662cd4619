"""Fine-tune a LLaMA checkpoint: LoRA, prompt tuning, full or frozen-layer tuning.

    torchrun --nproc_per_node 4 ft_main.py --config torchrun_configs/7B_prompt_tp4.toml
    python ft_main.py --config torchrun_configs/demo.toml --lr 1e-3     # any key overrides the TOML
    python ft_main.py --config torchrun_configs/demo_dpo.toml           # DPO on top of the SFT demo

With no arguments it runs the embedded demo on CPU (torchrun_configs/demo.toml): a tiny LLaMA
built on first use, LoRA-tuned on a bundled instruction task, with exact match before and after.
`python ft_main.py --help` lists every key.
"""
import os
import sys
from pathlib import Path

from llama.errors import LlamaInputError

DEMO_CONFIG = Path(__file__).resolve().parent / "torchrun_configs" / "demo.toml"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from finetune.config import load_config
    from finetune.stopping import StopNow, TrainingInterrupted
    from finetune.trainer import CheckpointWriteFailed, TrainingDiverged, train
    from llama.distributed import shutdown_model_parallel

    try:
        cfg = load_config(argv, default_config=None if "--config" in argv else DEMO_CONFIG)
        if not cfg.ckpt_dir:
            from finetune.demo import ensure_demo_adapter, ensure_demo_model

            cfg.ckpt_dir = str(ensure_demo_model())
            if cfg.init_adapter:  # the DPO demo starts from the SFT demo's adapter
                ensure_demo_adapter(cfg.init_adapter)
        try:
            train(cfg)
        finally:
            shutdown_model_parallel()
    except LlamaInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (TrainingDiverged, CheckpointWriteFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (TrainingInterrupted, StopNow) as e:  # SIGINT or SIGTERM: 130 or 143, as shells report them
        if os.environ.get("RANK", "0") == "0":  # every rank stops alike (under torchrun): say it once
            print(e, file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
