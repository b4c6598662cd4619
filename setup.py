from setuptools import find_packages, setup

setup(
    name="llama-toolkit",
    version="0.1.0",
    description="Pure-PyTorch LLaMA: load, split, fine-tune (LoRA, prompt, full; int4/NF4 bases) and generate",
    python_requires=">=3.10",
    packages=find_packages(include=["llama", "llama.*", "finetune", "finetune.*", "split", "split.*", "quant", "quant.*"]),
    install_requires=[
        "torch>=2.5",  # scaled_dot_product_attention(enable_gqa=...)
        "sentencepiece",
        "safetensors",
        "numpy",
        "fairscale",
        "tqdm",
    ],
    extras_require={
        # references the tests compare against; never imported by the package
        "test": ["pytest", "transformers>=4.45", "peft>=0.13"],
        "bench": ["transformers>=4.45"],
    },
)
