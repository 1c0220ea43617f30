"""The encoder replicas' continuous batcher, without Ray: batches form when the model is free."""

from __future__ import annotations

import asyncio
import time

import pytest

from serve.batching import ContinuousBatcher


class Model:
    """A batch function that records its batches and can be held mid-batch."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.batches: list[list[str]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.started = asyncio.Event()
        self.fail_on = fail_on

    async def __call__(self, calls: list[str]) -> list[str]:
        self.batches.append(list(calls))
        self.started.set()
        await self.gate.wait()
        if self.fail_on in calls:
            raise ValueError(f"bad input {self.fail_on}")
        return [c.upper() for c in calls]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_a_lone_request_runs_at_once_and_a_busy_model_gets_full_batches():
    async def main():
        m = Model()
        b = ContinuousBatcher(m, max_batch_size=4)
        t0 = time.monotonic()
        assert await b.submit("a") == "A"
        assert time.monotonic() - t0 < 0.5 and m.batches == [["a"]]

        m.gate.clear()
        m.started.clear()
        first = asyncio.ensure_future(b.submit("x"))
        await m.started.wait()  # "x" is computing; the next ten queue up meanwhile
        rest = [asyncio.ensure_future(b.submit(f"r{i}")) for i in range(10)]
        await asyncio.sleep(0.05)
        assert b.queued == 10
        m.gate.set()
        assert await first == "X"
        assert await asyncio.gather(*rest) == [f"R{i}" for i in range(10)]
        assert m.batches[1:] == [
            ["x"],
            ["r0", "r1", "r2", "r3"],
            ["r4", "r5", "r6", "r7"],
            ["r8", "r9"],
        ]
        assert b.queued == 0

    run(main())


def test_sizes_count_items_and_an_oversized_call_runs_alone():
    async def main():
        m = Model()
        m.gate.clear()
        b = ContinuousBatcher(m, max_batch_size=4, size=len)
        hold = asyncio.ensure_future(b.submit("h"))
        await m.started.wait()
        calls = ["aaa", "b", "cccccc", "dd", "ee"]
        futs = [asyncio.ensure_future(b.submit(c)) for c in calls]
        await asyncio.sleep(0.05)
        m.gate.set()
        await hold
        assert await asyncio.gather(*futs) == [c.upper() for c in calls]
        assert m.batches == [["h"], ["aaa", "b"], ["cccccc"], ["dd", "ee"]]

    run(main())


def test_cancelled_callers_are_dropped_and_errors_reach_every_caller_of_the_batch():
    async def main():
        m = Model(fail_on="bad")
        m.gate.clear()
        b = ContinuousBatcher(m, max_batch_size=8)
        hold = asyncio.ensure_future(b.submit("h"))
        await m.started.wait()
        gone = asyncio.ensure_future(b.submit("gone"))
        same = [asyncio.ensure_future(b.submit(c)) for c in ("ok", "bad")]
        await asyncio.sleep(0.01)
        gone.cancel()
        await asyncio.sleep(0.01)
        m.gate.set()
        await hold
        results = await asyncio.gather(*same, return_exceptions=True)
        assert all(isinstance(r, ValueError) and "bad input bad" in str(r) for r in results)
        assert ["gone"] not in m.batches and ["ok", "bad"] in m.batches
        assert b.queued == 0
        assert await b.submit("after") == "AFTER"  # the batcher survives a failed batch

    run(main())


def test_wait_timeout_fills_a_batch_and_a_full_batch_does_not_wait():
    async def main():
        m = Model()
        b = ContinuousBatcher(m, max_batch_size=3, batch_wait_timeout_s=0.3)
        t0 = time.monotonic()
        one = asyncio.ensure_future(b.submit("a"))
        await asyncio.sleep(0.05)
        two = asyncio.ensure_future(b.submit("b"))
        assert await asyncio.gather(one, two) == ["A", "B"]
        assert m.batches == [["a", "b"]]
        assert 0.25 < time.monotonic() - t0 < 2.0  # waited for the timeout, then ran

        t0 = time.monotonic()
        assert await asyncio.gather(*(b.submit(c) for c in "xyz")) == ["X", "Y", "Z"]
        assert m.batches[-1] == ["x", "y", "z"] and time.monotonic() - t0 < 0.2

        b.set_limits(3, 0.0)  # reconfigured: no wait
        t0 = time.monotonic()
        assert await b.submit("q") == "Q" and time.monotonic() - t0 < 0.2

    run(main())


def test_bad_limits_and_bad_batch_functions_are_reported():
    with pytest.raises(ValueError, match="max_batch_size"):
        ContinuousBatcher(Model(), max_batch_size=0)
    with pytest.raises(ValueError, match="batch_wait_timeout_s"):
        ContinuousBatcher(Model(), max_batch_size=2, batch_wait_timeout_s=-1)

    async def short(calls):
        return calls[:-1]

    async def main():
        b = ContinuousBatcher(short, max_batch_size=4)
        with pytest.raises(RuntimeError, match="returned 0 results for 1 calls"):
            await b.submit("a")

    run(main())


def test_encoder_core_expands_compact_images_in_a_mixed_batch():
    """The ingress sends images as compact uint8 pixels: the encoder's result must equal the
    float input's, also when both forms (and a video) meet in one batch."""
    import media
    import numpy as np

    import imagebind_core as ibc
    from serve.encoder import EncodeCall, EncoderCore

    core = EncoderCore("vision", model=ibc.build_model("tiny", ["vision"]))
    data = media.make_image("PNG", (300, 200))
    full = ibc.preprocess("vision", data).numpy()[None]
    compact = ibc.preprocess("vision", data, compact=True).numpy()[None]
    assert compact.dtype == np.uint8 and compact.nbytes * 4 == full.nbytes
    video = ibc.preprocess("video", media.make_video(2, 10, (160, 120))).numpy()[None]
    a, b, v = core.encode([EncodeCall(full), EncodeCall(compact), EncodeCall(video)])
    np.testing.assert_array_equal(a, b)
    assert v.shape == a.shape
    # Several requests of one shape form one model batch in parts (the runner joins them
    # once): each gets its rows of the batch, as if the arrays were joined first.
    two = np.concatenate([compact, compact[:, :, ::-1]])
    got = core.encode([EncodeCall(compact), EncodeCall(two), EncodeCall(compact)])
    want = core.runner.encode("vision", np.concatenate([compact, two, compact]), normalize=True)
    assert [g.shape[0] for g in got] == [1, 2, 1]
    np.testing.assert_array_equal(np.concatenate(got), want)


# ------------------------------------------------------------ the ingress's input byte budget


def test_the_input_budget_grants_in_arrival_order_and_never_past_its_limit():
    from serve.inputs import ByteBudget

    async def main():
        budget = ByteBudget(100)
        order: list[str] = []
        gates = {name: asyncio.Event() for name in ("a", "big", "b", "c")}
        peak = 0

        async def request(name: str, n: int) -> None:
            nonlocal peak
            async with budget.hold(n):
                order.append(name)
                peak = max(peak, budget.held)
                await gates[name].wait()

        tasks = [asyncio.ensure_future(request("a", 60))]
        await asyncio.sleep(0)
        # "big" does not fit beside "a"; "b" and "c" would, but arrived after it: they wait
        # behind it instead of starving it.
        for name, n in (("big", 90), ("b", 10), ("c", 10)):
            tasks.append(asyncio.ensure_future(request(name, n)))
            await asyncio.sleep(0)
        await asyncio.sleep(0.05)
        assert order == ["a"] and budget.held == 60
        gates["a"].set()
        await asyncio.sleep(0.05)
        assert order == ["a", "big", "b"] and budget.held == 100  # 90 + 10 fit; c does not
        for g in gates.values():
            g.set()
        await asyncio.gather(*tasks)
        assert order == ["a", "big", "b", "c"] and budget.held == 0 and peak <= 100

    run(main())


def test_an_oversized_request_runs_alone_and_a_cancelled_or_failed_one_gives_its_bytes_back():
    from serve.inputs import ByteBudget

    async def holder(budget, n: int, until: asyncio.Event, seen: list[int]) -> None:
        async with budget.hold(n):
            seen.append(budget.held)
            await until.wait()

    async def main():
        budget = ByteBudget(100)
        first_done, big_done = asyncio.Event(), asyncio.Event()
        seen: list[int] = []
        # Larger than the whole budget: it waits for an empty budget, then holds all of it.
        first = asyncio.ensure_future(holder(budget, 30, first_done, seen))
        await asyncio.sleep(0)
        big = asyncio.ensure_future(holder(budget, 500, big_done, seen))
        await asyncio.sleep(0.02)
        assert seen == [30]
        first_done.set()
        await asyncio.sleep(0.02)
        assert seen == [30, 100]
        big_done.set()
        await asyncio.gather(first, big)
        assert budget.held == 0

        # A waiter cancelled by its deadline leaves the queue; the one behind it proceeds.
        hold_done, small_done = asyncio.Event(), asyncio.Event()
        seen.clear()
        hold = asyncio.ensure_future(holder(budget, 80, hold_done, seen))
        await asyncio.sleep(0)
        late = asyncio.ensure_future(
            asyncio.wait_for(holder(budget, 50, asyncio.Event(), seen), 0.05)
        )
        await asyncio.sleep(0)
        small = asyncio.ensure_future(holder(budget, 20, small_done, seen))
        with pytest.raises(asyncio.TimeoutError):
            await late
        await asyncio.sleep(0.02)
        assert seen == [80, 100] and budget.held == 100  # 80 + 20 fit once the 50 left
        hold_done.set()
        small_done.set()
        await asyncio.gather(hold, small)
        assert budget.held == 0 and not budget._waiters

        # An error inside the block gives the bytes back.
        with pytest.raises(ValueError):
            async with budget.hold(70):
                raise ValueError("decode failed")
        assert budget.held == 0

    run(main())


def test_a_request_holds_room_for_its_preprocessed_inputs():
    from concurrent.futures import ThreadPoolExecutor

    from imagebind_core.preprocess import item_nbytes
    from serve.inputs import Inputs
    from serve.options import AppArgs

    args = AppArgs(preset="tiny", ingress={"max_held_input_bytes": 10 * item_nbytes("video")})
    with ThreadPoolExecutor(1) as pool:
        inputs = Inputs(args, pool)

        async def main():
            async with inputs.held("video", 4):
                assert inputs.budget.held == 4 * item_nbytes("video")
                async with inputs.held("vision", 64):  # compact pixels: 64 x 150,528 B
                    assert inputs.budget.held == 4 * item_nbytes("video") + 64 * 150_528
            assert inputs.budget.held == 0

        run(main())
