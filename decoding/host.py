"""Host values onto the device without a host sync, as vLLM's ``async_tensor_h2d`` (``vllm/utils``) does: a
pinned staging tensor and a non-blocking copy, so the host goes on queuing work while the copy waits its
turn on the stream (a copy from pageable memory, or ``torch.tensor(values, device=cuda)``, makes the host wait
for every kernel queued before it: a sync per step). On a CPU device the staging tensor is the result.

Our own five lines rather than vLLM's: the steering adapter and the methods run in ``make test`` without
vLLM installed.
"""

from __future__ import annotations

import torch


def upload(values, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``values`` (a list, or a CPU tensor) as a tensor of ``dtype`` on ``device``, copied without blocking."""
    t = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    device = torch.device(device)
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)
