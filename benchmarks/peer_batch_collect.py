"""The peer for collecting a batch: the official client, the way its docs and users do it.

    python benchmarks/peer_batch_collect.py BATCH_ID OUT --base-url URL

`client.batches.retrieve`, then `client.files.content(output_file_id).text`, split into lines,
each line's images decoded with the standard library and written with `open()`. Prints one
JSON line: {"ok": N, "bytes": size of the output file}.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
from pathlib import Path

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("batch_id")
    parser.add_argument("out", type=Path)
    parser.add_argument("--base-url", required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    client = OpenAI(base_url=args.base_url, api_key=os.environ.get("OPENAI_API_KEY", "sk-peer"))
    batch = client.batches.retrieve(args.batch_id)
    assert batch.output_file_id is not None
    text = client.files.content(batch.output_file_id).text
    ok = 0
    for line in text.splitlines():
        result = json.loads(line)
        for k, image in enumerate(result["response"]["body"]["data"]):
            with open(args.out / f"{result['custom_id']}-{k}.png", "wb") as fh:
                fh.write(base64.b64decode(image["b64_json"]))
        ok += 1
    print(json.dumps({"ok": ok, "bytes": len(text)}))


if __name__ == "__main__":
    main()
