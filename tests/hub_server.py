"""A Hub-compatible HTTP server on 127.0.0.1 for end-to-end tests of push_to_hub and from_pretrained.

It answers the endpoints huggingface_hub uses for a push (create repo, validate YAML, preupload, NDJSON commit)
and a download (HEAD/GET resolve). Files are kept in memory, all uploads are "regular" (no LFS or Xet). Repos whose
name contains "fail500" answer every commit with HTTP 500.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


RESOLVE = re.compile(r"^/(?:api/)?(?:models/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>[^?]+)")
PREUPLOAD = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/?]+)")
COMMIT = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/?]+)")


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo id -> {"files": {path: bytes}, "commit": sha}
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, status, body=b"", headers=None, json_body=None):
                if json_body is not None:
                    body = json.dumps(json_body).encode()
                    headers = {"Content-Type": "application/json", **(headers or {})}
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def do_POST(self):  # noqa: N802
                hub.requests.append(f"POST {self.path}")
                body = self._body()
                if self.path.startswith("/api/repos/create"):
                    payload = json.loads(body)
                    repo = "/".join(p for p in (payload.get("organization"), payload["name"]) if p)
                    hub.repos.setdefault(repo, {"files": {}, "commit": "0" * 40})
                    return self._send(200, json_body={"url": f"{hub.endpoint}/{repo}", "name": repo})
                if self.path.startswith("/api/validate-yaml"):
                    return self._send(200, json_body={"errors": [], "warnings": []})
                if match := PREUPLOAD.match(self.path):
                    files = json.loads(body)["files"]
                    return self._send(200, json_body={"files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
                if match := COMMIT.match(self.path):
                    repo = match["repo"]
                    if "fail500" in repo:
                        return self._send(500, json_body={"error": "Internal Error"})
                    if repo not in hub.repos:
                        return self._send(404, headers={"X-Error-Code": "RepoNotFound"},
                                          json_body={"error": "Repository not found"})
                    for line in body.splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            value = item["value"]
                            hub.repos[repo]["files"][value["path"]] = base64.b64decode(value["content"])
                    sha = hashlib.sha1(body).hexdigest()
                    hub.repos[repo]["commit"] = sha
                    return self._send(200, json_body={"commitUrl": f"{hub.endpoint}/{repo}/commit/{sha}",
                                                      "commitOid": sha, "success": True, "pullRequestUrl": None})
                return self._send(404, json_body={"error": f"not implemented: POST {self.path}"})

            def _resolve(self):
                hub.requests.append(f"{self.command} {self.path}")
                match = RESOLVE.match(self.path)
                if not match:
                    return self._send(404, json_body={"error": f"not implemented: {self.command} {self.path}"})
                repo = hub.repos.get(match["repo"])
                if repo is None:
                    return self._send(404, headers={"X-Error-Code": "RepoNotFound"},
                                      json_body={"error": "Repository not found"})
                content = repo["files"].get(match["file"])
                if content is None:
                    return self._send(404, headers={"X-Error-Code": "EntryNotFound"},
                                      json_body={"error": "Entry not found"})
                return self._send(200, content, headers={"X-Repo-Commit": repo["commit"],
                                                         "ETag": f'"{hashlib.sha256(content).hexdigest()}"'})

            do_GET = _resolve  # noqa: N815
            do_HEAD = _resolve  # noqa: N815

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
