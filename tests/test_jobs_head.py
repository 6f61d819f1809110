"""A COMPLETED remote job whose log stream lost the commit line: hubmix asks the Hub for the head of the branch the job
pushed to and prints that commit, as it prints the logged one (against the loopback Hub and its jobs endpoints)."""

from __future__ import annotations

import json

import pytest
from hubjobs import enable_jobs
from hubserver import configure_hf_client, guard_loopback, start_hub_server

TOKEN = "hf_test_token_user"
IMAGE = "python:3.12"


@pytest.fixture(scope="module")
def server():
    server = start_hub_server(tokens={TOKEN: "user"})
    runner = enable_jobs(server, images={IMAGE: {"PATH": "/usr/bin:/bin"}})
    server.create_repo("org/b")
    server.commit("org/b", {"model_index.json": b"{}"})
    server.runner = runner
    yield server
    runner.stop()
    server.stop()
    assert server.errors == []


@pytest.fixture
def hub(server, monkeypatch, tmp_path):
    off_loopback = guard_loopback(monkeypatch)
    configure_hf_client(monkeypatch, server.url, tmp_path / "hf_home")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    yield server
    server.runner.wait()
    assert off_loopback == []


def _job(hub, push: dict, script: str = "echo merged; echo 'the commit line was lost'") -> str:
    """A job that ends as a merge job does, but whose log shows no commit URL; returns its id."""
    from hubmix.hub import jobs

    spec = jobs.JobSpec(IMAGE, ["bash", "-c", script], {"HUBMIX_PUSH": json.dumps(push)}, {}, "cpu-basic", None,
                        {"created-by": "hubmix"}, [], "hubmix-head-test", push.get("repo") or "")
    info = jobs.submit(spec, "user")
    hub.runner.wait()
    return f"user/{info.id}"


@pytest.mark.parametrize("branch", [None, "sweep-point"])
def test_a_completed_job_without_its_commit_line_prints_the_branch_head(hub, cli, branch):
    from hubmix.hub import jobs

    if branch:  # the branch's head differs from main's
        hub.commit("org/b", {"note.txt": b"on the branch"}, branch=branch)
    head = hub.resolve("org/b", branch or "main")
    job_id = _job(hub, {"repo": "org/b", "branch": branch, "create_pr": False})
    expected = f"{hub.url}/org/b/commit/{head}"
    code, out, err = cli("jobs", "logs", job_id, "--follow")
    assert code == 0 and out.splitlines()[-1] == expected, (out, err)
    assert "error" not in err, err
    assert jobs.outcome(job_id).commit_url == expected


def test_without_a_push_record_or_for_a_failed_job_nothing_is_made_up(hub, cli):
    from hubmix.hub import jobs

    pr = _job(hub, {"repo": "org/b", "branch": None, "create_pr": True})  # a PR's ref is not known here
    assert jobs.outcome(pr).commit_url is None
    failed = _job(hub, {"repo": "org/b", "branch": None, "create_pr": False}, script="echo boom; exit 3")
    o = jobs.outcome(failed)
    assert (o.stage, o.commit_url, o.exit_code) == ("ERROR", None, 3)
    code, _, err = cli("jobs", "logs", failed, "--follow")
    assert code == 3 and "ended ERROR" in err.splitlines()[-1], err
