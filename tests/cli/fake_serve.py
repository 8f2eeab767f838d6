"""A stand-in for perspective-serve with its contract and nothing else, for the tests
of perspective-agent's orchestration: same flags; GET /health 503 while "loading"
then 200; GET /v1/models; POST /v1/chat/completions answering "echo: <last user
message>"; Bearer key on everything but /health; its URL printed on stderr.

Knobs (environment): FAKE_SERVE_FAIL=1 dies at once with a message; FAKE_SERVE_HANG=1
never gets ready; FAKE_SERVE_LOADING_S (default 0.3) seconds of 503; FAKE_SERVE_RECORD
names a file that gets its pid and arguments (JSON).
"""

import argparse
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-file")
    p.add_argument("--served-model-name")
    a, _unknown = p.parse_known_args()
    if os.environ.get("FAKE_SERVE_RECORD"):
        with open(os.environ["FAKE_SERVE_RECORD"], "w") as fh:
            json.dump({"pid": os.getpid(), "argv": sys.argv[1:]}, fh)
    if os.environ.get("FAKE_SERVE_FAIL"):
        print("loading the model\nboom: cannot load the model", file=sys.stderr)
        sys.exit(1)
    key = open(a.api_key_file).read().strip() if a.api_key_file else None
    name = a.served_model_name or os.path.basename(os.path.normpath(a.model_dir))
    ready_at = (float("inf") if os.environ.get("FAKE_SERVE_HANG") else
                time.monotonic() + float(os.environ.get("FAKE_SERVE_LOADING_S", "0.3")))

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self):
            if key is None or self.headers.get("Authorization") == f"Bearer {key}":
                return True
            self._send(401, {"error": {"message": "bad key", "type": "auth"}})
            return False

        def do_GET(self):
            if self.path == "/health":
                ready = time.monotonic() >= ready_at
                self._send(200 if ready else 503, {"status": "ok" if ready else "loading"})
            elif self.path == "/v1/models" and self._authorized():
                self._send(200, {"object": "list", "data": [
                    {"id": name, "object": "model", "owned_by": "perspective"}]})
            elif self.path != "/v1/models":
                self._send(404, {"error": {"message": "not found"}})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path != "/v1/chat/completions":
                return self._send(404, {"error": {"message": "not found"}})
            if not self._authorized():
                return
            text = "echo: " + body["messages"][-1]["content"]
            self._send(200, {
                "id": "chatcmpl-fake", "object": "chat.completion", "created": 0,
                "model": body["model"], "choices": [{
                    "index": 0, "finish_reason": "stop",
                    "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    server = ThreadingHTTPServer((a.host, a.port), Handler)
    print(f"listening on http://{a.host}:{server.server_address[1]}", file=sys.stderr,
          flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
