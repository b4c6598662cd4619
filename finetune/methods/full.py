"""Full fine-tuning, and freeze tuning (only the last `train_layers` blocks train): the base's own
weights train in float32, and what is saved is the model itself, a checkpoint in our format."""
from llama.errors import LlamaInputError
from finetune.methods.base import Method, register_method


@register_method
class Full(Method):
    name = "full"
    trains_base = True
    output_dir = "model"

    def trained_modules(self, model, cfg) -> list:
        return [model]

    def attach(self, model, cfg, tokenizer):
        for module in self.trained_modules(model, cfg):
            for p in module.parameters():
                p.data = p.data.float()
                p.requires_grad_(True)
        return model


@register_method
class Freeze(Full):
    name = "freeze"

    def trained_modules(self, model, cfg) -> list:
        blocks = list(model.layers)
        if not 1 <= cfg.train_layers <= len(blocks):
            raise LlamaInputError(f"train_layers must be 1..{len(blocks)}, got {cfg.train_layers}")
        return blocks[-cfg.train_layers:]
