"""The official Node `openai` package against the mock (tests/node/compat.mjs).

`.ci/run` installs Node and the package (`cd tests/node && npm install`). Elsewhere the test
installs the pinned package itself when `node_modules` is missing, and is skipped only where
`node` is absent or that install fails (no npm, no registry).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from batchimg.mock import MockConfig
from tests.helpers import threaded_mock

NODE_DIR = Path(__file__).resolve().parent / "node"
KEY = "sk-mock-node"


def _node_package() -> str:
    """The path of `node`, with the openai package installed beside the script."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (.ci/run installs it)")
    if not (NODE_DIR / "node_modules" / "openai" / "package.json").exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("tests/node/node_modules is missing and npm is not installed")
        try:
            installed = subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund", "--silent"],
                cwd=NODE_DIR,
                capture_output=True,
                text=True,
                timeout=90,
            )
        except subprocess.TimeoutExpired:
            pytest.skip("tests/node/node_modules is missing and npm ci timed out")
        if installed.returncode != 0:
            pytest.skip(f"tests/node/node_modules is missing and npm ci failed: {installed.stderr}")
    return node


@pytest.mark.timeout(180)
def test_node_openai_package_streams_edits_by_json_and_reads_headers() -> None:
    node = _node_package()
    with threaded_mock(MockConfig(api_key=KEY)) as server:
        result = subprocess.run(
            [node, str(NODE_DIR / "compat.mjs")],
            env={**os.environ, "BASE_URL": server.base_url, "KEY": KEY},
            capture_output=True,
            text=True,
            timeout=60,
        )
        requests = list(server.requests)
        uploaded = dict(server.uploaded_files)

    assert result.returncode == 0, result.stderr
    said = json.loads(result.stdout.strip().splitlines()[-1])
    assert said["ok"] is True
    seen = [(r.endpoint, r.content_type, r.stream, r.status) for r in requests]
    assert seen == [
        ("generations", "application/json", True, 200),
        ("generations", "application/json", False, 200),
        ("edits", "multipart/form-data", True, 200),
        ("edits", "application/json", False, 200),
        ("edits", "application/json", False, 200),
        ("edits", "application/json", False, 404),
    ]
    streamed, plain, multipart, by_url, by_file, unknown = requests
    assert streamed.params["partial_images"] == 2
    assert streamed.events == ["image_generation.partial_image"] * 2 + [
        "image_generation.completed"
    ]
    assert plain.request_id == said["request_id"]
    assert multipart.events == ["image_edit.partial_image", "image_edit.completed"]
    assert multipart.params["stream"] is True  # the form's "true", typed back
    # The edits sent the very PNG the plain generation served, by each route.
    first_png = plain.served_sha256[0]
    assert [f[3] for f in multipart.files] == [first_png]
    assert by_url.params["images"][0]["image_url"].startswith("data:image/png;base64,<")
    assert [(f[0], f[2], f[3]) for f in by_url.files] == [("images", "image/png", first_png)]
    assert by_file.params["images"] == [{"file_id": said["file_id"]}]
    assert [f[3] for f in by_file.files] == [first_png]
    assert uploaded[said["file_id"]].purpose == "vision"
    assert unknown.params["images"] == [{"file_id": "file-nope"}]
