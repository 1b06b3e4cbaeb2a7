"""Cross-rank validation: every rank checks its inputs, then all ranks agree or all raise."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from prism.reference import PrismConfig, resolve_config
from prism.reference.validation import FLOAT_DTYPES, validate_qkv, validate_scale

from .plan import LAYOUTS, _check_layout

_DTYPE_CODES = {dtype: code for code, dtype in enumerate(FLOAT_DTYPES)}
_INPUT_FIELDS = ("batch", "q_heads", "kv_heads", "head_dim", "value_dim", "dtype", "causal",
                 "layout", "scale")
_CONFIG_FIELDS = ("block_size", "high_dim", "low_dim", "high_threshold", "low_threshold",
                  "calibrate", "high_temperature", "low_temperature", "force_sink",
                  "force_diagonal", "rope_layout", "eps")
# ok flag, the fields above, then the local query and key counts.
_META_SIZE = 1 + len(_INPUT_FIELDS) + len(_CONFIG_FIELDS) + 2


def _encode(value) -> float:
    if value is None:  # no valid setting is infinite, so None cannot collide
        return math.inf
    if isinstance(value, str):
        return float(("half", "interleaved", *LAYOUTS).index(value))
    return float(value)


def _describe_field(name: str, code: float) -> str:
    if name == "dtype":
        return str(FLOAT_DTYPES[int(code)])
    if name == "layout":
        return repr(("half", "interleaved", *LAYOUTS)[int(code)])
    if code == math.inf:
        return "None"
    return f"{code:g}"


def _check_group(group):
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "torch.distributed is not initialised; call "
            "torch.distributed.init_process_group(...) first (torchrun sets the environment "
            "for backend='nccl' on GPUs or 'gloo' on CPUs)"
        )
    if group is None:
        group = dist.group.WORLD
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"group must be a torch.distributed.ProcessGroup or None (the default group), "
            f"got {type(group).__name__}"
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(
            "this process is not a member of group; call only on the group's ranks"
        )
    return group, rank, dist.get_world_size(group)


def _collective_device(q, group) -> torch.device:
    if isinstance(q, torch.Tensor):
        return q.device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _local_metadata(q, k, v, cfg: PrismConfig, causal, scale, layout) -> list[float]:
    """Check this rank's inputs (contract §8) and describe them for the cross-rank check."""
    validate_qkv(q, k, v, causal=False)  # local Nq may exceed local Nk; checked globally
    validate_scale(scale)
    _check_layout(layout)
    inputs = (q.shape[0], q.shape[1], k.shape[1], q.shape[3], v.shape[3],
              _DTYPE_CODES[q.dtype], causal, layout, scale)
    config = tuple(getattr(cfg, name) for name in _CONFIG_FIELDS)
    return [1.0, *map(_encode, inputs + config), float(q.shape[2]), float(k.shape[2])]


def _exchange_metadata(q, k, v, config, overrides, causal, scale, layout, group, world_size,
                       device):
    """Validate locally, then agree across ranks; every rank raises if any rank is wrong.

    A rank that raised alone would leave the others blocked in the next
    collective, so local errors are shared through one all-gather first.
    """
    local_error = None
    row = [0.0] * _META_SIZE
    try:
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be True or False, got {causal!r}")
        cfg = resolve_config(config, **overrides)
        if cfg.estimator != "prism":
            raise ValueError(
                f"context_parallel_prism_attention implements estimator='prism' (contract v1.1) "
                f"only, got estimator={cfg.estimator!r}; use the single-device "
                "prism.prism_attention for the other estimators (docs/estimators.rst)"
            )
        row = _local_metadata(q, k, v, cfg, causal, scale, layout)
    except (TypeError, ValueError) as err:
        local_error = err
    gathered = [torch.empty(_META_SIZE, dtype=torch.float64, device=device)
                for _ in range(world_size)]
    dist.all_gather(gathered, torch.tensor(row, dtype=torch.float64, device=device), group=group)
    table = torch.stack(gathered).cpu()
    if local_error is not None:
        raise local_error
    failed = [r for r in range(world_size) if table[r, 0] != 1.0]
    if failed:
        raise ValueError(
            f"rank(s) {failed} rejected their inputs, so every rank stops here; see the "
            "error raised on those ranks"
        )
    names = _INPUT_FIELDS + _CONFIG_FIELDS
    for column, name in enumerate(names, start=1):
        values = table[:, column]
        differ = (values != values[0]).nonzero().flatten().tolist()
        if differ:
            r = differ[0]
            raise ValueError(
                f"{name} differs across ranks: rank 0 has {_describe_field(name, values[0])}, "
                f"rank {r} has {_describe_field(name, values[r])}; every rank must pass the "
                "same batch, heads, head dims, dtype, causal, layout, scale and config"
            )
    query_lengths = table[:, -2].long().tolist()
    key_lengths = table[:, -1].long().tolist()
    return cfg, query_lengths, key_lengths

