"""Tensor-parallel layers: fairscale's column/row-parallel linears and parallel embedding when the
model is split across ranks, plain torch layers in one process; and the collectives that other
layers split the same way (LoRA, int4, NF4) wrap around their own products."""
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from llama.cpu_linear import Linear
from llama.distributed import model_parallel_rank, model_parallel_size
from llama.errors import LlamaInputError


def tensor_parallel_kind(layer: nn.Module):
    """None for a whole linear, "column" or "row" for one split across tensor-parallel ranks:
    fairscale's layers by class, others (quantized linears) by their `tensor_parallel` attribute."""
    if hasattr(layer, "tensor_parallel"):
        return layer.tensor_parallel
    return {"ColumnParallelLinear": "column", "RowParallelLinear": "row"}.get(type(layer).__name__)


def _local(size: int, what: str) -> int:
    n = model_parallel_size()
    if size % n:
        raise LlamaInputError(f"{what} {size} does not divide by the {n} tensor-parallel ranks")
    return size // n


def _bare(cls, **attrs) -> nn.Module:
    """A fairscale layer built without its __init__, which allocates and initialises a CPU weight
    whatever the device (so the model could not be built on `meta` and filled from the
    checkpoint). Its forward, and the collectives in it, are fairscale's own."""
    layer = cls.__new__(cls)
    nn.Module.__init__(layer)
    for name, value in attrs.items():
        setattr(layer, name, value)
    layer.register_parameter("bias", None)
    return layer


def column_linear(in_features: int, out_features: int, gather_output: bool = False) -> nn.Module:
    """Linear whose output features are split across ranks (weight [out/n, in], split on dim 0)."""
    if model_parallel_size() == 1:
        return Linear(in_features, out_features)
    from fairscale.nn.model_parallel.layers import ColumnParallelLinear

    local_out = _local(out_features, "output features")
    return _bare(
        ColumnParallelLinear, in_features=in_features, out_features=out_features, gather_output=gather_output,
        output_size_per_partition=local_out, weight=nn.Parameter(torch.empty(local_out, in_features)),
    )


def row_linear(in_features: int, out_features: int) -> nn.Module:
    """Linear whose input features are split across ranks (weight [out, in/n], split on dim 1);
    its outputs are summed over ranks."""
    if model_parallel_size() == 1:
        return Linear(in_features, out_features)
    from fairscale.nn.model_parallel.layers import RowParallelLinear

    local_in = _local(in_features, "input features")
    return _bare(
        RowParallelLinear, in_features=in_features, out_features=out_features, input_is_parallel=True,
        input_size_per_partition=local_in, weight=nn.Parameter(torch.empty(out_features, local_in)),
    )


def embedding(vocab_size: int, dim: int, split_dim: int = 1) -> nn.Module:
    """Token embedding split across ranks on dim 1 (weight [vocab, dim/n]) as in LLaMA-1/2, or
    on dim 0, the vocabulary (weight [vocab/n, dim]) as in Meta's Llama-3."""
    if model_parallel_size() == 1:
        return nn.Embedding(vocab_size, dim)
    if split_dim == 0:
        return _vocab_embedding(vocab_size, dim)
    from fairscale.nn.model_parallel.layers import ParallelEmbedding

    local_dim = _local(dim, "embedding dim")
    layer = _bare(
        ParallelEmbedding, num_embeddings=vocab_size, embedding_dim=dim, embedding_dim_per_partition=local_dim,
        padding_idx=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False, sparse=False, _weight=None,
        weight=nn.Parameter(torch.empty(vocab_size, local_dim)),
    )
    del layer.bias  # embeddings have none
    return layer


def _vocab_embedding(vocab_size: int, dim: int) -> nn.Module:
    """fairscale's VocabParallelEmbedding: each rank holds a contiguous range of token rows,
    looks up the tokens in it (zeros for the others), and the ranks sum their outputs."""
    from fairscale.nn.model_parallel.layers import VocabParallelEmbedding

    local_vocab = _local(vocab_size, "vocab size")
    start = model_parallel_rank() * local_vocab
    layer = _bare(
        VocabParallelEmbedding, num_embeddings=vocab_size, embedding_dim=dim, padding_idx=None, max_norm=None,
        norm_type=2.0, scale_grad_by_freq=False, sparse=False, _weight=None, vocab_start_index=start,
        vocab_end_index=start + local_vocab, num_embeddings_per_partition=local_vocab,
        weight=nn.Parameter(torch.empty(local_vocab, dim)),
    )
    del layer.bias  # embeddings have none
    return layer


def parallel_forward(kind, x: torch.Tensor, local=None) -> torch.Tensor:
    """fairscale's collectives around a local product `local(x)` (None: x itself) of a layer split
    `kind` ("column", "row" or None): a column-parallel layer takes the whole input, its gradient
    summed over the ranks in backward; a row-parallel one sums its partial outputs."""
    from fairscale.nn.model_parallel.mappings import copy_to_model_parallel_region, reduce_from_model_parallel_region

    local = local or (lambda t: t)
    if kind == "column":
        return local(copy_to_model_parallel_region(x))
    if kind == "row":
        return reduce_from_model_parallel_region(local(x))
    return local(x)


def gather_split(t: torch.Tensor, dim) -> torch.Tensor:
    """This rank's slice -> the whole tensor (all ranks of the tensor-parallel group call it; of
    every rank, for an FSDP-sharded DTensor)."""
    if isinstance(t, DTensor):
        return t.full_tensor()
    if dim is None or model_parallel_size() == 1:
        return t
    from fairscale.nn.model_parallel.initialize import get_model_parallel_group

    parts = [torch.empty_like(t) for _ in range(model_parallel_size())]
    dist.all_gather(parts, t.contiguous(), group=get_model_parallel_group())
    return torch.cat(parts, dim=dim)


def local_slice(t: torch.Tensor, dim) -> torch.Tensor:
    """The whole tensor -> this rank's slice along `dim` (None: replicated, kept whole)."""
    if dim is None or model_parallel_size() == 1:
        return t
    return t.chunk(model_parallel_size(), dim=dim)[model_parallel_rank()]
