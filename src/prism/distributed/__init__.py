"""Context-parallel Prism attention: one sequence sharded across ranks.

* :mod:`~prism.distributed.plan` - the sharding contract (:class:`ShardPlan`);
* :mod:`~prism.distributed.cost` - what a call moves (:class:`CommunicationStats`)
  and the traffic model against ring attention (:func:`communication_volume`,
  :func:`kv_tiles_to_fetch`);
* :mod:`~prism.distributed.attention` - the algorithm
  (:func:`context_parallel_prism_attention`), which calls the reference stages
  for pooling, calibration, scoring, top-p and attention (the Triton kernel on
  CUDA) and adds only the communication and the merge of partial softmaxes.

It runs on any ``torch.distributed`` backend: ``gloo`` on CPU tensors,
``nccl`` on CUDA tensors.
"""

from .attention import context_parallel_prism_attention
from .cost import (
    CommunicationModel,
    CommunicationStats,
    communication_volume,
    kv_tiles_to_fetch,
)
from .plan import LAYOUTS, ShardPlan

__all__ = [
    "LAYOUTS",
    "ShardPlan",
    "CommunicationStats",
    "CommunicationModel",
    "context_parallel_prism_attention",
    "communication_volume",
    "kv_tiles_to_fetch",
]
