"""A real `batchbox serve` (the release build, as `make test` leaves it) for the Python tests that
call it with real clients: started on a free port with a config given as a dict, ready when
`/ready` answers 200, stopped at the end."""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BINARY = ROOT / "target/release/batchbox"
RUST_PLUGINS = ROOT / "plugins/target/wasm32-wasip2/release"


def key_hash(key: str) -> str:
    """How a tenant's config names a key: its SHA-256."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(folder: Path, models: list[dict], tenants: list[dict], ready_s: float = 180):
    """Yields the base URL of a server with these models and tenants (each a config entry)."""
    for path in [BINARY, *(Path(t["wasm"]) for t in tenants), *(Path(m["path"]) / "manifest.json" for m in models)]:
        assert path.exists(), f"{path} is missing: run `make build plugins test-models` (or `make test`)"
    port = free_port()
    config = {
        "models": models,
        "api": {"use_fp16": True, "max_queue_delay_ms": 2},
        "server": {"bind": f"127.0.0.1:{port}", "plugin_cache_dir": str(ROOT / "target/plugin-cache")},
        "tenants": tenants,
    }
    # YAML is a superset of JSON: the config is JSON under a .yaml name.
    (folder / "config.yaml").write_text(json.dumps(config))
    log_path = folder / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([str(BINARY), "--config", str(folder / "config.yaml"), "serve"], stdout=log, stderr=log)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + ready_s
            while True:
                try:
                    if urllib.request.urlopen(f"{base}/ready", timeout=5).status == 200:
                        break
                except (urllib.error.URLError, ConnectionError):
                    pass
                assert process.poll() is None, f"the server exited: {log_path.read_text()[:1500]}"
                assert time.monotonic() < deadline, f"the server was not ready in {ready_s} s"
                time.sleep(0.2)
            yield base
        finally:
            process.terminate()
            process.wait(timeout=30)


def post(base: str, route: str, body, headers: dict | None = None) -> tuple[int, object]:
    """POSTs `body` as JSON; the status and the JSON answer, error or not."""
    request = urllib.request.Request(f"{base}{route}", data=json.dumps(body).encode(), method="POST",
                                     headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(base: str, route: str, headers: dict | None = None) -> tuple[int, object]:
    request = urllib.request.Request(f"{base}{route}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
