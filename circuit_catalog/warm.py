"""A warm model process: `circuit-catalog serve` keeps a model and its transcoders loaded, and `active` asks it.

Loading dominates a quick question (importing TransformerLens alone takes seconds, converting SmolLM2 more), so a
researcher probing many prompts starts one server per (model, transcoders) and each `active` call then costs a
forward pass. The server listens on a UNIX socket (mode 0600) in the cache directory whose name is a digest of
what it loaded: the model and transcoder arguments and the size and modification time of their files, so a changed
transcoder file or other `--layers` is simply another socket, and a stale server is never asked; a server holding every
layer also answers for any subset of them (`--layers`). Without a server the command loads the model itself, as
before. This client side imports neither torch nor TransformerLens.

Protocol: one JSON line per connection each way; a request `{"op": name in OPS, "args": {...}}` (and `"layers": [...]`
to use a subset of the loaded transcoders), a reply `{"ok": ...}` or
`{"error": message, "type": UserError subclass name}` (re-raised by the client as that type: one `error:` line).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sys
from pathlib import Path

from circuit_catalog import errors
from circuit_catalog.ingest.receipt import file_state
from circuit_catalog.queries.rows import plain

IDLE_MINUTES = 30.0  # a server nobody asks for this long exits


def _active(model, tset, **args):
    from circuit_catalog.ingest.activations import rank_features

    return rank_features(model, tset, **args)


def _token_weights(model, tset, **args):
    from circuit_catalog.ingest.token_lens import token_weights

    return token_weights(model, tset, **args)


def _token_ends(model, tset, **args):
    from circuit_catalog.ingest.token_lens import token_ends

    return token_ends(model, tset, **args)


# what a server answers: the API function each request names, called with the loaded model and transcoders
OPS = {"active": _active, "token_weights": _token_weights, "token_ends": _token_ends}


def run(model: str, transcoders, layers, trust_pickle: bool, device: str, dtype: str, op: str, **args):
    """`op` (OPS) with these arguments: answered by a warm server for the same model and transcoders when one runs,
    else computed here after loading them. Results as the server sends them (dataclasses as dicts)."""
    request = {"op": op, "args": args}
    answer = ask(socket_path(model, transcoders, layers, trust_pickle, device, dtype), request)
    if answer is None and layers is not None:  # a server of every layer, asked for these
        answer = ask(socket_path(model, transcoders, None, trust_pickle, device, dtype), {**request, "layers": layers})
    if answer is not None:
        return answer
    from circuit_catalog.ingest.pipeline import load

    lm, tset = load(model, transcoders, layers, trust_pickle, device, dtype)
    return plain(OPS[op](lm, tset, **args))


def socket_path(model: str, transcoders: str, layers: list[int] | None, trust_pickle: bool, device: str, dtype: str) -> Path:
    """The socket of the server for exactly these arguments and files."""
    root = os.environ.get("CIRCUIT_CATALOG_CACHE") or str(Path.home() / ".cache" / "circuit-catalog")
    key = json.dumps([model, str(transcoders), layers, trust_pickle, device, dtype, file_state(Path(model)), file_state(Path(transcoders))])
    # AF_UNIX paths are limited to ~107 bytes: a short digest in a short directory
    return Path(root) / "warm" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.sock"


def ask(path: Path, request: dict, timeout: float = 600.0):
    """The server's answer, or None when no server listens there (the caller then loads the model itself)."""
    if not path.exists():
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except OSError:  # a socket file left by a killed server
            return None
        s.sendall(json.dumps(request).encode() + b"\n")
        reply = json.loads(_read_line(s))
    if "error" in reply:
        kind = getattr(errors, reply.get("type", ""), None)
        raise (kind if isinstance(kind, type) and issubclass(kind, errors.UserError) else errors.UserError)(reply["error"])
    return reply["ok"]


def _read_line(s: socket.socket) -> bytes:
    chunks = []
    while not chunks or not chunks[-1].endswith(b"\n"):
        chunk = s.recv(1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def serve(path: Path, model, tset, idle_minutes: float = IDLE_MINUTES, ready=None) -> None:
    """Answer requests on `path` with this loaded model and transcoder set until idle for `idle_minutes`;
    `ready()` is called once listening."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` runs the clean-up below, as Ctrl-C does
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        old = os.umask(0o177)  # the socket is created 0600: only its owner can ask
        try:
            server.bind(str(path))
        finally:
            os.umask(old)
        server.listen()
        server.settimeout(idle_minutes * 60)
        if ready is not None:
            ready()
        try:
            while True:
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    return
                with conn:
                    request = json.loads(_read_line(conn) or b"{}")
                    try:
                        if request.get("op") not in OPS:
                            raise errors.UserError(f"unknown request {request.get('op')!r}")
                        reply = {"ok": plain(OPS[request["op"]](model, tset.select(request.get("layers")), **request["args"]))}
                    except errors.UserError as exc:
                        reply = {"error": str(exc), "type": type(exc).__name__}
                    conn.sendall(json.dumps(reply).encode() + b"\n")
        finally:
            path.unlink(missing_ok=True)
