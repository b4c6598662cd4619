"""Int4 (GPTQ layout) and NF4 base weights. Importing the package registers them with llama/:
the int4 and nf4 quantizers (`llama.loader.load_model(..., quant=...)`) and the GPTQ folder format."""
from quant import checkpoint, linear  # noqa: F401  (registration)
