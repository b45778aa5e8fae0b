"""Deliberately faulty OpenAI-compatible upstream for tern gateway e2e tests.

tern relays requests to remote upstreams through libcurl; this fixture plays
such an upstream and misbehaves on demand. The JSON body's "model" field picks
the behaviour (see MODES), so one instance serves every case. Stdlib only.

  module: u = FaultUpstream(); u.start(); ... u.base, u.calls, u.connections; u.stop()
  script: python fault_upstream.py --port N   (prints "ready PORT" once listening)
"""
import argparse
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODES = ["ok", "slow", "stall", "stall_stream", "500", "429", "400", "cut",
         "malformed", "huge", "huge_event", "not_sse", "echo_auth", "flaky"]
HUGE_BYTES = 64 << 20
MIB = 1 << 20


def _err(message, type_, code=None, param=None):
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def get_request(self):  # count every accepted TCP connection
        sock, addr = super().get_request()
        with self.owner.lock:
            self.owner.connections += 1
            self.owner._socks.append(sock)
        return sock, addr


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output quiet
        pass

    # ---- low-level writers -------------------------------------------------
    def _head(self, status, ctype, length=None, extra=None, chunked=False):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        elif length is not None:
            self.send_header("Content-Length", str(length))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self._sent = True

    def _json(self, status, obj, extra=None):
        data = json.dumps(obj).encode()
        self._head(status, "application/json", len(data), extra)
        self.wfile.write(data)

    def _chunk(self, data):  # one HTTP/1.1 chunk; b"" writes the terminator
        if isinstance(data, str):
            data = data.encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _event(self, obj):
        self._chunk("data: " + (obj if isinstance(obj, str) else json.dumps(obj)) + "\n\n")

    def _abort(self):  # drop the connection without any framing
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _stall(self):
        self.server.owner._stop.wait(120)
        self._abort()

    # ---- response builders -------------------------------------------------
    def _full(self, model, content):
        now = int(time.time())
        usage = {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}
        if self._chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": content},
                      "finish_reason": "stop"}
            return {"id": "chatcmpl-fault", "object": "chat.completion", "created": now,
                    "model": model, "choices": [choice], "usage": usage}
        choice = {"index": 0, "text": content, "finish_reason": "stop", "logprobs": None}
        return {"id": "cmpl-fault", "object": "text_completion", "created": now,
                "model": model, "choices": [choice], "usage": usage}

    def _piece(self, model, text=None, role=False, finish=None):
        if self._chat:
            delta = {"role": "assistant", "content": ""} if role else \
                ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish}
            obj = "text_completion"
        return {"id": "chatcmpl-fault" if self._chat else "cmpl-fault", "object": obj,
                "created": int(time.time()), "model": model, "choices": [choice]}

    def _stream(self, model, pieces, body, delay=0.0):
        self._head(200, "text/event-stream", chunked=True, extra={"Cache-Control": "no-cache"})
        if self._chat:
            self._event(self._piece(model, role=True))
        for p in pieces:
            if delay and self.server.owner._stop.wait(delay):
                return self._abort()
            self._event(self._piece(model, p))
        self._event(self._piece(model, finish="stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            u = self._piece(model)
            u["choices"] = []
            u["usage"] = {"prompt_tokens": 7, "completion_tokens": len(pieces),
                          "total_tokens": 7 + len(pieces)}
            self._event(u)
        self._event("[DONE]")
        self._chunk(b"")

    def _answer(self, model, body, stream, pieces, delay=0.0):
        if stream:
            self._stream(model, pieces, body, delay)
        else:
            self._json(200, self._full(model, "".join(pieces)))

    # ---- dispatch ----------------------------------------------------------
    def do_GET(self):
        self._sent = False
        self.server.owner._record(self.path, None, False, self.headers.get("Authorization"), None)
        if self.path.rstrip("/") == "/v1/models":
            data = [{"id": m, "object": "model", "created": 0, "owned_by": "fault"} for m in MODES]
            self._json(200, {"object": "list", "data": data})
        else:
            self._json(404, _err("no such route", "invalid_request_error"))

    def do_POST(self):
        self._sent = False
        try:
            self._post()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, socket.timeout):
            self.close_connection = True  # client went away: stay quiet
        except Exception as e:  # never let a bug kill the server thread
            try:
                if not self._sent:
                    self._json(500, _err("fixture error: %r" % e, "server_error"))
            except OSError:
                pass
            self.close_connection = True

    def _post(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        auth = self.headers.get("Authorization")
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = None
        model = body.get("model") if isinstance(body, dict) else None
        stream = bool(isinstance(body, dict) and body.get("stream"))
        owner = self.server.owner
        owner._record(self.path, model, stream, auth, body)
        path = self.path.split("?")[0].rstrip("/")
        if path not in ("/v1/chat/completions", "/v1/completions"):
            return self._json(404, _err("no such route", "invalid_request_error"))
        if not isinstance(body, dict):
            return self._json(400, _err("body is not a JSON object", "invalid_request_error"))
        self._chat = path == "/v1/chat/completions"
        ok_pieces = ["hello", " from", " up", "stream"]

        if model == "ok":
            self._answer(model, body, stream, ok_pieces)
        elif model == "slow":
            if stream:
                self._stream(model, ["w%d " % i for i in range(10)], body, delay=0.3)
            elif not owner._stop.wait(1.0):
                self._json(200, self._full(model, "hello from upstream"))
        elif model == "stall":
            self._stall()
        elif model == "stall_stream":
            self._head(200, "text/event-stream", chunked=True)
            self._event(self._piece(model, "hello"))
            self._stall()
        elif model == "500":
            self._json(500, _err("upstream exploded", "server_error"))
        elif model == "429":
            self._json(429, _err("slow down", "rate_limit_error", "rate_limit_exceeded"),
                       extra={"Retry-After": "7"})
        elif model == "400":
            self._json(400, _err("bad thing", "invalid_request_error", param="messages"))
        elif model == "cut":
            if stream:
                self._head(200, "text/event-stream", chunked=True)
                self._event(self._piece(model, "hello"))
                self._event(self._piece(model, " from"))
            else:
                self._head(200, "application/json", 1000)
                self.wfile.write(json.dumps(self._full(model, "x" * 200)).encode()[:50])
            self._abort()
        elif model == "malformed":
            if stream:
                self._head(200, "text/event-stream", chunked=True)
                self._event(self._piece(model, "hello"))
                self._chunk("data: {not json\n\n")
                self._event("[DONE]")
                self._chunk(b"")
            else:
                data = b'{"choices": ['
                self._head(200, "application/json", len(data))
                self.wfile.write(data)
        elif model == "huge":
            head = json.dumps(self._full(model, "")).encode()
            pre, post = head.split(b'"content": ""' if self._chat else b'"text": ""')
            pre += b'"content": "' if self._chat else b'"text": "'
            post = b'"' + post
            self._head(200, "application/json", len(pre) + HUGE_BYTES + len(post))
            self.wfile.write(pre)
            block = b"a" * MIB
            for _ in range(HUGE_BYTES // MIB):
                self.wfile.write(block)
            self.wfile.write(post)
        elif model == "huge_event":  # one SSE event of 8 MiB, never ended
            self._head(200, "text/event-stream", chunked=True)
            self._event(self._piece(model, "hello"))
            self._chunk("data: {\"x\": \"")
            block = "a" * MIB
            for _ in range(8):
                self._chunk(block)
            self._chunk(b"")
        elif model == "not_sse":
            data = b"<html>oops</html>"
            self._head(200, "text/html", len(data))
            self.wfile.write(data)
        elif model == "echo_auth":
            self._answer(model, body, stream, [auth or "none"])
        elif model == "flaky":
            key = str(body.get("user"))
            with owner.lock:
                owner.flaky_seen[key] = owner.flaky_seen.get(key, 0) + 1
                first = owner.flaky_seen[key] == 1
            if first:
                self._json(503, _err("try again", "server_error"), extra={"Retry-After": "0"})
            else:
                self._answer(model, body, stream, ok_pieces)
        else:
            self._json(404, _err("The model '%s' does not exist" % model,
                                 "invalid_request_error", "model_not_found", "model"))


class FaultUpstream:
    def __init__(self, port=0, host="127.0.0.1"):
        self.lock = threading.Lock()
        self.calls = []
        self.connections = 0
        self.flaky_seen = {}
        self._socks = []
        self._stop = threading.Event()
        self._server = _Server((host, port), _Handler)
        self._server.owner = self
        self.port = self._server.server_address[1]
        self.base = "http://%s:%d/v1" % (host, self.port)
        self._thread = None

    def _record(self, path, model, stream, auth, body):
        with self.lock:
            self.calls.append({"path": path, "model": model, "stream": stream,
                               "auth": auth, "body": body})

    def start(self):
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def serve_forever(self):
        self._server.serve_forever()

    def stop(self):
        self._stop.set()  # wakes stalled / slow handlers
        self._server.shutdown()
        self._server.server_close()
        with self.lock:  # drop idle keep-alive connections too
            for s in self._socks:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        if self._thread:
            self._thread.join(5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--host", default="127.0.0.1")
    args = ap.parse_args()
    up = FaultUpstream(args.port, args.host)
    print("ready %d" % up.port, flush=True)
    try:
        up.serve_forever()
    except KeyboardInterrupt:
        pass
