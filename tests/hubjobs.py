"""Hugging Face Jobs on the loopback Hub of tests/hubserver.py: the endpoints huggingface_hub's jobs API calls
(create, inspect, logs as server-sent events, cancel, list, hardware, and a repo's auth-check), with each job's
command run as a local subprocess.

    from hubjobs import enable_jobs
    runner = enable_jobs(hub, images={"pytorch/pytorch:...": {"PATH": "/shims:/usr/bin:/bin"}})

A job runs like a container of its image would: its environment is the image's (`images[image]`, plus HOME and a
temp dir), then the spec's `environment`, then its `secrets` (in that subprocess only), then the platform's JOB_ID.
Each mounted model volume is the repo's files at the volume's revision, written to a read-only temp folder; the
mount path is rewritten to that folder in the command and environment (what the container sees at that path).
Standard library only.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import hubserver
from hubserver import HubError, HubServer, _now

TERMINAL = ("COMPLETED", "CANCELED", "ERROR", "DELETED")
LABEL = re.compile(r"^[A-Za-z0-9_-]{1,100}$")  # the Hub's label rule: keys and values
HARDWARE = [  # the shape of GET /api/jobs/hardware (prices of the public list at the time of writing)
    {"name": "cpu-basic", "prettyName": "CPU Basic", "cpu": "2 vCPU", "ram": "16 GB", "ephemeralStorage": "50 GB",
     "accelerator": None, "unitCostMicroUSD": 167, "unitCostUSD": 0.000167, "unitLabel": "minute"},
    {"name": "cpu-upgrade", "prettyName": "CPU Upgrade", "cpu": "8 vCPU", "ram": "32 GB",
     "ephemeralStorage": "50 GB", "accelerator": None, "unitCostMicroUSD": 500, "unitCostUSD": 0.0005,
     "unitLabel": "minute"},
    {"name": "a10g-small", "prettyName": "Nvidia A10G - small", "cpu": "4 vCPU", "ram": "15 GB",
     "ephemeralStorage": "110 GB", "accelerator": {"type": "gpu", "model": "A10G", "quantity": "1",
                                                   "vram": "24 GB", "manufacturer": "Nvidia"},
     "unitCostMicroUSD": 16667, "unitCostUSD": 0.016667, "unitLabel": "minute"},
]


@dataclass
class Job:
    id: str
    namespace: str
    spec: dict
    created_at: str
    stage: str = "SCHEDULING"
    message: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    logs: list[dict] = field(default_factory=list)  # {"data": line, "timestamp": iso}
    env: dict = field(default_factory=dict)  # what the subprocess got (for tests; secrets included)
    command: list = field(default_factory=list)  # as run, mount paths rewritten
    mounts: dict = field(default_factory=dict)  # mount path -> local folder
    proc: subprocess.Popen | None = None
    returncode: int | None = None

    def info(self, owner_id: str) -> dict:
        s = self.spec
        out = {"id": self.id, "createdAt": self.created_at, "dockerImage": s.get("dockerImage"),
               "spaceId": s.get("spaceId"), "command": s.get("command"), "arguments": s.get("arguments", []),
               "environment": s.get("environment", {}), "secrets": {k: None for k in s.get("secrets") or {}},
               "flavor": s.get("flavor"), "labels": s.get("labels"), "volumes": s.get("volumes"),
               "status": {"stage": self.stage, "message": self.message},
               "owner": {"id": owner_id, "name": self.namespace, "type": "user"},
               "initiator": {"type": "user", "id": owner_id, "name": self.namespace}}
        for key, value in (("startedAt", self.started_at), ("finishedAt", self.finished_at)):
            if value:
                out[key] = value
        return out


class JobRunner:
    """The jobs of one HubServer. `refuse` = (status, message) answers every create (no credit, quota...)."""

    def __init__(self, hub: HubServer, images: dict[str, dict] | None = None):
        self.hub = hub
        self.images = dict(images or {})
        self.jobs: dict[str, Job] = {}
        self.refuse: tuple[int, str] | None = None
        self.root = tempfile.mkdtemp(prefix="fake-hub-jobs-")
        self._ids = itertools.count(1)

    # ---- lifecycle of one job
    def create(self, namespace: str, spec: dict) -> Job:
        job_id = hashlib.sha1(f"{namespace}{next(self._ids)}{time.time()}".encode()).hexdigest()[:24]
        job = Job(job_id, namespace, spec, _now())
        self.jobs[job_id] = job
        workdir = os.path.join(self.root, job_id)
        os.makedirs(workdir)
        for i, vol in enumerate(spec.get("volumes") or []):
            folder = os.path.join(workdir, f"volume-{i}")
            for path, data in self.hub.files(vol["source"], vol.get("revision") or "main").items():
                target = os.path.join(folder, *path.split("/"))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with open(target, "wb") as f:
                    f.write(data)
                os.chmod(target, stat.S_IRUSR | stat.S_IRGRP)  # a read-only mount
            job.mounts[vol["mountPath"]] = folder

        def mapped(text: str) -> str:  # whole paths only: /m/a never rewrites inside /m/ab or user/m/a
            for mount in sorted(job.mounts, key=len, reverse=True):
                text = re.sub(rf"(?<![\w./-]){re.escape(mount)}(?![\w.-])", lambda _: job.mounts[mount], text)
            return text

        image = spec.get("dockerImage") or spec.get("spaceId")
        tmp = os.path.join(workdir, "tmp")
        os.makedirs(tmp)
        env = {"HOME": workdir, "TMPDIR": tmp, "LANG": "C.UTF-8", "PATH": "/usr/bin:/bin",
               **self.images.get(image, {})}
        env.update({k: mapped(str(v)) for k, v in (spec.get("environment") or {}).items()})
        env.update({k: str(v) for k, v in (spec.get("secrets") or {}).items()})
        env["JOB_ID"] = job_id
        job.env, job.command = env, [mapped(str(a)) for a in (spec.get("command") or []) + spec.get("arguments", [])]
        threading.Thread(target=self._run, args=(job, image, workdir), daemon=True).start()
        return job

    def _log(self, job: Job, line: str) -> None:
        with self.hub._lock:
            job.logs.append({"data": line, "timestamp": _now()})

    def _finish(self, job: Job, stage: str, message: str | None) -> None:
        with self.hub._lock:
            if job.stage not in TERMINAL:
                job.stage, job.message, job.finished_at = stage, message, _now()

    def _run(self, job: Job, image: str, workdir: str) -> None:
        with self.hub._lock:
            if job.stage in TERMINAL:  # canceled while scheduling
                return
            job.started_at, job.stage = _now(), "RUNNING"
        self._log(job, f"===== Job started at {datetime.now(timezone.utc).isoformat()} =====")
        if image not in self.images:
            self._log(job, f"Error: image {image} not found")
            return self._finish(job, "ERROR", f"Failed to pull image {image}")
        with self.hub._lock:  # a cancel either sees the process or stops it from starting
            if job.stage in TERMINAL:
                return
            try:
                job.proc = subprocess.Popen(job.command, env=job.env, cwd=workdir, stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as e:
                job.logs.append({"data": str(e), "timestamp": _now()})
                job.stage, job.message, job.finished_at = "ERROR", str(e), _now()
                return
        timeout = job.spec.get("timeoutSeconds")
        timer = threading.Timer(timeout, self._kill, (job, "ERROR", "Job timed out")) if timeout else None
        if timer:
            timer.start()
        assert job.proc.stdout is not None
        for raw in job.proc.stdout:
            for part in re.split(rb"\r\n|\r|\n", raw):
                if part.strip():
                    self._log(job, part.decode("utf-8", "replace").rstrip())
        job.returncode = job.proc.wait()
        if timer:
            timer.cancel()
        if job.returncode == 0:
            self._finish(job, "COMPLETED", None)
        else:
            self._finish(job, "ERROR", f"Job failed with exit code: {job.returncode}")

    def _kill(self, job: Job, stage: str, message: str) -> None:
        self._finish(job, stage, message)
        with self.hub._lock:
            proc = job.proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, 9)
            except OSError:
                pass

    def wait(self, timeout: float = 120) -> None:
        """Until every job has ended (tests)."""
        end = time.monotonic() + timeout
        while any(j.stage not in TERMINAL for j in list(self.jobs.values())) and time.monotonic() < end:
            time.sleep(0.05)

    def stop(self) -> None:
        for job in self.jobs.values():
            self._kill(job, "CANCELED", "the test server stopped")
        for dirpath, dirnames, filenames in os.walk(self.root):  # read-only mounts: make them removable
            for name in filenames:
                os.chmod(os.path.join(dirpath, name), stat.S_IRUSR | stat.S_IWUSR)
        shutil.rmtree(self.root, ignore_errors=True)


# ---- HTTP handlers (methods of hubserver._Handler; `self` is the request) -----------------------------------------

def _runner(hub: HubServer) -> JobRunner:
    runner = getattr(hub, "job_runner", None)
    if runner is None:
        raise HubError(404, "Jobs are not enabled on this server")
    return runner


def _namespace(self, hub: HubServer, ns: str) -> None:
    if self.user is None:
        raise HubError(401, "You must be authenticated to use Jobs")
    if not hub._can_write(ns, self.user):
        raise HubError(403, f"You don't have the rights to run jobs under the namespace \"{ns}\"")


def _job(self, hub: HubServer, ns: str, job_id: str) -> Job:
    _namespace(self, hub, ns)
    job = _runner(hub).jobs.get(job_id)
    if job is None or job.namespace != ns:
        raise HubError(404, f"Job {job_id} not found")
    return job


def h_jobs_hardware(self, hub: HubServer) -> None:
    self._json(HARDWARE)


def h_jobs_create(self, hub: HubServer, ns: str) -> None:
    _namespace(self, hub, ns)
    runner, spec = _runner(hub), self._payload()
    if runner.refuse:
        raise HubError(*runner.refuse)
    if spec.get("flavor") not in {h["name"] for h in HARDWARE}:
        raise HubError(400, f"Invalid flavor '{spec.get('flavor')}': run `hf jobs hardware` for the list")
    for key, value in (spec.get("labels") or {}).items():
        if not (LABEL.match(str(key)) and LABEL.match(str(value))):
            raise HubError(400, f"Invalid label {key}={value}: keys and values are 1-100 letters, digits, '-' or '_'")
    for vol in spec.get("volumes") or []:
        if vol.get("type") != "model" or not str(vol.get("mountPath", "")).startswith("/"):
            raise HubError(400, f"The fake hub mounts model repos at absolute paths, not {vol}")
        repo = hub._visible_repo(vol["source"], self.user)
        hub._check_gate(repo, self.user, "model_index.json")
        hub._resolve(repo, vol.get("revision") or "main")
    self._json(runner.create(ns, spec).info(hashlib.md5(self.user.encode()).hexdigest()[:24]))


def h_jobs_list(self, hub: HubServer, ns: str) -> None:
    _namespace(self, hub, ns)
    stages = [s.upper() for s in self.query.get("stage", [])]
    labels = [tuple(x.split("=", 1)) for x in self.query.get("label", []) if "=" in x]
    owner = hashlib.md5(self.user.encode()).hexdigest()[:24]
    out = [j.info(owner) for j in _runner(hub).jobs.values() if j.namespace == ns
           and (not stages or j.stage in stages)
           and all((j.spec.get("labels") or {}).get(k) == v for k, v in labels)]
    self._json(sorted(out, key=lambda j: j["createdAt"], reverse=True))


def h_jobs_inspect(self, hub: HubServer, ns: str, job_id: str) -> None:
    self._json(_job(self, hub, ns, job_id).info(hashlib.md5(self.user.encode()).hexdigest()[:24]))


def h_jobs_cancel(self, hub: HubServer, ns: str, job_id: str) -> None:
    job = _job(self, hub, ns, job_id)
    threading.Thread(target=_runner(hub)._kill, args=(job, "CANCELED", "Canceled by the user"), daemon=True).start()
    self._json({})


def h_jobs_logs(self, hub: HubServer, ns: str, job_id: str) -> None:
    """Server-sent events: one `data: {"data", "timestamp"}` per line, history first, then new lines until the job
    ends; the stream closes when it has (the client then checks the stage)."""
    job = _job(self, hub, ns, job_id)
    tail = self.query.get("tail")
    start = max(len(job.logs) - int(tail[-1]), 0) if tail else 0
    self._send(200)

    def stream() -> None:
        self.record.status = 200
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        sent = start
        while True:
            with hub._lock:
                events, done = job.logs[sent:], job.stage in TERMINAL
            for event in events:
                self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
            sent += len(events)
            self.wfile.flush()
            if done and sent == len(job.logs):
                return
            time.sleep(0.05)

    self._stream = stream


def h_auth_check(self, hub: HubServer, repo: str) -> None:
    r = hub._visible_repo(repo, self.user)
    hub._check_gate(r, self.user, "model_index.json")
    self._json({})


_JOB_ROUTES = [
    ("GET", r"/api/jobs/hardware", "jobs_hardware"),
    ("POST", r"/api/jobs/(?P<ns>[^/]+)", "jobs_create"),
    ("GET", r"/api/jobs/(?P<ns>[^/]+)", "jobs_list"),
    ("GET", r"/api/jobs/(?P<ns>[^/]+)/(?P<job_id>[^/]+)", "jobs_inspect"),
    ("POST", r"/api/jobs/(?P<ns>[^/]+)/(?P<job_id>[^/]+)/cancel", "jobs_cancel"),
    ("GET", r"/api/jobs/(?P<ns>[^/]+)/(?P<job_id>[^/]+)/logs", "jobs_logs"),
    ("GET", rf"/api/models/{hubserver.REPO}/auth-check", "auth_check"),
]
if not any(name == "jobs_hardware" for _, _, name in hubserver._ROUTES):
    hubserver._ROUTES[:0] = [(m.split("|"), re.compile(p), n) for m, p, n in _JOB_ROUTES]
    for _, _, _name in _JOB_ROUTES:
        setattr(hubserver._Handler, f"h_{_name}", globals()[f"h_{_name}"])


def enable_jobs(hub: HubServer, images: dict[str, dict] | None = None) -> JobRunner:
    """Give `hub` the jobs endpoints; `images`: image name -> the environment a container of it starts with."""
    hub.job_runner = JobRunner(hub, images)
    return hub.job_runner
