"""The steering adapter that vLLM's logits processor wraps, driven here by fake batch updates around the
transformers engine as the model runner: the same method objects give the same tokens as the
transformers engine's own step loop, while rows finish, leave, move and join as in vLLM's batch."""

import types

import pytest
import torch

from decoding.methods import Resources
from decoding.request import GenerationRequest, SamplingParams, SteeringSpec
from decoding.steering_adapter import PerRequestSteering, WorkerTarget
from decoding.transformers_engine import TransformersEngine
from decoding.vllm_engine import _png
from decoding.vllm_protocol import ARG, Counters
from reward_models.verifier import Verifier
from shapeworld.models import MODELS_DIR
from shapeworld.text import CAPTION_PROMPT, question
from shapeworld.world import make_scenes

SCENES = make_scenes("bait", 8, 9191)
SWAP, ONE_WAY = "swap", "one-way"


@pytest.fixture(scope="module")
def adapter_resources(steering_engine):
    return Resources(WorkerTarget(str(MODELS_DIR / "vlm")), steering_engine.resources.reward,
                     Verifier(MODELS_DIR / "verifier"))


def _requests(method, n=8, max_tokens=24):
    out = []
    for i, s in enumerate(SCENES[:n]):
        text = question(s.objects[0]) if i % 3 == 2 else CAPTION_PROMPT
        out.append(GenerationRequest.single_turn(text, [s.image()], sampling=SamplingParams(max_tokens=max_tokens + i),
                                                 steering=SteeringSpec(method)))
    return out


def _params(engine, req, slot):
    steer = engine.resolve(req.steering)
    args = {"slot": slot, "eos": engine.tokenizer.eos_token_id, "methods": steer, "messages": req.messages,
            "images": [_png(im) for im in req.images]}
    return types.SimpleNamespace(extra_args={ARG: args} if steer else None)


def run_like_vllm(engine, steering, requests, join_late=(), corrupt=()):
    """Greedy decoding with the engine as the model runner and ``steering`` as vLLM's logits processor:
    finished rows are removed and the batch condensed (one-way moves, as vLLM does), ``join_late`` rows
    join after three steps, and two rows are swapped every fifth step."""
    first = [i for i in range(len(requests)) if i not in join_late]
    outputs = {i: [] for i in range(len(requests))}

    def prefill(idx):
        batch = engine.prefill([engine.encode(requests[i], steer=False) for i in idx], steer=False)
        added = []
        for k, i in enumerate(idx):
            p = _params(engine, requests[i], i)
            if i in corrupt:
                p.extra_args[ARG]["images"] = [b"\x89PNG not really"]
            added.append((k, p, engine.encode(requests[i], steer=False).prompt_ids, outputs[i]))
        return batch, added

    batch, added = prefill(first)
    order = list(first)  # batch index -> request index
    steering.update([], added, [], lambda d: d == SWAP)
    step = 0
    while order:
        scores = steering.apply(batch.logits.clone())
        tokens = scores.argmax(-1)
        done = []
        for k, (i, t) in enumerate(zip(order, tokens.tolist())):
            if t in engine.eos_ids or len(outputs[i]) + 1 >= requests[i].sampling.max_tokens:
                if t not in engine.eos_ids:
                    outputs[i].append(t)
                done.append(k)
            else:
                outputs[i].append(t)
        keep = [k for k in range(len(order)) if k not in done]
        removed, moved = list(done), []
        if done and keep:  # condense: the kept rows fill the holes, in order (one-way moves)
            for new, old in enumerate(keep):
                if new != old:
                    moved.append((old, new, ONE_WAY))
        order = [order[k] for k in keep]
        if keep:
            batch = engine.select(batch, keep)
            engine.decode_one_token(batch, tokens[keep], steer=False)
        step += 1
        if step == 3 and join_late:
            new, new_added = prefill(list(join_late))
            base = len(order)
            new_added = [(base + k, p, ids, out) for k, p, ids, out in new_added]
            batch = engine.merge(batch, new) if order else new
            order += list(join_late)
            steering.update(removed, [], moved, lambda d: d == SWAP)
            steering.update([], new_added, [], lambda d: d == SWAP)
        elif step % 5 == 0 and len(order) > 2:  # a swap of rows 0 and 1
            idx = [1, 0, *range(2, len(order))]
            batch = engine._reorder(batch, idx)
            order = [order[k] for k in idx]
            steering.update(removed, [], moved + [(0, 1, SWAP)], lambda d: d == SWAP)
        else:
            steering.update(removed, [], moved, lambda d: d == SWAP)
    return outputs


@pytest.mark.parametrize("method", ["tita", "fisao", "tita+fisao"])
def test_adapter_gives_the_transformers_engines_tokens(steering_engine, adapter_resources, tmp_path, method):
    requests = _requests(method)
    want = [c.token_ids for c in steering_engine.generate(requests)]
    counters = Counters(str(tmp_path / "counters"))
    got = run_like_vllm(steering_engine, PerRequestSteering(adapter_resources, counters), requests, join_late=(5, 6))
    assert [got[i] for i in range(len(requests))] == want
    steered = [int(counters.slot(i)[0]) for i in range(len(requests))]
    assert steered == [c.steered_tokens for c in steering_engine.generate(requests)] and sum(steered) > 0


def test_a_row_that_cannot_start_fails_alone(steering_engine, adapter_resources, tmp_path):
    requests = _requests("tita", n=4)
    counters = Counters(str(tmp_path / "counters"))
    got = run_like_vllm(steering_engine, PerRequestSteering(adapter_resources, counters), requests, corrupt=(1,))
    want = [c.token_ids for c in steering_engine.generate(requests)]
    assert got[1] == [] and int(counters.slot(1)[1]) == 1  # ended at once, reported as a tita failure
    assert [got[i] for i in (0, 2, 3)] == [want[i] for i in (0, 2, 3)]
