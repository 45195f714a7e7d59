"""Start a real ``recognite serve`` process on a free loopback port (for the process tests)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(bundle: Path, gallery: Path, key_file: Path | None, *extra: str,
                 timeout: float = 60.0) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "recognite", "serve", "--bundle", str(bundle), "--gallery", str(gallery),
               "--port", str(port), "--device", "cpu", *extra]
    if key_file is not None:
        command += ["--api-key-file", str(key_file)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"recognite serve exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1) as response:
                if json.load(response)["status"] == "ok":
                    return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"recognite serve did not answer within {timeout} s:\n{proc.stdout.read()}")


def multipart(fields: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body: ``(name, filename, data)`` parts (filename '' = a plain field)."""
    boundary = "recognite-test-boundary"
    chunks = []
    for name, filename, data in fields:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        chunks.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def request(url: str, method: str = "GET", fields: list[tuple[str, str, bytes]] | None = None,
            key: str | None = None, timeout: float = 30.0) -> tuple[int, dict]:
    headers = {}
    body = None
    if fields is not None:
        body, headers["Content-Type"] = multipart(fields)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)
