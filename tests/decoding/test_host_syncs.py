"""Host syncs per steered step of the steering adapter (what vLLM's logits processor runs each step), counted
on the CPU: the logits are a tensor subclass standing for device memory, so every value derived from them is
one too, and the test logs

- reads of device values on the host (``tolist``, ``item``, ``bool``, ``int``, ``float``, ``cpu``, ``numpy``):
  on a GPU each waits for every kernel queued before it;
- implicit uploads: a device tensor indexed with a Python list or a host tensor (PyTorch copies the index up
  and waits for it);
- blocking uploads: ``tensor.to(device)`` or ``torch.tensor(..., device=...)`` without ``non_blocking``
  (from pageable memory the copy waits for the stream);

and asserts none in a steady step of TITA (its reward model inside vLLM's model, as ``decoding.vllm.fork_spec
.InModelFork`` serves it), FiSAO (scored at admission) and both, beside an unsteered row, with the steered
tokens counted. ``decoding.host.upload`` (pinned memory, ``non_blocking=True``) is the one way values go up.
"""

import types

import pytest
import torch

import decoding.methods.fisao as fisao_module
import decoding.methods.tita as tita_module
import decoding.vllm.adapter as adapter_module
from decoding.methods import Resources
from decoding.vllm.adapter import PerRequestSteering, WorkerTarget
from decoding.verifier import Verifier
from decoding.vllm.protocol import ARG, Counters
from shapeworld.models import MODELS_DIR

READS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
         torch.Tensor.__index__, torch.Tensor.cpu, torch.Tensor.numpy}
INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.index_select, torch.Tensor.index_add_,
            torch.Tensor.index_fill_, torch.Tensor.index_copy_}
LOG: list[tuple[str, str]] = []


def _host_index(idx) -> bool:
    if isinstance(idx, (list, tuple)):
        return any(isinstance(i, (list, tuple)) or _host_index(i) for i in idx) if isinstance(idx, tuple) else True
    return type(idx) is torch.Tensor


class OnDevice(torch.Tensor):
    """A CPU tensor that stands for device memory (results of ops on it are ``OnDevice`` too)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in READS:
            LOG.append(("read", func.__name__))
        elif func in INDEXING:
            idx = args[2] if func in (torch.Tensor.index_select, torch.Tensor.index_add_, torch.Tensor.index_fill_,
                                      torch.Tensor.index_copy_) else args[1]
            if _host_index(idx):
                LOG.append(("implicit upload", func.__name__))
        return super().__torch_function__(func, types, args, kwargs or {})


def _upload(values, dtype, device):
    LOG.append(("async upload", ""))
    t = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    return t.as_subclass(OnDevice)


class InModelReward:
    """TITA's reward model inside vLLM's model (``InModelFork``'s interface): its logits for this step's rows."""

    in_model = True
    vocab_size = 64
    logits_table: torch.Tensor = None

    def logits(self, rows, candidates=None):
        out = self.logits_table[rows]
        return out if candidates is None else out.gather(-1, candidates)

    select = merge = staticmethod(lambda *a: None)


@pytest.fixture
def counted(monkeypatch):
    """The log of one block of code's host syncs (and non-blocking uploads)."""
    for mod in (adapter_module, tita_module, fisao_module):
        monkeypatch.setattr(mod, "upload", _upload, raising=False)
    to, tensor = torch.Tensor.to, torch.tensor

    def blocking_to(self, *args, **kwargs):
        if type(self) is torch.Tensor and not kwargs.get("non_blocking") and (
                "device" in kwargs or any(isinstance(a, (torch.device, str)) for a in args)):
            LOG.append(("blocking upload", "to"))
        return to(self, *args, **kwargs)

    def blocking_tensor(*args, **kwargs):
        if kwargs.get("device") is not None:
            LOG.append(("blocking upload", "torch.tensor"))
        return tensor(*args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", blocking_to)
    monkeypatch.setattr(torch, "tensor", blocking_tensor)
    LOG.clear()
    return LOG


def _batch(tmp_path):
    verifier = Verifier(MODELS_DIR / "verifier", weights=False)
    reward = InModelReward()
    steering = PerRequestSteering(Resources(WorkerTarget(str(MODELS_DIR / "vlm")), reward, verifier),
                                  Counters(str(tmp_path / "counters")))
    prompt = steering.target.tokenizer("USER: <image> describe the image . ASSISTANT:").input_ids
    scores = [0.0] * len(verifier.phrases)
    scores[3], scores[10] = 4.0, -4.0
    outputs = []
    added = []
    for slot, methods in enumerate([{"tita": 0.9}, {"fisao": 6.0}, None, {"tita": 0.9, "fisao": 6.0}, {"tita": 0.5}]):
        outputs.append([])
        args = None if methods is None else {"slot": slot, "eos": 3, "methods": methods, "messages": [],
                                             "verifier_scores": scores}
        steering.counters.reset(slot)
        added.append((slot, types.SimpleNamespace(extra_args={ARG: args} if args else None), prompt, outputs[-1]))
    steering.update([], added, [], lambda d: False)
    return steering, reward, outputs


def _step(steering, reward, outputs, gen):
    logits = torch.randn(len(outputs), 64, generator=gen).as_subclass(OnDevice)
    reward.logits_table = (logits + 3 * torch.randn(len(outputs), 64, generator=gen)).as_subclass(OnDevice)
    scores = steering.apply(logits)
    for out, row in zip(outputs, torch.Tensor.tolist(torch.Tensor.argmax(scores.as_subclass(torch.Tensor), -1))):
        out.append(row)  # what vLLM samples, and hands back through the rows' live output lists
    return scores


def test_a_steady_steered_step_makes_no_host_sync(tmp_path, counted):
    steering, reward, outputs = _batch(tmp_path)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):  # the rows start (cohorts), then join the methods' batched states
        _step(steering, reward, outputs, gen)
    before = steering.counters.steered[:5].clone()
    counted.clear()
    for _ in range(4):
        _step(steering, reward, outputs, gen)
    syncs = [e for e in counted if e[0] != "async upload"]
    assert syncs == [], syncs
    assert 0 < len(counted) <= 4 * 12  # a few index and strength lists per step, none of them waited for
    steered = steering.counters.steered[:5] - before
    assert steered[2] == 0 and steered.sum() > 0  # counted on the "device", in the counters file
    assert all(len(o) == 7 for o in outputs)


def test_counts_restart_on_a_new_admission_and_survive_a_resumed_row(tmp_path, counted):
    steering, reward, outputs = _batch(tmp_path)
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):
        _step(steering, reward, outputs, gen)
    kept = float(steering.counters.steered[0])
    assert kept > 0
    params = types.SimpleNamespace(extra_args={ARG: {"slot": 0, "eos": 3, "methods": {"tita": 0.9}, "messages": []}})
    steering.update([0], [(0, params, [1, 2], outputs[0])], [], lambda d: False)  # preempted and resumed
    _step(steering, reward, outputs, gen)
    assert float(steering.counters.steered[0]) >= kept
    steering.counters.reset(0)  # the server hands slot 0 to a new request
    steering.update([0], [(0, params, [1, 2], [])], [], lambda d: False)
    _step(steering, reward, outputs, gen)
    assert float(steering.counters.steered[0]) <= 1
