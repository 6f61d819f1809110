"""Hub faults against the loopback Hub (tests/hubserver.py, with its fault injection): what the Hub answered, a
commit whose reply was lost, retries kept quiet with -q, and model_index.json entries that try to leave the
snapshot. Each ends in one line naming the repo and nothing at the target."""

from __future__ import annotations

import json

from conftest import assert_one_line_error
from test_hub import _folder_files, hub, seeded, token  # noqa: F401 - fixtures

__all__ = ["hub", "seeded", "token"]


def test_hub_model_index_cannot_point_outside_the_snapshot(hub, cli, tmp_path, zoo):
    files = _folder_files(zoo.diffusers("sd1", 1))
    index = json.loads(files["model_index.json"])
    index["../../blobs"] = ["diffusers", "UNet2DConditionModel"]
    files["model_index.json"] = json.dumps(index).encode()
    hub.repos.pop("org/evil", None)
    hub.create_repo("org/evil")
    hub.commit("org/evil", files)
    (tmp_path / "o" / "p").mkdir(parents=True)
    out = tmp_path / "o" / "p" / "out"
    code, _, err = cli("merge", "org/evil", "org/b@v1", "-m", "weighted_sum", "--out", out, "-q")
    assert_one_line_error(code, err, "org/evil", "'../../blobs'", "not a plain folder name")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf_home", "hubmix-cache", "o"]
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["p"] and list((tmp_path / "o" / "p").iterdir()) == []


NO_SLEEP = """
import sys, time
time.sleep = lambda s: None  # huggingface_hub's retries, without their waits
from hubmix.cli import main
main(sys.argv[1:])
"""


def _hubmix(*args):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    return subprocess.run([sys.executable, "-c", NO_SLEEP, *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)


def test_hub_answering_500_is_reported_as_such(hub, tmp_path):
    fault = hub.fail("resolve", 500, message="Internal Error")
    try:
        out = tmp_path / "out"
        r = _hubmix("merge", "org/a", "org/b@v1", "-m", "weighted_sum", "--out", out, "-q")
    finally:
        hub.clear_faults()
    assert fault.hits > 1  # huggingface_hub retried, and -q kept its warnings quiet: one line
    line = assert_one_line_error(r.returncode, r.stderr, "org/a", "HTTP 500", "Internal Error")
    assert "cannot be reached" not in line
    assert not out.exists()


def test_push_whose_reply_was_lost(hub, token, cli, tmp_path):
    """The commit landed but its reply never came: hubmix looks at the branch and reports the commit it finds."""
    hub.repos.pop("user/lost", None)
    fault = hub.fail("commit", kind="drop_reply", times=1)
    try:
        out = tmp_path / "m"
        code, stdout, err = cli("merge", "org/a", "org/d", "-m", "weighted_sum", "--out", out, "--push", "user/lost",
                                "-q")
    finally:
        hub.clear_faults()
    assert fault.hits == 1 and len(hub.history("user/lost")) == 2  # it did land, once
    head = hub.resolve("user/lost")
    assert code == 0, err
    assert stdout.strip().splitlines()[-1] == f"{hub.url}/user/lost/commit/{head}"
    assert "reply was lost" in err and "none of the" not in err
    # a commit that really failed is still reported as such, after looking
    hub.fail("commit", 500, message="commit service broke")
    try:
        code, _, err = cli("merge", "org/a", "org/d", "-m", "weighted_sum", "--alpha", "0.3", "--out",
                           tmp_path / "m2", "--push", "user/lost", "-q")
    finally:
        hub.clear_faults()
    assert_one_line_error(code, err, "user/lost", "nothing was committed (checked main)", "none of the")
    assert len(hub.history("user/lost")) == 2
