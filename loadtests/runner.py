"""Sends a workload's requests with openai.AsyncOpenAI (streamed chat completions) and times them."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from .metrics import RequestRecord
from .prompts import Prompt, PromptBuilder, common_prefix
from .workload import Workload


@dataclass
class Planned:
    """One request to send: its class and prompt."""

    index: int
    cls: str
    prompt: Prompt
    output_tokens: int


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="req", disable=None if enabled else True, leave=False, dynamic_ncols=True)


async def plan(workload: Workload, builder: PromptBuilder, progress: bool = False) -> tuple[list[Planned], dict]:
    """Every request's exact-length prompt, built before the clock starts. Returns the plan and,
    per class, what was asked and what was verified (shared prefix included)."""
    seq = workload.class_sequence()
    bar = _progress(len(seq), f"{workload.name}: prompts", progress)
    sem = asyncio.Semaphore(8)

    async def one(i, c):
        async with sem:
            p = await builder.build(c.input_tokens, i, key=f"{workload.seed}:{c.name}", prefix_tokens=c.prefix_tokens)
        bar.update(1)
        return Planned(i, c.name, p, c.output_tokens)

    try:
        planned = list(await asyncio.gather(*(one(i, c) for i, c in enumerate(seq))))
    finally:
        bar.close()
    classes = {}
    for c in workload.classes:
        mine = [p for p in planned if p.cls == c.name]
        heads = [p.prompt.head for p in mine]
        shared = min((common_prefix(heads[0], h) for h in heads[1:]), default=None) if c.prefix_tokens else 0
        classes[c.name] = {"input_tokens": c.input_tokens, "output_tokens": c.output_tokens,
                           "weight": c.weight, "prefix_tokens": c.prefix_tokens, "requests": len(mine),
                           # tokens all prompts of the class have in common (prefix_tokens when right)
                           "shared_prefix_tokens": shared}
    return planned, classes


def _error_name(e: BaseException) -> str:
    status = getattr(e, "status_code", None)
    return f"HTTP {status}" if status else type(e).__name__


async def send_one(client, model: str, p: Planned, run_t0: float, workload: Workload) -> RequestRecord:
    rec = RequestRecord(index=p.index, cls=p.cls, start=time.perf_counter() - run_t0,
                        prompt_tokens_expected=p.prompt.tokens)
    t0 = time.perf_counter()
    extra = {"ignore_eos": True} if workload.ignore_eos else {}
    last = None
    try:
        stream = await client.chat.completions.create(
            model=model, messages=p.prompt.messages, max_tokens=p.output_tokens,
            temperature=workload.temperature, stream=True, stream_options={"include_usage": True},
            extra_body=extra or None)
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices:
                if rec.ttft is None:
                    rec.ttft = now - t0
                # a token: vLLM streams one chunk per step, a busy server sometimes several tokens in one
                if chunk.choices[0].delta.role is None:
                    if last is not None:
                        rec.itl.append(now - last)
                    last = now
                    rec.chunk_times.append(now - run_t0)
            if chunk.usage:
                rec.prompt_tokens = chunk.usage.prompt_tokens
                rec.completion_tokens = chunk.usage.completion_tokens
        rec.e2e = time.perf_counter() - t0
        if rec.ttft is None:
            rec.error, rec.error_detail = "EmptyStream", "the stream closed before any token"
        elif not rec.prompt_tokens:
            rec.error, rec.error_detail = "NoUsage", "no usage chunk (stream_options.include_usage ignored?)"
    except asyncio.CancelledError:
        raise
    except Exception as e:  # every failure is recorded by type, the run goes on
        rec.error, rec.error_detail = _error_name(e), str(e)[:500]
    return rec


async def run(client, model: str, workload: Workload, planned: list[Planned],
              progress: bool = False) -> tuple[list[RequestRecord], float]:
    """Send `planned` as the workload's arrival process says. Returns the records (in sending
    order) and the run's duration (first send to last completion)."""
    arrival = workload.arrival
    records: list[RequestRecord] = []
    bar = _progress(len(planned), f"{workload.name}: {arrival.label}", progress)
    t0 = time.perf_counter()
    deadline = t0 + workload.max_duration_s if workload.max_duration_s else float("inf")

    async def go(p: Planned):
        rec = await send_one(client, model, p, t0, workload)
        records.append(rec)
        bar.update(1)
        if rec.error:
            bar.set_postfix(errors=sum(1 for r in records if r.error))

    try:
        if arrival.kind == "concurrency":
            queue = iter(planned)

            async def worker():
                for p in queue:  # shared iterator: each request is taken by one worker
                    if time.perf_counter() >= deadline:
                        return
                    await go(p)

            await asyncio.gather(*(worker() for _ in range(arrival.concurrency)))
        else:
            cap = asyncio.Semaphore(arrival.concurrency) if arrival.concurrency else None

            async def capped(p):
                if cap is None:
                    return await go(p)
                async with cap:
                    return await go(p)

            tasks = []
            for p, off in zip(planned, arrival.offsets(len(planned))):
                delay = t0 + off - time.perf_counter()
                if t0 + off >= deadline:
                    break
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(capped(p)))
            await asyncio.gather(*tasks)
    finally:
        bar.close()
    duration = time.perf_counter() - t0
    records.sort(key=lambda r: r.start)
    return records, duration
