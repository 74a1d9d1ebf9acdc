"""The grounding judge batched across concurrent requests: the same scores as one request at a time, fewer
verifier passes, and a request whose images fail loses only its own scores."""

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from decoding.verifier import Verifier
from reward_models.grounding import Judge
from server.judging import BatchedJudge
from server.settings import EMBEDDED
from shapeworld.world import make_scenes


@pytest.fixture(scope="module")
def judge():
    return Judge(Verifier(EMBEDDED / "judge"))


class Counting:
    """The judge, counting its verifier passes."""

    def __init__(self, judge):
        self.judge, self.passes = judge, 0

    def scores_batch(self, requests):
        self.passes += 1
        if any(im is None for images in requests for im in images):
            raise ValueError("an unreadable image")
        return self.judge.scores_batch(requests)

    def scores(self, images):
        self.passes += 1
        if any(im is None for im in images):
            raise ValueError("an unreadable image")
        return self.judge.scores(images)


def test_concurrent_requests_share_passes_and_get_their_own_scores(judge):
    scenes = make_scenes("bait", 9, 31)
    requests = [[scenes[i].image()] for i in range(6)] + [[scenes[6].image(), scenes[7].image()], [scenes[8].image()]]
    counting = Counting(judge)

    async def run():
        batched = BatchedJudge(counting, ThreadPoolExecutor(1))
        return await asyncio.gather(*(batched.scores(r) for r in requests))

    got = asyncio.run(run())
    assert counting.passes == 1  # they all arrived before the first pass started: one pass for the nine images
    for images, scores in zip(requests, got):
        want = judge.scores(images)
        assert scores.keys() == want.keys()
        assert all(abs(scores[k] - want[k]) < 1e-4 for k in want)


def test_a_failing_request_fails_alone(judge):
    scenes = make_scenes("bait", 3, 32)
    requests = [[scenes[0].image()], [scenes[1].image()], [None], [scenes[2].image()]]

    async def run():
        batched = BatchedJudge(Counting(judge), ThreadPoolExecutor(1))
        return await asyncio.gather(*(batched.scores(r) for r in requests), return_exceptions=True)

    got = asyncio.run(run())
    assert isinstance(got[2], ValueError)
    for i in (0, 1, 3):
        want = judge.scores(requests[i])
        assert all(abs(got[i][k] - want[k]) < 1e-4 for k in want)
