"""A pure-PyTorch LLaMA: model, tokenizer, checkpoints, generation, parallel setup."""
from llama.config import ModelArgs
from llama.model import Transformer
from llama.tokenizers import Tokenizer
from llama.generation import Llama

__all__ = ["ModelArgs", "Transformer", "Tokenizer", "Llama"]
