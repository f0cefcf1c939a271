"""An OpenAI-compatible mock of the Images API, embedded so tests and `batchimg run --mock` can
exercise the whole engine over real HTTP, and so the official clients (openai-python and the
Node `openai` package, unchanged) work against it.

It is the API's twin, not the engine's echo: it keeps its own copy of the API's rules
(`rules`), its own billing (`billing`, with a token formula for the models whose counts nobody
publishes, which the engine never sees) and its own image checks (`images`), and never imports
anything of batchimg's outside this package.

The surface, as the official clients use it: generations (JSON) and edits (multipart, or JSON
with `images: [{image_url} | {file_id}]`), each answered whole or, with `stream: true`, as
server-sent events (`partial_images` 0-3 drafts, then the completed image with its usage; the
`image_generation.*` and `image_edit.*` pairs); `usage` with `input_tokens_details` and
`output_tokens_details`; the Files API (upload, list, retrieve, content, delete: file ids for
JSON edits, batch input files, and the output and error files batches write, streamed from
disk); the Batch API for both image endpoints, with the real state machine (validating ->
in_progress -> finalizing -> completed; failed at validation with line-numbered errors;
expired with part of the lines undone; cancelling -> cancelled), each line run through the
same request pipeline as an online request and recorded with `via="batch"`; `/v1/models` with
shutdown dates; and on every answer `x-request-id`, `openai-version`, `openai-processing-ms`
and (image answers) `x-ratelimit-*`, generous when no limit is configured.

    config.py    MockConfig: faults, limits, latency, which models it serves
    server.py    MockServer: routes, auth, headers, the request pipeline, /v1/models, /v1/files
    rules.py     the models and what each refuses (streaming included)
    billing.py   the usage of each answer (partial images included)
    faults.py    seeded fault draws, prompt directives, per-minute limits and what headers say
    images.py    the images it draws (png, jpeg, webp, animated gif, svg, blurred drafts) and the
                 uploads it checks
    stream.py    the server-sent events of a streamed answer
    files.py     the Files API's files (uploads in memory, batch results on disk), and the
                 image references of JSON edits (data URLs, own URLs, file ids: the mock has
                 no outside network)
    batches.py   the Batch API: create-time checks, input file validation, the state machine
                 driven by time, result files in shuffled order

Prompt directives, for deterministic tests (several may appear in one prompt):

    [[mock:moderation]]   400 moderation_blocked (type image_generation_user_error)
    [[mock:quota]]        429 insufficient_quota (the account is out of credit)
    [[mock:corrupt]]      200, but each b64_json decodes to bytes that are not an image
    [[mock:datauri]]      b64_json carries a `data:image/<fmt>;base64,` prefix
    [[mock:fail=N]]       the first N valid requests with this exact prompt get 500
                          server_error (counted per prompt, per server); later ones succeed
    [[mock:url]]          answer with `url` items even for GPT image models

Faults on demand (`MockConfig`, seeded so a test sees the same sequence every run): rates of
429s (retry-after-ms, retry-after seconds or HTTP-date, or none), 500s, HTML 502 pages, bodies
cut off mid-stream (an event stream is cut inside its completed event), dropped connections
and slow answers; data-URI answers; quota that runs out after N successes (429
insufficient_quota); a key revoked after N requests (401); OpenAI's refusal of retired models
(`enforce_shutdown`).

Batches on demand (`MockConfig.batch_*`): how long validating, each line, finalizing and
cancelling take (small by default, so a test polls for well under a second); the completion
window (`batch_expire_after_s`), or a deterministic expiry after N lines have run
(`batch_expire_after_lines`); a share of lines answered 500 (`batch_error_rate`, drawn per
batch from the seed); the input limits (50,000 lines, 200 MB) lowered for tests. The prompt
directives above work per line. Online faults, limits and latency do not apply to batch lines.
"""

from .config import MockConfig, RetryAfterStyle
from .faults import Directives, Fault, decide_fault
from .server import MockRequest, MockServer, serve

__all__ = [
    "Directives",
    "Fault",
    "MockConfig",
    "MockRequest",
    "MockServer",
    "RetryAfterStyle",
    "decide_fault",
    "serve",
]
