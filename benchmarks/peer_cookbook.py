"""The cookbook-style script: the openai-cookbook "parallel processor" pattern, made to make images.

    python benchmarks/peer_cookbook.py MANIFEST OUT --base-url URL [--concurrency 32]
        [--max-requests-per-minute 1e9] [--max-tokens-per-minute 1e12] [--max-attempts 5]

This is the script users copy and adapt (written here in this project's own words, for images):
a dispatcher that streams the manifest a line at a time; a capacity-based limiter over requests
and tokens per minute (capacity refills continuously up to one minute's worth, and a request goes
out when both capacities cover it); a retry queue served before new lines; one aiohttp session;
a status tracker of counters; a pause after a rate-limit answer; per request, the JSON answer,
each image decoded with the standard library and written to OUT with `open()`, and one result
line appended to OUT/results.jsonl (the request and the answer, each image's base64 replaced by
its file name). Logging at INFO, the pattern's default. The dispatcher wakes every millisecond
and sends at most one request each time, as the pattern does.

`--concurrency` caps open connections (the aiohttp connector's limit), the one change a user
adds so as not to open a connection per line; the rate limits default high enough never to bind
(the mock has no limit unless told). Prints one JSON line: {"ok": N, "failed": N}.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp

SLEEP_EACH_LOOP_S = 0.001  # the dispatcher's tick: at most one new request per tick
PAUSE_AFTER_RATE_LIMIT_S = 15.0

# Output tokens an image bills (gpt-image-1's published table), for the token budget; the
# pattern counts a request's tokens before sending it so that a token limit can hold it back.
IMAGE_TOKENS = {
    ("low", "1024x1024"): 272, ("low", "1024x1536"): 408, ("low", "1536x1024"): 400,
    ("medium", "1024x1024"): 1056, ("medium", "1024x1536"): 1584, ("medium", "1536x1024"): 1568,
    ("high", "1024x1024"): 4160, ("high", "1024x1536"): 6240, ("high", "1536x1024"): 6208,
}  # fmt: skip


@dataclass
class StatusTracker:
    """Counters for the whole run; the dispatcher stops when nothing is in progress."""

    started: int = 0
    in_progress: int = 0
    succeeded: int = 0
    failed: int = 0
    rate_limit_errors: int = 0
    api_errors: int = 0
    other_errors: int = 0
    last_rate_limit_at: float = 0.0


@dataclass
class ImageRequest:
    """One manifest line: what to send, what it is expected to cost, the errors seen so far."""

    task_id: int
    request_json: dict[str, Any]
    token_cost: int
    attempts_left: int
    metadata: Any = None
    errors: list[str] = field(default_factory=list)

    async def call(self, session: aiohttp.ClientSession, url: str, headers: dict[str, str],
                   out: str, results: str, retry_queue: asyncio.Queue[ImageRequest],
                   status: StatusTracker) -> None:  # fmt: skip
        logging.info("Starting request #%d", self.task_id)
        error: str | None = None
        answer: dict[str, Any] = {}
        try:
            async with session.post(url, headers=headers, json=self.request_json) as response:
                answer = await response.json()
            if "error" in answer:
                error = str(answer["error"])
                logging.warning("Request %d failed: %s", self.task_id, error)
                if response.status == 429:
                    status.rate_limit_errors += 1
                    status.last_rate_limit_at = time.time()
                else:
                    status.api_errors += 1
            else:
                for k, image in enumerate(answer.get("data") or []):
                    name = f"{self.task_id}-{k}.png"
                    with open(os.path.join(out, name), "wb") as fh:
                        fh.write(base64.b64decode(image.pop("b64_json")))
                    image["file"] = name
        except Exception as exc:  # the pattern logs and retries whatever went wrong
            error = repr(exc)
            logging.warning("Request %d failed: %s", self.task_id, error)
            status.other_errors += 1
        if error is not None:
            self.errors.append(error)
            if self.attempts_left:
                retry_queue.put_nowait(self)
                return
            logging.error("Request %d failed after every attempt: %s", self.task_id, self.errors)
            append_line(results, [self.request_json, self.errors, self.metadata])
            status.in_progress -= 1
            status.failed += 1
            return
        append_line(results, [self.request_json, answer, self.metadata])
        status.in_progress -= 1
        status.succeeded += 1
        logging.debug("Request %d saved", self.task_id)


def append_line(results: str, data: Any) -> None:
    """One result line, the file opened for it and closed again (nothing lost if killed)."""
    with open(results, "a") as fh:
        fh.write(json.dumps(data) + "\n")


def token_cost(request: dict[str, Any]) -> int:
    """The prompt's tokens (about four characters each) and the images' output tokens."""
    prompt_tokens = len(request.get("prompt", "")) // 4 + 1
    key = (request.get("quality", "high"), request.get("size", "1024x1024"))
    return prompt_tokens + int(request.get("n", 1)) * IMAGE_TOKENS.get(key, 4160)


def task_ids() -> Iterator[int]:
    task_id = 0
    while True:
        yield task_id
        task_id += 1


async def process(args: argparse.Namespace) -> StatusTracker:
    url = args.base_url.rstrip("/") + "/images/generations"
    headers = {"Authorization": f"Bearer {os.environ.get('OPENAI_API_KEY', 'sk-cookbook')}"}
    retry_queue: asyncio.Queue[ImageRequest] = asyncio.Queue()
    ids = task_ids()
    status = StatusTracker()
    pending: ImageRequest | None = None
    request_capacity = args.max_requests_per_minute
    token_capacity = args.max_tokens_per_minute
    last_update = time.time()
    file_has_more = True
    tasks: set[asyncio.Task[None]] = set()
    results = os.path.join(args.out, "results.jsonl")
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    with open(args.manifest) as requests:
        async with aiohttp.ClientSession(connector=connector) as session:
            while True:
                if pending is None:
                    if not retry_queue.empty():
                        pending = retry_queue.get_nowait()
                        logging.debug("Retrying request %d", pending.task_id)
                    elif file_has_more:
                        line = next(requests, None)
                        if line is None:
                            file_has_more = False
                            logging.debug("Manifest read to the end")
                        elif line.strip():
                            request_json = json.loads(line)
                            pending = ImageRequest(
                                task_id=next(ids), request_json=request_json,
                                token_cost=token_cost(request_json),
                                attempts_left=args.max_attempts,
                                metadata=request_json.pop("metadata", None),
                            )  # fmt: skip
                            status.started += 1
                            status.in_progress += 1

                now = time.time()
                elapsed = now - last_update
                request_capacity = min(
                    request_capacity + args.max_requests_per_minute * elapsed / 60,
                    args.max_requests_per_minute,
                )
                token_capacity = min(
                    token_capacity + args.max_tokens_per_minute * elapsed / 60,
                    args.max_tokens_per_minute,
                )
                last_update = now

                if pending is not None and (
                    request_capacity >= 1 and token_capacity >= pending.token_cost
                ):
                    request_capacity -= 1
                    token_capacity -= pending.token_cost
                    pending.attempts_left -= 1
                    call = pending.call(
                        session, url, headers, args.out, results, retry_queue, status
                    )
                    task = asyncio.create_task(call)
                    tasks.add(task)  # keep a reference until it ends
                    task.add_done_callback(tasks.discard)
                    pending = None

                if status.in_progress == 0 and not file_has_more:
                    break
                await asyncio.sleep(SLEEP_EACH_LOOP_S)

                since_rate_limit = time.time() - status.last_rate_limit_at
                if since_rate_limit < PAUSE_AFTER_RATE_LIMIT_S:
                    logging.warning("Rate limited: pausing to cool down")
                    await asyncio.sleep(PAUSE_AFTER_RATE_LIMIT_S - since_rate_limit)
    logging.info("Done: results in %s", results)
    if status.failed:
        logging.warning("%d of %d requests failed", status.failed, status.started)
    return status


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("manifest")
    parser.add_argument("out")
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--concurrency", type=int, default=32, help="open connections at most")
    parser.add_argument("--max-requests-per-minute", type=float, default=1e9)
    parser.add_argument("--max-tokens-per-minute", type=float, default=1e12)
    parser.add_argument("--max-attempts", type=int, default=5)
    parser.add_argument("--logging-level", type=int, default=logging.INFO)
    args = parser.parse_args()
    logging.basicConfig(level=args.logging_level)
    os.makedirs(args.out, exist_ok=True)
    status = asyncio.run(process(args))
    print(json.dumps({"ok": status.succeeded, "failed": status.failed}))


if __name__ == "__main__":
    main()
