"""`hubmix jobs` (list, status, logs, cancel hubmix's Hugging Face Jobs) and the `merge --remote` options."""

from __future__ import annotations

import sys
from typing import Any

import click

from hubmix.cli.app import cli

REMOTE_KEYS = ("remote", "flavor", "timeout", "detach", "remote_install", "upload_inputs", "max_jobs", "vary")
JOB_OPTIONS = [  # how a remote merge runs (merge and sweep)
    click.option("--remote", is_flag=True, help="Run the merge as a Hugging Face Job next to the Hub: inputs mounted "
                                                "at their pinned commits, the result pushed (see docs/remote.md)."),
    click.option("--flavor", metavar="NAME", help="With --remote: the job's hardware (default cpu-basic; "
                                                  "`hubmix jobs hardware` lists them with prices)."),
    click.option("--timeout", metavar="DURATION", help="With --remote: stop the job after this long (e.g. 30m, 2h)."),
    click.option("--detach", is_flag=True, help="With --remote: print the job id and return."),
    click.option("--remote-install", metavar="SPEC", help="With --remote: what the job pip-installs (default: this "
                                                          "hubmix, as a wheel uploaded once to your private "
                                                          "hubmix-wheels repo; a wheel URL or git+https://...)."),
    click.option("--upload-inputs", is_flag=True, help="With --remote: upload local inputs to private repos of "
                                                       "yours first (else they are refused)."),
    click.option("--max-jobs", type=click.IntRange(1, 64), default=4, show_default=True,
                 help="With --vary: jobs running at once."),
]
REMOTE_OPTIONS = [  # merge's: the job options and --vary
    *JOB_OPTIONS,
    click.option("--vary", multiple=True, metavar="NAME=V1,V2,...", help="With --remote: one job per value (per "
                                                                         "combination), each pushed to a branch."),
]


def take_remote(params: dict[str, Any]) -> dict[str, Any]:
    """The --remote options, removed from the merge's method parameters."""
    return {k: params.pop(k) for k in REMOTE_KEYS if k in params}


def check_remote(r: dict[str, Any]) -> bool:
    """Whether the merge runs remotely; usage errors for remote options given without --remote."""
    if not r.get("remote"):
        given = [f"--{k.replace('_', '-')}" for k in REMOTE_KEYS[1:] if r.get(k) and k != "max_jobs"]
        if given:
            raise click.UsageError(f"{', '.join(given)} only go with --remote")
        return False
    return True


def remote_options(r: dict[str, Any]):
    """The --remote options as the flow takes them (flow.run.Remote)."""
    from hubmix.flow.run import Remote

    return Remote(flavor=r.get("flavor"), timeout=r.get("timeout"), install=r.get("remote_install"),
                  detach=r.get("detach", False), max_jobs=r.get("max_jobs") or 4,
                  upload_inputs=r.get("upload_inputs", False), vary=list(r.get("vary") or ()))


def finish_remote(call, quiet: bool) -> None:
    """`merge --remote`, `sweep --remote`: run the flow (`call`, which starts the job(s) and follows them), then
    print how they ended and exit with the jobs' status."""
    from hubmix.hub.jobs import follow_hint
    from hubmix.hub.remote import LeftRunning, SweepRun

    try:
        flow = call()
    except LeftRunning as e:
        for job_id in e.job_ids:
            click.echo(f"interrupted: job {job_id} keeps running; {follow_hint(job_id)}", err=True)
        sys.exit(130)
    run_ = flow.remote
    if isinstance(run_, SweepRun):
        for p in run_.points:
            o = p.outcome
            if o is not None and o.stage != "COMPLETED":
                for line in o.tail:
                    click.echo(f"[{p.branch}] {line}", err=True)
                click.echo(f"error: {p.branch}: {o.describe()}", err=True)
        click.echo(run_.summary_url)
        sys.exit(run_.exit_code)
    if run_.outcome is None:
        click.echo(run_.job_id)
        if not quiet:
            click.echo(follow_hint(run_.job_id), err=True)
        return
    _finish(run_.outcome, printed=not quiet)


def _finish(outcome, printed: bool) -> None:
    """Print a followed job's end: the pushed commit URL, or its last lines and a one-line error; exit as it did."""
    if outcome.stage == "COMPLETED" and outcome.commit_url:
        click.echo(outcome.commit_url)
        return
    if not printed:
        for line in outcome.tail:
            click.echo(line, err=True)
    click.echo(f"error: {outcome.describe()}", err=True)
    sys.exit(outcome.exit_code)


@cli.group()
def jobs():
    """hubmix's Hugging Face Jobs (merge --remote): list, status, logs, cancel, hardware."""


@jobs.command("list")
@click.option("--running", is_flag=True, help="Only jobs still scheduling or running.")
def list_(running):
    """hubmix's jobs, newest first."""
    from hubmix.hub.jobs import list_jobs

    for j in list_jobs(all_stages=not running):
        labels = j.labels or {}
        where = labels.get("hubmix-repo", "").replace("--", "/") + (f"@{labels['hubmix-branch']}"
                                                                   if labels.get("hubmix-branch") else "")
        created = j.created_at.strftime("%Y-%m-%d %H:%M") if j.created_at else "-"
        click.echo(f"{j.owner.name}/{j.id}  {j.status.stage:<10}  {j.flavor or '-':<12}  {created}  {where}")


@jobs.command()
@click.argument("job_id")
def status(job_id):
    """JOB_ID's stage, flavor, image, mounted inputs; the last log lines of a failed job."""
    from hubmix.hub.jobs import inspect, outcome

    info = inspect(job_id)
    click.echo(f"job {info.owner.name}/{info.id}: {info.status.stage}"
               + (f" ({info.status.message})" if info.status.message else ""))
    click.echo(f"  url: {info.url}\n  flavor: {info.flavor}\n  image: {info.docker_image or info.space_id}")
    for v in info.volumes or []:
        click.echo(f"  input: {v.source}@{v.revision} at {v.mount_path}")
    if info.status.stage in ("ERROR", "CANCELED"):
        o = outcome(job_id)
        for line in o.tail:
            click.echo(f"  | {line}")
        sys.exit(o.exit_code)


@jobs.command()
@click.argument("job_id")
@click.option("--follow", "-f", is_flag=True, help="Stream until the job ends; then print the pushed commit URL "
                                                   "and exit with the job's status.")
@click.option("--tail", "-n", type=int, help="Only the last N lines.")
def logs(job_id, follow, tail):
    """JOB_ID's logs."""
    from hubmix.hub.jobs import follow as follow_job, follow_hint, logs as job_logs

    if not follow:
        for line in job_logs(job_id, tail=tail):
            click.echo(line)
        return
    try:
        outcome = follow_job(job_id, on_line=click.echo)
    except KeyboardInterrupt:
        click.echo(f"interrupted: job {job_id} keeps running; {follow_hint(job_id)}", err=True)
        sys.exit(130)
    _finish(outcome, printed=True)


@jobs.command()
@click.argument("job_id")
def cancel(job_id):
    """Cancel JOB_ID (nothing is pushed unless it already was)."""
    from hubmix.hub.jobs import cancel as cancel_job

    cancel_job(job_id)
    click.echo(f"canceled {job_id}", err=True)


@jobs.command()
def hardware():
    """Job flavors and what each costs."""
    from hubmix.hub.jobs import hardware_lines

    for line in hardware_lines():
        click.echo(line)
