"""The grounding judge's image scoring for concurrent requests, batched: requests that arrive while a
verifier pass runs are scored together in the next one (no timer, so no added latency when idle)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

MAX_IMAGES = 64  # images per verifier pass


class BatchedJudge:
    """``scores(images)`` -> a future of the judge's ``{object: z-score}`` for one request's images.
    ``judge``: a ``reward_models.grounding.Judge``; ``executor``: where the verifier passes run (default:
    a thread of its own, off the event loop and out of the way of request preprocessing, which would
    otherwise queue behind judge passes). A pass that fails is retried request by request, so only a
    faulty request loses its scores."""

    def __init__(self, judge, executor=None):
        self.judge = judge
        self.executor = executor or ThreadPoolExecutor(1, thread_name_prefix="vlm-steer-judge")
        self.pending: list[tuple[list, asyncio.Future]] = []
        self.running = False

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    def scores(self, images: list) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.pending.append((images, fut))
        if not self.running:
            self.running = True
            loop.create_task(self._drain())
        return fut

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.pending:
                take, n = [], 0
                while self.pending and (not take or n + len(self.pending[0][0]) <= MAX_IMAGES):
                    take.append(self.pending.pop(0))
                    n += len(take[-1][0])
                take = [(im, f) for im, f in take if not f.cancelled()]
                if not take:
                    continue
                try:
                    results = await loop.run_in_executor(self.executor, self.judge.scores_batch, [im for im, _ in take])
                except Exception:
                    results = []
                    for im, _ in take:
                        try:
                            results.append(await loop.run_in_executor(self.executor, self.judge.scores, im))
                        except Exception as e:  # noqa: PERF203 — this request alone fails
                            results.append(e)
                for (_, f), r in zip(take, results):
                    if not f.done():
                        f.set_exception(r) if isinstance(r, Exception) else f.set_result(r)
        finally:
            self.running = False
