"""FakeHub: a TEST DOUBLE of the Hugging Face Hub's HTTP API, for tests only.

The real Hub is unreachable from the test machines, so the Hub sink is tested with the real
`huggingface_hub` client (`HF_ENDPOINT` pointed here) against this local HTTP server in a
thread. It implements the requests the installed client (huggingface_hub 2.x) makes for our
publishing path, checked against its source: `POST /api/repos/create`,
`GET /api/models/{repo}[/revision/{rev}]`, `POST /api/models/{repo}/preupload/{rev}`,
`POST /api/models/{repo}/commit/{rev}` (NDJSON), `POST /api/models/{repo}/branch/{name}`,
`GET /api/models/{repo}/refs`, `GET /api/models/{repo}/commits/{rev}`,
`POST /api/validate-yaml` and `GET /api/whoami-v2`.

Deliberate simplifications: preupload answers `regular` for every file, so the client sends
each file base64-encoded inside the commit (the real Hub answers `lfs` for large binaries and
the client then uploads through Xet, which this double does not implement); repos are model
repos; one page of commits. Errors use the Hub's status codes and `X-Error-Code` /
`X-Error-Message` headers, which the client turns into its exception types. Tokens are
`Bearer` tokens given to the constructor, each with a user, organizations and a role.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml

REPO = r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)"


@dataclass(frozen=True)
class Token:
    user: str
    orgs: tuple[str, ...] = ()
    write: bool = True

    def can_write(self, namespace: str) -> bool:
        return self.write and namespace in (self.user, *self.orgs)

    def can_read(self, namespace: str) -> bool:
        return namespace in (self.user, *self.orgs)


@dataclass
class Commit:
    oid: str
    title: str
    description: str
    parent: str | None
    files: dict[str, bytes]
    author: str
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # name -> head commit oid


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def git_blob_oid(data: bytes) -> str:
    """What the Hub reports as a regular file's oid (git's blob sha1)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """Start with `FakeHub(tokens).start()`; `url` goes into HF_ENDPOINT. State is inspected
    directly by tests (`repos`, `commits`, `history()`, `requests`)."""

    def __init__(self, tokens: dict[str, Token]) -> None:
        self.tokens = tokens
        self.repos: dict[str, Repo] = {}
        self.commits: dict[str, Commit] = {}
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.lock = threading.RLock()
        # When set, a commit is stored but its response waits for this event: the window in
        # which a worker can die after the Hub committed and before it heard back.
        self.hold_commit_response: threading.Event | None = None
        self.commit_landed = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self.url = ""

    # --- lifecycle ---

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.hold_commit_response is not None:
            self.hold_commit_response.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # --- state helpers for tests ---

    def history(self, repo_id: str, branch: str = "main") -> list[Commit]:
        """Commits reachable from the branch head, newest first."""
        out, oid = [], self.repos[repo_id].branches.get(branch)
        while oid is not None:
            c = self.commits[oid]
            out.append(c)
            oid = c.parent
        return out

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return dict(self.commits[self.repos[repo_id].branches[branch]].files)

    # --- the API ---

    def _auth(self, headers) -> Token | None:
        value = headers.get("authorization", "")
        if not value:
            return None
        token = self.tokens.get(value.removeprefix("Bearer ").strip())
        if token is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return token

    def _repo(self, repo_id: str, token: Token | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not (token and token.can_read(repo_id.split("/")[0]))):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _writable(self, repo_id: str, token: Token | None) -> Repo:
        repo = self._repo(repo_id, token)
        if token is None:
            raise HubError(401, "You must be authenticated to write")
        if not token.can_write(repo_id.split("/")[0]):
            raise HubError(403, f"You don't have write access to {repo_id}")
        return repo

    def _head(self, repo: Repo, revision: str) -> str:
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in self.commits:
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _new_commit(self, repo: Repo, branch: str, title: str, description: str, files, author):
        parent = repo.branches.get(branch)
        oid = hashlib.sha1(uuid.uuid4().bytes).hexdigest()
        date = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        self.commits[oid] = Commit(oid, title, description, parent, files, author, date)
        repo.branches[branch] = oid
        return oid

    def handle(self, method: str, path: str, headers, body: bytes) -> tuple[int, object]:
        self.requests.append((method, path))
        with self.lock:
            token = self._auth(headers)
            for pattern, verb, fn in self.ROUTES:
                m = re.fullmatch(pattern, path)
                if m and verb == method:
                    args = {k: unquote(v) for k, v in m.groupdict().items()}
                    return fn(self, token, body, **args)
        self.unhandled.append((method, path))
        raise HubError(404, f"the fake Hub does not implement {method} {path}")

    def create_repo(self, token, body):
        payload = json.loads(body)
        if token is None:
            raise HubError(401, "You must be authenticated to create a repo")
        namespace = payload.get("organization") or token.user
        repo_id = f"{namespace}/{payload['name']}"
        if not token.can_write(namespace):
            raise HubError(
                403, f"You don't have the rights to create a model under the namespace {namespace}"
            )
        if repo_id in self.repos:
            raise HubError(409, "You already created this model repo")
        repo = Repo(repo_id, payload.get("visibility", "public") == "private")
        self.repos[repo_id] = repo
        gitattributes = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
        files = {".gitattributes": gitattributes}
        self._new_commit(repo, "main", "initial commit", "", files, token.user)
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": uuid.uuid4().hex}

    def model_info(self, token, body, repo, rev="main"):
        r = self._repo(repo, token)
        oid = self._head(r, rev)
        files = self.commits[oid].files
        return 200, {
            "id": repo,
            "sha": oid,
            "private": r.private,
            "siblings": [{"rfilename": p} for p in sorted(files)],
        }

    def preupload(self, token, body, repo, rev):
        r = self._writable(repo, token)
        current = self.commits[self._head(r, rev)].files
        out = []
        for f in json.loads(body)["files"]:
            old = current.get(f["path"])
            oid = git_blob_oid(old) if old is not None else None
            mode = {"uploadMode": "regular", "shouldIgnore": False, "oid": oid}
            out.append({"path": f["path"], **mode})
        return 200, {"files": out, "commitOid": r.branches.get(rev)}

    def commit(self, token, body, repo, rev):
        r = self._writable(repo, token)
        if rev not in r.branches:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the commit payload must start with a header line")
        header = lines[0]["value"]
        if header.get("parentCommit") and header["parentCommit"] != r.branches[rev]:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(self.commits[r.branches[rev]].files)
        for item in lines[1:]:
            value = item["value"]
            if item["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "deletedFile":
                files.pop(value["path"], None)
            else:
                raise HubError(400, f"the fake Hub does not accept {item['key']!r} operations")
        oid = self._new_commit(
            r, rev, header["summary"], header.get("description", ""), files, token.user
        )
        self.commit_landed.set()
        hold = self.hold_commit_response
        if hold is not None:
            self.lock.release()  # let other requests through while this response waits
            try:
                hold.wait(120)
            finally:
                self.lock.acquire()
        return 200, {
            "success": True,
            "commitOid": oid,
            "commitUrl": f"{self.url}/{repo}/commit/{oid}",
            "hookOutput": "",
        }

    def create_branch(self, token, body, repo, branch):
        r = self._writable(repo, token)
        if branch in r.branches:
            raise HubError(409, f"Reference refs/heads/{branch} already exists")
        start = (json.loads(body) if body else {}).get("startingPoint") or "main"
        r.branches[branch] = self._head(r, start)
        return 200, {}

    def refs(self, token, body, repo):
        r = self._repo(repo, token)
        branches = [
            {"name": b, "ref": f"refs/heads/{b}", "targetCommit": oid}
            for b, oid in sorted(r.branches.items())
        ]
        return 200, {"branches": branches, "converts": [], "tags": [], "pullRequests": []}

    def list_commits(self, token, body, repo, rev):
        r = self._repo(repo, token)
        if rev not in r.branches:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return 200, [
            {
                "id": c.oid,
                "title": c.title,
                "message": f"{c.title}\n\n{c.description}".strip(),
                "authors": [{"user": c.author}],
                "date": c.date,
            }
            for c in self.history(repo, rev)
        ]

    def validate_yaml(self, token, body):
        content = json.loads(body)["content"]
        if content.startswith("---"):
            end = content.find("\n---", 3)
            try:
                meta = yaml.safe_load(content[3:end] if end > 0 else "")
            except yaml.YAMLError as e:
                return 400, {"errors": [{"message": f"invalid YAML: {e}"}], "warnings": []}
            if not isinstance(meta, dict):
                return 400, {"errors": [{"message": "metadata must be a mapping"}], "warnings": []}
        return 200, {"errors": [], "warnings": []}

    def whoami(self, token, body):
        if token is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        role = "write" if token.write else "read"
        return 200, {
            "type": "user",
            "name": token.user,
            "orgs": [{"name": o} for o in token.orgs],
            "auth": {"type": "access_token", "accessToken": {"role": role}},
        }

    ROUTES = (
        (r"/api/repos/create", "POST", create_repo),
        (rf"/api/models/{REPO}", "GET", model_info),
        (rf"/api/models/{REPO}/revision/(?P<rev>[^/]+)", "GET", model_info),
        (rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", "POST", preupload),
        (rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", "POST", commit),
        (rf"/api/models/{REPO}/branch/(?P<branch>[^/]+)", "POST", create_branch),
        (rf"/api/models/{REPO}/refs", "GET", refs),
        (rf"/api/models/{REPO}/commits/(?P<rev>[^/]+)", "GET", list_commits),
        (r"/api/validate-yaml", "POST", validate_yaml),
        (r"/api/whoami-v2", "GET", whoami),
    )


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # quiet: tests read fake.requests
        pass

    def _body(self) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("content-length") or 0))

    def _respond(self, status: int, payload: object, extra: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _dispatch(self) -> None:
        body = self._body()
        path = urlsplit(self.path).path
        try:
            status, payload = self.fake.handle(self.command, path, self.headers, body)
        except HubError as e:
            headers = {"x-error-message": e.message}
            if e.code:
                headers["x-error-code"] = e.code
            self._respond(e.status, {"error": e.message}, headers)
            return
        self._respond(status, payload)

    do_GET = do_POST = do_PUT = do_DELETE = _dispatch
