"""The web UI's Remote tab without a browser: the recipe YAML run as a Hugging Face Job on the loopback Hub's jobs
(tests/hubjobs.py), the job's log lines handed to the page's callback, the result pushed by the job."""

from __future__ import annotations

from types import SimpleNamespace

import yaml

from test_jobs import INPUTS, TOKEN, hub, seeded  # noqa: F401  (fixtures: the loopback Hub with jobs)


def test_remote_tab_runs_the_recipe_as_a_job_and_streams_its_log(hub):  # noqa: F811
    from hubmix.ui import actions

    text = yaml.safe_dump({"models": list(INPUTS), "method": "lossless"})
    lines: list[str] = []
    info = actions.remote(text, "user/ui-remote", "cpu-upgrade", log=lambda level, t: lines.append(t))
    head = hub.resolve("user/ui-remote")
    assert info["repo_id"] == "user/ui-remote" and info["commit_url"] == f"{hub.url}/user/ui-remote/commit/{head}"
    assert info["stage"] == "COMPLETED" and info["job_id"]
    assert lines and TOKEN not in "\n".join(lines)
    assert "README.md" in hub.files("user/ui-remote")
    assert "cpu-upgrade" in "\n".join(actions.flavors())  # the flavor dropdown: the Hub's list with prices


def test_a_space_visitor_job_runs_under_the_visitor_token(hub, monkeypatch, tmp_path):  # noqa: F811
    """In a Space the merge is a Job created with the visitor's OAuth token (the owner's HF_TOKEN is set here and
    must not appear in any request), pushed to the visitor's namespace."""
    from hubmix.ui.visitor import act

    monkeypatch.setenv("HUBMIX_UI_DIR", str(tmp_path / "work"))
    text = yaml.safe_dump({"models": list(INPUTS), "method": "lossless"})
    info = act(True, SimpleNamespace(token="hf_other"), "remote", text, "", "cpu-upgrade")
    assert info["repo_id"].startswith("other/") and info["stage"] == "COMPLETED"
    assert "README.md" in hub.files(info["repo_id"])
    creates = [r for r in hub.requests if r.route == "jobs_create"]
    assert len(creates) == 1 and creates[0].headers["authorization"] == "Bearer hf_other"
    assert creates[0].params["ns"] == "other"
    sent = {r.headers.get("authorization") for r in hub.requests if r.route not in ("lfs_upload", "lfs_verify")}
    assert f"Bearer {TOKEN}" not in sent and "Bearer hf_other" in sent
