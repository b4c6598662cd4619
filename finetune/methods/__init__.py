"""Fine-tuning methods, registered by name: lora, prompt, full, freeze (see base.Method)."""
from finetune.methods.base import METHODS, Method, base_transformer, get_method, method_for_peft_type, register_method
from finetune.methods import lora, prompt, full  # noqa: F401,I001  (each registers itself; this order is the listed one)

__all__ = ["METHODS", "Method", "base_transformer", "get_method", "method_for_peft_type", "register_method"]
