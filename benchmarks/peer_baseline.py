"""The peer baseline: a bulk-generation script written the way users write it.

    python benchmarks/peer_baseline.py MANIFEST OUT --base-url URL [--concurrency 32]

The official client (`AsyncOpenAI`, `max_retries=8`), an `asyncio.Semaphore`, every manifest line
gathered at once, images decoded with the standard library and written with `open()`. Prints one
JSON line: {"ok": N, "failed": N}.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
from pathlib import Path
from typing import Any

from openai import AsyncOpenAI

FIELDS = ("model", "prompt", "n", "size", "quality", "output_format", "background")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("manifest", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    client = AsyncOpenAI(
        base_url=args.base_url, api_key=os.environ.get("OPENAI_API_KEY", "sk-baseline"),
        max_retries=8,
    )  # fmt: skip
    semaphore = asyncio.Semaphore(args.concurrency)
    with open(args.manifest) as fh:
        lines = [json.loads(line) for line in fh if line.strip() and not line.startswith("#")]

    async def one(index: int, line: dict[str, Any]) -> bool:
        async with semaphore:
            try:
                params = {k: line[k] for k in FIELDS if k in line}
                params.setdefault("model", "gpt-image-1")
                result = await client.images.generate(**params)
            except Exception:
                return False
            for k, image in enumerate(result.data or []):
                with open(args.out / f"{index}-{k}.png", "wb") as fh:
                    fh.write(base64.b64decode(image.b64_json or ""))
            return True

    results = await asyncio.gather(*(one(i, line) for i, line in enumerate(lines)))
    await client.close()
    print(json.dumps({"ok": sum(results), "failed": len(results) - sum(results)}))


if __name__ == "__main__":
    asyncio.run(main())
