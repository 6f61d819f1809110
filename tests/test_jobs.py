"""`merge --remote` as Hugging Face Jobs, against the loopback Hub with the jobs endpoints of tests/hubjobs.py, driven
by the real huggingface_hub client: the job spec (inputs mounted at pinned commits, the token only as a secret),
the pushed result byte-identical to a local merge, reproduce, a failing job, detach then follow, Ctrl-C, a sweep
of three points, and the Hub's refusals as one line each."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import assert_one_line_error
import jobimage
from hubjobs import HARDWARE, LABEL, enable_jobs
from hubserver import configure_hf_client, guard_loopback, start_hub_server

from hubmix.hub.wheel import build as build_wheel

TOKEN = "hf_test_token_user"
IMAGE = "pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime"
INPUTS = ["org/a", "org/b@v1", "org/c/checkpoints/c.safetensors"]


def _folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def seeded(zoo, tmp_path_factory):
    server = start_hub_server(tokens={TOKEN: "user", "hf_other": "other"})
    shims = tmp_path_factory.mktemp("image")
    runner = enable_jobs(server, images={IMAGE: jobimage.image(shims)})
    server.create_repo("org/a")
    shas = {"a": server.commit("org/a", {**_folder_files(zoo.diffusers("sd1", 1)),
                                         "README.md": b"---\nlicense: mit\n---\n"})}
    server.create_repo("org/b")
    shas["b"] = server.commit("org/b", _folder_files(zoo.diffusers("sd1", 2)))
    server.tag("org/b", "v1")
    server.commit("org/b", {"unet/diffusion_pytorch_model.safetensors":
                            zoo.diffusers("sd1", 4) / "unet" / "diffusion_pytorch_model.safetensors"})
    server.create_repo("org/c")
    shas["c"] = server.commit("org/c", {"checkpoints/c.safetensors": zoo.single("sd1", 3)})
    server.create_repo("org/gated", gated=True)
    server.commit("org/gated", _folder_files(zoo.diffusers("sd1", 5)))
    server.shas, server.runner, server.pip_log = shas, runner, shims / "pip.log"
    yield server
    runner.stop()
    server.stop()
    assert server.errors == []


@pytest.fixture
def hub(seeded, monkeypatch, tmp_path):
    off_loopback = guard_loopback(monkeypatch)
    configure_hf_client(monkeypatch, seeded.url, tmp_path / "hf_home")
    monkeypatch.setenv("HUBMIX_CACHE", str(tmp_path / "hubmix-cache"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    monkeypatch.setattr("hubmix.hub.remote.POLL_SECONDS", 0.3)
    seeded.clear_log()
    yield seeded
    seeded.runner.wait()
    assert off_loopback == []


def _creates(hub) -> list[dict]:
    return [json.loads(r.body) for r in hub.requests if r.route == "jobs_create"]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_remote_merge_spec_result_and_reproduce(hub, cli, tmp_path):
    code, out, err = cli("merge", *INPUTS, "--method", "lossless", "--push", "user/remote", "--remote",
                         "--flavor", "cpu-upgrade", "--timeout", "1h")
    assert code == 0, err
    head = hub.resolve("user/remote")
    assert out.strip().splitlines()[-1] == f"{hub.url}/user/remote/commit/{head}"
    assert "cpu-upgrade (CPU Upgrade: 8 vCPU, 32 GB): $0.0300/hour" in err  # the cost line, from the Hub's list

    # the spec: every input a read-only model volume at its pinned commit; flavor, timeout; the token a secret only
    (spec,) = _creates(hub)
    wheel_commit = hub.resolve("user/hubmix-wheels")
    assert sorted((v["source"], v["revision"], v["readOnly"], v["type"]) for v in spec["volumes"]) == [
        ("org/a", hub.shas["a"], True, "model"), ("org/b", hub.shas["b"], True, "model"),
        ("org/c", hub.shas["c"], True, "model"), ("user/hubmix-wheels", wheel_commit, True, "model")]
    assert (spec["flavor"], spec["timeoutSeconds"], spec["dockerImage"]) == ("cpu-upgrade", 3600, IMAGE)
    assert spec["secrets"] == {"HF_TOKEN": TOKEN}
    job = next(iter(j for j in hub.runner.jobs.values() if j.spec == spec))
    for where in (spec["command"], spec["environment"], spec["labels"], out, err,
                  [e["data"] for e in job.logs], hub.files("user/remote")):
        assert TOKEN not in json.dumps(where, default=repr), where
    assert all(LABEL.match(k) and LABEL.match(v) for k, v in spec["labels"].items())
    assert spec["labels"]["created-by"] == "hubmix"
    assert job.env["HF_TOKEN"] == TOKEN  # the secret reached the job's process
    recipe = yaml.safe_load(spec["environment"]["HUBMIX_RECIPE"])
    assert [m["revision"] for m in recipe["models"]] == [hub.shas["a"], hub.shas["b"], hub.shas["c"]]
    # hubmix came from the wheel of this hubmix, mounted from the user's private repo; the job ran that code
    wheel = build_wheel()
    assert hub.repos["user/hubmix-wheels"].private and wheel.name in hub.files("user/hubmix-wheels", wheel_commit)
    assert spec["environment"]["HUBMIX_INSTALL"] == f"/mnt/hubmix-wheel/{wheel.name}"
    assert hub.pip_log.read_text().splitlines()[-1].endswith(f"/{wheel.name}")
    assert "PYTHONPATH" not in job.env
    assert jobimage.imported_from(hub.runner, job.id) == str(jobimage.site(hub.runner, job.id) / "hubmix/__init__.py")
    installed = jobimage.site(hub.runner, job.id) / "hubmix"
    assert {p.relative_to(installed).as_posix(): p.read_bytes() for p in installed.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts} == {
        n[len("hubmix/"):]: zipfile.ZipFile(io.BytesIO(wheel.data)).read(n)
        for n in zipfile.ZipFile(io.BytesIO(wheel.data)).namelist() if n.startswith("hubmix/")}
    # nothing was downloaded: the job read the mounts, the local side only pinned
    assert [r for r in hub.requests if r.route == "resolve" and r.params["repo"].startswith("org/")] == []

    # the same bytes as a local merge of the same recipe (the card alone says where it ran)
    local = tmp_path / "local"
    code, _, err = cli("merge", *INPUTS, "--method", "lossless", "--out", local, "-q")
    assert code == 0, err
    pushed = hub.files("user/remote")
    weights = sorted(p for p in pushed if p.endswith(".safetensors"))
    assert len(weights) == 3
    for path in weights + ["recipe.yaml", "model_index.json", "unet/config.json"]:
        assert _sha(pushed[path]) == _sha((local / path).read_bytes()), path
    card = pushed["README.md"].decode()
    assert f"job `{job.id}`" in card and "`cpu-upgrade`" in card and IMAGE in card
    assert f"sha256 `{wheel.sha256}`" in card
    assert f"`user/hubmix-wheels` at commit `{wheel_commit}`" in card

    code, out, err = cli("reproduce", "user/remote", "-q")
    assert code == 0, out + err
    assert "all" in out and "files identical" in out


def test_failing_job_prints_its_last_lines(hub, cli):
    code, out, err = cli("merge", "org/a", "org/b@v1", "--method", "weighted_sum", "--push", "user/fails",
                         "--remote", "--remote-install", "hubmix @ https://example.invalid/broken.whl")
    assert code == 1
    assert "ERROR: No matching distribution found for hubmix @ https://example.invalid/broken.whl" in err
    assert err.strip().splitlines()[-1].startswith("error: job user/")
    assert "ERROR: Job failed with exit code: 1" in err
    assert "user/fails" not in hub.repos
    (spec,) = _creates(hub)  # --remote-install: that spec as given, no wheel built, uploaded or mounted
    assert spec["environment"]["HUBMIX_INSTALL"] == "hubmix @ https://example.invalid/broken.whl"
    assert {v["source"] for v in spec["volumes"]} == {"org/a", "org/b"}
    assert not [r for r in hub.requests if "hubmix-wheels" in r.path]
    job_id = err.split("started job ")[1].split(":")[0]
    code, out, _ = cli("jobs", "status", job_id)
    assert code == 1 and "ERROR (Job failed with exit code: 1)" in out and "No matching distribution" in out


def test_detach_upload_inputs_then_follow(hub, cli, zoo):
    local = zoo.diffusers("sd1", 6)
    code, out, err = cli("merge", local, "org/b@v1", "--method", "weighted_sum", "--alpha", "0.4", "--push",
                         "user/later", "--remote", "--detach", "--upload-inputs")
    assert code == 0, err
    job_id = out.strip()
    assert job_id.startswith("user/") and f"hubmix jobs logs {job_id} --follow" in err
    uploaded = f"user/hubmix-input-{local.name}"
    assert hub.repos[uploaded].private
    (spec,) = _creates(hub)
    assert {v["source"] for v in spec["volumes"]} == {uploaded, "org/b", "user/hubmix-wheels"}

    code, out, err = cli("jobs", "list")
    assert code == 0 and job_id in out and "user/later" in out
    code, out, err = cli("jobs", "logs", job_id, "--follow")
    assert code == 0, err
    assert out.strip().splitlines()[-1] == f"{hub.url}/user/later/commit/{hub.resolve('user/later')}"
    code, out, _ = cli("jobs", "status", job_id)
    assert code == 0 and "COMPLETED" in out and f"{uploaded}@" in out
    recipe = yaml.safe_load(hub.files("user/later")["recipe.yaml"])
    assert recipe["models"][0]["repo"] == uploaded and recipe["params"] == {"alpha": 0.4}


def test_ctrl_c_leaves_the_job_running_then_cancel(hub, cli, monkeypatch):
    import hubmix.hub.jobs as jobs

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(jobs, "follow", interrupted)
    code, out, err = cli("merge", "org/a", "org/b@v1", "--method", "weighted_sum", "--push", "user/slow",
                         "--remote", "--remote-install", "hubmix-slow")
    assert code == 130
    job_id = err.split("started job ")[1].split(":")[0]
    assert f"interrupted: job {job_id} keeps running" in err and f"hubmix jobs cancel {job_id}" in err
    job = hub.runner.jobs[job_id.split("/")[1]]
    assert job.stage in ("SCHEDULING", "RUNNING")  # left running
    code, _, err = cli("jobs", "cancel", job_id)
    assert code == 0, err
    hub.runner.wait(30)
    assert job.stage == "CANCELED"
    assert job.proc is None or job.proc.wait(timeout=20) == -9  # killed, or canceled before it started


def test_sweep_three_points(hub, cli, tmp_path):
    code, out, err = cli("merge", "org/a", "org/b@v1", "--method", "weighted_sum", "--vary", "alpha=0.3,0.5,0.7",
                         "--push", "user/sweep", "--remote", "--max-jobs", "2")
    assert code == 0, err
    branches = {f"alpha-{v}": v for v in (0.3, 0.5, 0.7)}
    refs = hub.refs("user/sweep")
    assert {r.split("/")[-1] for r in refs if r.startswith("refs/heads/")} == {"main", *branches}
    unets = {}
    for branch, alpha in branches.items():
        files = hub.files("user/sweep", branch)
        assert yaml.safe_load(files["recipe.yaml"])["params"] == {"alpha": alpha}
        unets[branch] = files["unet/diffusion_pytorch_model.safetensors"]
    assert len(set(map(_sha, unets.values()))) == 3
    specs = _creates(hub)
    assert sorted(s["labels"]["hubmix-point"] for s in specs) == ["alpha-0_3", "alpha-0_5", "alpha-0_7"]
    card = hub.files("user/sweep")["README.md"].decode()
    assert out.strip() == f"{hub.url}/user/sweep/commit/{hub.resolve('user/sweep')}"
    for branch in branches:
        assert f"[{branch}]({hub.url}/user/sweep/tree/{branch})" in card
        sha = hub.resolve("user/sweep", branch)
        assert f"{hub.url}/user/sweep/commit/{sha}" in card
    # one point is the local merge at that value
    local = tmp_path / "p"
    code, _, err = cli("merge", "org/a", "org/b@v1", "--method", "weighted_sum", "--alpha", "0.5", "--out", local,
                       "-q")
    assert code == 0, err
    assert _sha((local / "unet/diffusion_pytorch_model.safetensors").read_bytes()) == _sha(unets["alpha-0.5"])


def test_refused_before_anything_starts(hub, cli, zoo):
    local = zoo.single("sd1", 3)
    code, _, err = cli("merge", "org/a", local, "--method", "weighted_sum", "--push", "user/x", "--remote")
    assert_one_line_error(code, err, "local inputs", str(local), "--upload-inputs")
    code, _, err = cli("merge", "org/a", "org/gated", "--method", "weighted_sum", "--push", "user/x", "--remote")
    assert_one_line_error(code, err, "org/gated", "Access to model org/gated is restricted")
    assert _creates(hub) == []
    code, _, err = cli("merge", "org/a", "org/b", "--method", "weighted_sum", "--push", "user/x", "--remote",
                       "--flavor", "h100-gigantic", "-q")
    assert_one_line_error(code, err, "HTTP 400", "Invalid flavor 'h100-gigantic'")
    for status, message in ((402, "You need a payment method to run jobs on cpu-upgrade"),
                            (429, "You have reached the maximum of 3 running jobs")):
        hub.runner.refuse = (status, message)
        try:
            code, _, err = cli("merge", "org/a", "org/b", "--method", "weighted_sum", "--push", "user/x",
                               "--remote", "-q")
        finally:
            hub.runner.refuse = None
        assert_one_line_error(code, err, f"HTTP {status}", message)
    code, _, err = cli("merge", "org/a", "org/b", "--method", "weighted_sum", "--vary", "alpha=0.3", "--push",
                       "user/x")
    assert code == 2 and "--vary only go with --remote" in err
    assert hub.runner.jobs == {} or all(j.spec["labels"].get("hubmix-repo") != "user--x"
                                        for j in hub.runner.jobs.values())


def test_hardware_lists_costs(hub, cli):
    code, out, _ = cli("jobs", "hardware")
    assert code == 0
    assert out.splitlines() == [f"{h['name']} ({h['prettyName']}: {h['cpu']}, {h['ram']}"
                                + (", 1x A10G (24 GB)" if h["accelerator"] else "")
                                + f"): ${h['unitCostUSD'] * 60:.4f}/hour" for h in HARDWARE]


def test_vary_points_names_and_errors():
    from hubmix.errors import RecipeError
    from hubmix.recipe import Recipe
    from hubmix.recipe.vary import label_value, parse_vary, plan, point_name, points

    axes = parse_vary(["alpha=0.3,0.5", "--beta=1, 2"])
    assert points(axes) == [{"alpha": 0.3, "beta": 1.0}, {"alpha": 0.3, "beta": 2.0}, {"alpha": 0.5, "beta": 1.0},
                            {"alpha": 0.5, "beta": 2.0}]
    assert point_name({"alpha": 0.3, "beta": 1.0}) == "alpha-0.3_beta-1"
    assert label_value("alpha-0.3_beta-1") == "alpha-0_3_beta-1" and label_value("user/x") == "user--x"
    recipe = Recipe(models=["a", "b"], method="weighted_sum")
    assert [r.params for _, r in plan(recipe, ["alpha=0.3,0.7"])] == [{"alpha": 0.3}, {"alpha": 0.7}]
    for bad, needle in ((["alpha"], "NAME=v1"), (["alpha=x"], "not a number"), (["alpha=0.3,0.3"], "twice"),
                        (["gamma=1"], "no parameter gamma"), (["alpha=2"], "alpha")):
        with pytest.raises(RecipeError, match=needle):
            plan(recipe, bad)
    (_, r), = plan(recipe, ["text_encoder.alpha=0.2"])
    assert r.plan_for("text_encoder")["params"] == {"alpha": 0.2} and r.plan_for("unet")["params"] == {"alpha": 0.5}
    (_, r), = plan(recipe, ["unet.OUT00.alpha=0.9"])
    assert r.plan_for("unet")["blocks"]["OUT00"] == {"alpha": 0.9}
    assert point_name({"text_encoder.alpha": 0.2}) == "text-encoder.alpha-0.2"
    with pytest.raises(RecipeError, match="also given alone"):
        plan(Recipe(models=["a", "b"], method="weighted_sum", params={"alpha": 0.2}), ["alpha=0.3"])


def test_sweep_with_failing_points_exits_non_zero_and_still_sums_up(hub, cli):
    code, out, err = cli("merge", "org/a", "org/b@v1", "--method", "weighted_sum", "--vary", "alpha=0.2,0.8",
                         "--push", "user/broken-sweep", "--remote", "--max-jobs", "1", "--remote-install", "broken")
    assert code == 1
    for branch in ("alpha-0.2", "alpha-0.8"):
        assert f"[{branch}] ERROR: No matching distribution found for broken" in err
        assert f"error: {branch}: job user/" in err
    assert {r.split("/")[-1] for r in hub.refs("user/broken-sweep")} == {"main"}  # nothing pushed but the summary
    card = hub.files("user/broken-sweep")["README.md"].decode()
    assert card.count("| ERROR |") == 2 and out.strip().endswith(hub.resolve("user/broken-sweep"))


def test_the_loopback_jobs_speak_the_clients_protocol(hub):
    """The fake endpoints as huggingface_hub's own jobs API reads them: SSE logs (follow, tail), stages, filters."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import BadRequestError, JobNotFoundError

    api = HfApi(endpoint=hub.url, token=TOKEN)
    job = api.run_job(image=IMAGE, command=["bash", "-c", "echo one; echo two; echo \"$S\"; exit 3"],
                      secrets={"S": "from-a-secret"}, labels={"k": "v"}, namespace="user")
    assert list(api.fetch_job_logs(job_id=job.id, namespace="user", follow=True)) == ["one", "two", "from-a-secret"]
    info = api.inspect_job(job_id=job.id, namespace="user")
    assert (info.status.stage, info.status.message) == ("ERROR", "Job failed with exit code: 3")
    assert list(api.fetch_job_logs(job_id=job.id, namespace="user", tail=1)) == ["from-a-secret"]
    assert [j.id for j in api.list_jobs(labels={"k": "v"}, namespace="user")] == [job.id]
    assert job.id not in [j.id for j in api.list_jobs(status="RUNNING", namespace="user")]
    with pytest.raises(JobNotFoundError):
        api.inspect_job(job_id="0" * 24, namespace="user")
    with pytest.raises(BadRequestError):
        api.run_job(image=IMAGE, command=["true"], labels={"bad label": "x"}, namespace="user")


def test_detached_sweep_writes_its_summary_at_once(hub, cli):
    args = ["merge", "org/a", "org/b@v1", "--method", "weighted_sum", "--vary", "alpha=0.2,0.8", "--push",
            "user/later-sweep", "--remote", "--detach", "--remote-install", "broken", "-q"]
    code, _, err = cli(*args, "--max-jobs", "1")
    assert_one_line_error(code, err, "--detach starts all 2 jobs at once", "--max-jobs to 2")
    assert _creates(hub) == []
    code, out, err = cli(*args, "--max-jobs", "2")
    assert code == 0, err
    assert out.strip() == f"{hub.url}/user/later-sweep/commit/{hub.resolve('user/later-sweep')}"
    card = hub.files("user/later-sweep")["README.md"].decode()
    for job in hub.runner.jobs.values():
        if job.spec["labels"].get("hubmix-sweep") == "user--later-sweep":
            assert f"[user/{job.id}]({hub.url}/jobs/user/{job.id})" in card
    assert card.count("| started |") == 2


def test_sweep_remote_runs_a_job_per_point(hub, cli):
    """`hubmix sweep --remote` is merge --vary --remote from the sweep's command line: a branch per point and a
    summary card, no local rendering; its misuses are usage errors."""
    code, out, err = cli("sweep", "org/a", "org/b@v1", "--method", "weighted_sum", "--vary", "alpha=0.25,0.75",
                         "--push", "user/rsweep", "--remote", "--max-jobs", "2", "-q")
    assert code == 0, err
    branches = {"alpha-0.25": 0.25, "alpha-0.75": 0.75}
    refs = hub.refs("user/rsweep")
    assert {r.split("/")[-1] for r in refs if r.startswith("refs/heads/")} == {"main", *branches}
    for branch, alpha in branches.items():
        assert yaml.safe_load(hub.files("user/rsweep", branch)["recipe.yaml"])["params"] == {"alpha": alpha}
    card = hub.files("user/rsweep")["README.md"].decode()
    assert all(f"[{b}]({hub.url}/user/rsweep/tree/{b})" in card for b in branches)
    assert out.strip() == f"{hub.url}/user/rsweep/commit/{hub.resolve('user/rsweep')}"
    for argv, needle in ((["--push", "user/x", "--remote", "--out", "d"], "drop --out"),
                         (["--remote"], "drop --out"),
                         (["--push", "user/x", "--out", "d"], "only go with --remote"),
                         (["--flavor", "cpu-upgrade", "--out", "d"], "only go with --remote"),
                         (["--out", "d", "--push", "user/x", "--remote"], "drop --out")):
        code, _, err = cli("sweep", "org/a", "org/b", "--method", "weighted_sum", "--vary", "alpha=0.5", *argv)
        assert code == 2 and needle in err, (argv, err)
    code, _, err = cli("sweep", "org/a", "org/b", "--method", "weighted_sum", "--push", "user/x", "--remote")
    assert code == 2 and "--vary NAME=V1,V2,..." in err
