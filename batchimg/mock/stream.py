"""Streamed answers (`stream: true`): server-sent events, as the API and its SDKs have them.

    event: image_generation.partial_image          (image_edit.partial_image for edits)
    data: {"type", "b64_json", "created_at", "size", "quality", "background", "output_format",
           "partial_image_index"}

    event: image_generation.completed              (image_edit.completed)
    data: {the same fields without the index, plus "usage" (and "safety_identifier")}

`partial_images` drafts (0-3, blurrier first) come before the completed event; with
`partial_images: 0` the completed event comes alone. Each event is an `event:` line, a `data:`
line of JSON and a blank line, which is what the SDKs' SSE decoders read (they pick the model
by the `type` inside `data`). No `data: [DONE]` follows: the completed event ends the stream.
Shapes: openai-python's `ImageGenPartialImageEvent` / `ImageGenCompletedEvent` and the
`ImageEdit...` pair.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(frozen=True)
class EventStream:
    """A streamed answer: its events, in the order they are sent."""

    events: tuple[tuple[str, bytes], ...]  # (event type, the encoded event)

    @property
    def types(self) -> list[str]:
        return [kind for kind, _ in self.events]


def sse(event: str, data: Mapping[str, Any]) -> bytes:
    """One server-sent event."""
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def image_events(
    endpoint: str,
    fields: Mapping[str, Any],
    partials: Sequence[str],
    finals: Sequence[str],
    completed_extra: Mapping[str, Any],
) -> EventStream:
    """The stream of one answer.

    endpoint: generations | edits; fields: created_at, size, quality, background and
    output_format, as every event repeats them; partials / finals: the b64_json of each draft
    and of each finished image (one, unless a broken server is asked for more or none);
    completed_extra: what only the completed event carries (usage, safety_identifier).
    """
    prefix = "image_edit" if endpoint == "edits" else "image_generation"
    events: list[tuple[str, bytes]] = []
    for index, b64 in enumerate(partials):
        kind = f"{prefix}.partial_image"
        data = {"type": kind, "b64_json": b64, **fields, "partial_image_index": index}
        events.append((kind, sse(kind, data)))
    for b64 in finals:
        kind = f"{prefix}.completed"
        data = {"type": kind, "b64_json": b64, **fields, **completed_extra}
        events.append((kind, sse(kind, data)))
    return EventStream(tuple(events))
