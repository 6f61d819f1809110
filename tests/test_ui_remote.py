"""The web UI's Remote tab without a browser: the recipe YAML run as a Hugging Face Job on the loopback Hub's jobs
(tests/hubjobs.py), the job's log lines handed to the page's callback, the result pushed by the job."""

from __future__ import annotations

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
