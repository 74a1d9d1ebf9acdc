"""The steering adapter that vLLM's logits processor wraps, driven here by fake batch updates around the
transformers engine as the model runner: the same method objects give the same tokens as the
transformers engine's own step loop, while rows finish, leave, move and join as in vLLM's batch."""

import types

import pytest
import torch

from decoding.methods import Resources
from decoding.request import GenerationRequest, SamplingParams, SteeringSpec
from decoding.vllm.adapter import PerRequestSteering, WorkerTarget
from decoding.transformers_engine import TransformersEngine
from decoding.vllm.engine import _png
from decoding.vllm.protocol import ARG, Counters, ExplainRing
from decoding.verifier import Verifier
from shapeworld.models import MODELS_DIR
from shapeworld.text import CAPTION_PROMPT, question
from shapeworld.world import make_scenes

SCENES = make_scenes("bait", 8, 9191)
SWAP, ONE_WAY = "swap", "one-way"


@pytest.fixture(scope="module")
def adapter_resources(steering_engine):
    # what vLLM's worker loads (decoding.vllm.steering): a forked reward model as a whole model, the target
    # loaded again with the fork's layers in place
    from decoding.transformers_engine import TransformersEngine

    reward = TransformersEngine(MODELS_DIR / "reward", fork_target=MODELS_DIR / "vlm")
    return Resources(WorkerTarget(str(MODELS_DIR / "vlm")), reward, Verifier(MODELS_DIR / "verifier"))


def _requests(method, n=8, max_tokens=24, explain=False):
    out = []
    for i, s in enumerate(SCENES[:n]):
        text = question(s.objects[0]) if i % 3 == 2 else CAPTION_PROMPT
        out.append(GenerationRequest.single_turn(text, [s.image()], sampling=SamplingParams(max_tokens=max_tokens + i),
                                                 steering=SteeringSpec(method, explain=explain)))
    return out


def _params(engine, req, slot, scorer=None):
    """The vllm engine's arguments for ``req``; with ``scorer`` (a verifier), FiSAO's scores computed at
    admission and no image sent (what the vllm engine does for a request no worker-side model reads)."""
    steer = engine.resolve(req.steering)
    args = {"slot": slot, "eos": engine.tokenizer.eos_token_id, "methods": steer, "messages": req.messages,
            "images": [_png(im) for im in req.images]}
    if scorer is not None:
        del args["images"]
        args["verifier_scores"] = scorer.scores(req.images[:1])[0].tolist()
    if req.steering.explain:
        args["explain"] = [slot, 1000 + slot]  # ring slot, nonce
    return types.SimpleNamespace(extra_args={ARG: args} if steer or req.steering.explain else None)


def run_like_vllm(engine, steering, requests, join_late=(), corrupt=(), chunks=3, scorer=None):
    """Greedy decoding with the engine as the model runner and ``steering`` as vLLM's logits processor.
    Finished rows are removed and the batch condensed (one-way moves, as vLLM does); ``join_late`` rows
    join after three steps and are prefilled in ``chunks`` chunks (vLLM's chunked prefill: the row is in
    the batch and its logits are steered at every chunk, but the samples of all chunks but the last are
    discarded and its tokens do not grow); every fifth step two rows are swapped."""
    outputs = {i: [] for i in range(len(requests))}

    def added(idx, base):
        out = []
        for k, i in enumerate(idx):
            p = _params(engine, requests[i], i, scorer)
            if i in corrupt:
                p.extra_args[ARG]["images"] = [b"\x89PNG not really"]
            out.append((base + k, p, engine.encode(requests[i], steer=False).prompt_ids, outputs[i]))
        return out

    first = [i for i in range(len(requests)) if i not in join_late]
    batch = engine.prefill([engine.encode(requests[i], steer=False) for i in first], steer=False)
    order = list(first)  # batch index -> request index: the engine's rows, then rows still in chunked prefill
    chunking: dict[int, int] = {}  # request index -> chunks left
    steering.update([], added(first, 0), [], lambda d: d == SWAP)
    step = 0
    while order:
        live = [i for i in order if i not in chunking]
        garbage = torch.randn(len(order) - len(live), batch.logits.shape[-1]) if batch is not None else None
        logits = batch.logits.clone() if batch is not None else torch.empty(0, garbage.shape[-1])
        scores = steering.apply(torch.cat([logits, garbage]) if garbage is not None and len(garbage) else logits)
        tokens = scores.argmax(-1)
        done, last_chunk = [], []
        for k, (i, t) in enumerate(zip(order, tokens.tolist())):
            if i in chunking:
                chunking[i] -= 1
                if chunking[i] == 0:
                    last_chunk.append(i)
                continue
            if t in engine.eos_ids or len(outputs[i]) + 1 >= requests[i].sampling.max_tokens:
                if t not in engine.eos_ids:
                    outputs[i].append(t)
                done.append(k)
            else:
                outputs[i].append(t)
        keep_engine = [k for k, i in enumerate(order) if i not in chunking and k not in done]
        if batch is not None and keep_engine:
            batch = engine.select(batch, keep_engine)
            engine.decode_one_token(batch, tokens[keep_engine], steer=False)
        elif batch is not None:
            batch = None
        for i in last_chunk:  # the last chunk's sample is the row's first token; the engine now holds the row
            del chunking[i]
        if last_chunk:  # (its first token is taken again from a full prefill: the same greedy argmax)
            new = engine.prefill([engine.encode(requests[i], steer=False) for i in last_chunk], steer=False)
            batch = new if batch is None else engine.merge(batch, new)
        keep = [k for k in range(len(order)) if k not in done]
        moved = [(old, new, ONE_WAY) for new, old in enumerate(keep) if new != old]
        order = [order[k] for k in keep]
        # the engine's rows first, then the rows still chunking (the fake runner keeps that layout)
        engine_rows = [i for i in order if i not in chunking]
        layout = engine_rows + [i for i in order if i in chunking]
        if layout != order:
            perm = [order.index(i) for i in layout]
            moved.append(("perm", perm, None))
            order = layout
        step += 1
        joins = []
        if step == 3 and join_late:
            joins = added(list(join_late), len(order))
            order += list(join_late)
            chunking.update({i: chunks for i in join_late})
        swap = []
        if step % 5 == 0 and len(engine_rows) > 2:  # rows 0 and 1 change places
            batch = engine.select(batch, [1, 0, *range(2, len(batch.rows))])
            order[0], order[1] = order[1], order[0]
            swap = [(0, 1, SWAP)]
        steering.update(list(done), [], [m for m in moved if m[0] != "perm"], lambda d: d == SWAP)
        for m in moved:
            if m[0] == "perm":  # a reordering as swaps, one at a time
                cur = list(range(len(m[1])))
                for a in range(len(cur)):
                    b = cur.index(m[1][a])
                    if a != b:
                        steering.update([], [], [(a, b, SWAP)], lambda d: d == SWAP)
                        cur[a], cur[b] = cur[b], cur[a]
        steering.update([], joins, swap, lambda d: d == SWAP)
    return outputs


@pytest.mark.parametrize("method", ["tita", "fisao", "tita+fisao"])
def test_adapter_gives_the_transformers_engines_tokens(steering_engine, adapter_resources, tmp_path, method):
    requests = _requests(method)
    want = [c.token_ids for c in steering_engine.generate(requests)]
    counters = Counters(str(tmp_path / "counters"))
    steering = PerRequestSteering(adapter_resources, counters)
    starts = {name: 0 for name in steering.methods}
    for name, m in steering.methods.items():
        def counted(rows, _start=m.start, _name=name):
            starts[_name] += 1
            return _start(rows)
        m.start = counted
    got = run_like_vllm(steering_engine, steering, requests, join_late=(1, 5, 6))
    assert [got[i] for i in range(len(requests))] == want
    # each method starts twice: the first rows, then the late ones, once for all their chunks
    assert {starts[m] for m in method.split("+")} == {2}, starts
    steered = [int(counters.steered[i]) for i in range(len(requests))]
    assert steered == [c.steered_tokens for c in steering_engine.generate(requests)] and sum(steered) > 0


def test_fisao_scored_at_admission_reads_no_image_in_the_worker(steering_engine, tmp_path):
    """The vllm engine scores a FiSAO request's image before it joins the batch and sends the scores, not
    the image: a worker whose verifier has no weights (its vocabulary and calibration only) steers every
    row as the transformers engine does."""
    requests = _requests("fisao")
    want = [c.token_ids for c in steering_engine.generate(requests)]
    files_only = Resources(WorkerTarget(str(MODELS_DIR / "vlm")), None, Verifier(MODELS_DIR / "verifier", weights=False))
    steering = PerRequestSteering(files_only, Counters(str(tmp_path / "counters")))
    started = []
    start = steering.methods["fisao"].start
    steering.methods["fisao"].start = lambda rows: started.extend(rows) or start(rows)
    got = run_like_vllm(steering_engine, steering, requests, join_late=(1, 5), scorer=Verifier(MODELS_DIR / "verifier"))
    assert [got[i] for i in range(len(requests))] == want
    assert len(started) == len(requests)
    assert all(not r.request.images and not r.inputs and r.verifier_scores is not None for r in started)


def test_a_row_that_cannot_start_fails_alone(steering_engine, adapter_resources, tmp_path):
    requests = _requests("tita", n=4)
    counters = Counters(str(tmp_path / "counters"))
    got = run_like_vllm(steering_engine, PerRequestSteering(adapter_resources, counters), requests, corrupt=(1,))
    want = [c.token_ids for c in steering_engine.generate(requests)]
    assert got[1] == [] and int(counters.failed[1]) == 1  # ended at once, reported as a tita failure
    assert [got[i] for i in (0, 2, 3)] == [want[i] for i in (0, 2, 3)]


def test_a_row_whose_start_fails_among_others_fails_alone(steering_engine, adapter_resources, tmp_path, monkeypatch):
    """The reward model raises for one request of several that join together (its start is batched):
    they are started one by one and only that request fails."""
    requests = _requests("tita", n=5)
    steering = PerRequestSteering(adapter_resources, Counters(str(tmp_path / "counters")))
    tita = steering.methods["tita"]
    original = tita.start

    def start(rows):
        if any(r.prompt_ids and "is there" in str(r.request.messages) for r in rows):
            raise RuntimeError("injected fault")
        return original(rows)

    monkeypatch.setattr(tita, "start", start)
    got = run_like_vllm(steering_engine, steering, requests)
    want = [c.token_ids for c in steering_engine.generate(requests)]
    assert got[2] == [] and int(steering.counters.failed[2]) == 1  # request 2 is the question
    assert [got[i] for i in (0, 1, 3, 4)] == [want[i] for i in (0, 1, 3, 4)]


@pytest.mark.parametrize("method", ["tita+fisao", "none"])
def test_explanations_through_the_ring_equal_the_transformers_engines(steering_engine, adapter_resources, tmp_path, method):
    """Per token, what the worker writes to the explanation ring (read back by token and position, as the
    vllm engine's server side does) equals the transformers engine's own ``explain``, late joiners and
    their chunked prefill included; a stale nonce or an unknown token reads nothing."""
    requests = _requests(method, n=6, explain=True)
    want = steering_engine.generate(requests)
    ring = ExplainRing(str(tmp_path / "explain"))
    got = run_like_vllm(steering_engine, PerRequestSteering(adapter_resources, Counters(str(tmp_path / "c")), ring),
                        requests, join_late=(1, 4))
    for i, c in enumerate(want):
        assert got[i] == c.token_ids and len(c.explain) == len(c.token_ids) > 0
        for pos, (tok, e) in enumerate(zip(got[i], c.explain)):
            r = ring.read(i, 1000 + i, pos, tok)
            assert r is not None, (i, pos)
            assert (r.token_id, r.base_token_id, r.changed) == (e.token_id, e.base_token_id, e.changed)
            assert r.logprob == pytest.approx(e.logprob, abs=1e-4)
            assert r.base_logprob == pytest.approx(e.base_logprob, abs=1e-4)
            assert r.base_top_logprob == pytest.approx(e.base_top_logprob, abs=1e-4)
            assert r.contributions.keys() == e.contributions.keys()
            for m in e.contributions:
                assert r.contributions[m] == pytest.approx(e.contributions[m], abs=1e-3)
    assert ring.read(0, 999, 0, got[0][0]) is None  # another request's nonce
    assert ring.read(0, 1000, 0, -5) is None  # a token that is no candidate
