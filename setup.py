from setuptools import find_packages, setup

setup(
    name="llama-toolkit",
    version="0.1.0",
    description="Pure-PyTorch LLaMA: load, split, fine-tune (LoRA, prompt, full; int4/NF4 bases) and generate",
    python_requires=">=3.10",
    packages=find_packages(include=["llama", "llama.*", "finetune", "finetune.*", "split", "split.*", "quant", "quant.*"]),
    install_requires=[
        # 2.11: the oldest torch this is run on, the GPU machines' (CUDA 13; bench/gpu_check.py records the
        # version of each run); CI runs 2.13. What differs between them is what tests/test_torch_api.py checks
        # (FSDP2, DTensor, torch.distributed.checkpoint, the int4 ops, SDPA's enable_gqa), on both.
        "torch>=2.11",
        "sentencepiece",
        "tiktoken",  # Llama-3's BPE; the same library Meta's reference tokenizer uses
        "safetensors",
        "numpy",
        "fairscale",
        "tqdm",
        "gguf",  # GGUF export (llama/export/gguf.py): llama.cpp's own writer and quantizers
        "bitsandbytes>=0.47",  # NF4 bases (QLoRA); CPU 4-bit ops from 0.47; imported only for quant = nf4
    ],
    # packages that register formats and quantizers with llama/ (llama/plugins.py)
    entry_points={"llama_toolkit.plugins": ["quant = quant"]},
    extras_require={
        # references the tests compare against; never imported by the package
        # triton: the GPU int4 kernel is checked on CPU under TRITON_INTERPRET=1
        # llama-models: Meta's reference Llama-3 tokenizer and chat format, and the real tokenizer.model,
        # as test references; trl: DPOTrainer's loss and gradients (1.16: loss_type as a list)
        "test": ["pytest", "transformers>=4.45", "peft>=0.13", "triton", "llama-models==0.3.0", "trl>=1.16"],
        # peers the benchmarks run beside ours (llama.cpp too when llama-cpp-python and gguf are installed):
        # HF + PEFT loops and HF Trainer (accelerate), TRL's DPOTrainer
        "bench": ["transformers>=4.56", "peft>=0.13", "accelerate", "trl>=1.16"],  # 4.56: from_pretrained(dtype=)
    },
)
