"""The commands that run job files: ``run``, ``validate``, and the simulator (``simulate``).

``run`` is a thin layer over the Python API's code path (:mod:`orchestrator.app`): the CLI
adds its logging, the live display, signal handling and the exit code.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any, cast

import anyio
import click

from orchestrator.cli_common import Verbosity, check_only, check_output_dir, options, token_for
from orchestrator.errors import EXIT_FAILED, EXIT_OK, EXIT_SIGINT, UsageError
from orchestrator.metrics import PUSHGATEWAY_ENV

RUN_OPTIONS = (
    click.argument("jobs_file", metavar="JOBS.yaml", type=click.Path(dir_okay=False, path_type=Path)),
    click.option("--simulate", is_flag=True, help="Run against the built-in simulator (no token needed)."),
    click.option(
        "--output-dir",
        metavar="DIR",
        callback=lambda c, p, v: check_output_dir(v),
        help="Override run.output_dir ({date} allowed).",
    ),
    click.option("--concurrency", type=click.IntRange(min=1, max=1_000_000), help="Exports in flight at once."),
    click.option(
        "--only",
        multiple=True,
        metavar="NAME",
        callback=lambda c, p, v: check_only(v),
        help="Run only this job (repeat, or comma-separate).",
    ),
    click.option(
        "--shard",
        metavar="I/N",
        help="Run only shard I of N (0-based) by a stable hash of job names. Without it, a Kubernetes "
        "Indexed Job's JOB_COMPLETION_INDEX (I) and MICS_SHARD_COUNT (N) give the shard. Without "
        "--output-dir, a shard writes into OUTPUT_DIR/shard-I-of-N/; a shard with no job exits 0.",
    ),
    click.option(
        "--log-format",
        type=click.Choice(["text", "json"]),
        default=lambda: os.environ.get("MICS_LOG_FORMAT", "text"),
        show_default="text, or $MICS_LOG_FORMAT",
    ),
    click.option("--progress", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True),
    click.option(
        "--workers",
        type=click.IntRange(min=0),
        default=None,
        help="Processes that validate lines [default: the CPUs available; 0: on the event loop; "
        "more than 4x the CPUs is refused (exit 2): they would only compete for the same cores].",
    ),
    click.option(
        "--metrics-pushgateway",
        metavar="URL",
        default=lambda: os.environ.get(PUSHGATEWAY_ENV),
        help=f"Push Prometheus metrics here at the end [env {PUSHGATEWAY_ENV}].",
    ),
    click.option(
        "--deadline",
        metavar="DURATION",
        default=None,
        help="Stop the run this long after it starts (5h30m, 90m, 1d or seconds) [env MICS_DEADLINE_S, "
        "in seconds; default: run.deadline]: no execution is created for a job not expected to end "
        "before it (its last run's duration, else its timeout_s); at the deadline the run stops as on "
        "SIGTERM, INTERRUPTED, exit 124.",
    ),
    click.option(
        "-v",
        "--verbose",
        count=True,
        help="More logs: -v every poll and HTTP retry, in any log format (-vv: library debug logs too).",
    ),
)

SIMULATE_OPTIONS = (
    click.option("--host", default="127.0.0.1", show_default=True),
    click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True),
    click.option(
        "--scenario",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="YAML scenario file.",
    ),
    click.option("--token", help="The token the simulator accepts [default: sim-token]."),
    click.option("--rate-429", type=click.FloatRange(0, 1), help="Fraction of requests answered 429."),
    click.option("--retry-after", type=click.FloatRange(min=0), help="Retry-After seconds sent with 429."),
    click.option("--rate-5xx", type=click.FloatRange(0, 1), help="Fraction of requests answered 5xx."),
    click.option("--reset-after-bytes", type=click.IntRange(min=0), help="Cut downloads after this many bytes..."),
    click.option("--reset-first-k", type=click.IntRange(min=0), help="...for the first K downloads of each file."),
    click.option("--slow-body-bps", type=click.IntRange(min=1), help="Cap download speed (bytes/s)."),
    click.option("--time-scale", type=click.FloatRange(min=0), help="Multiply execution durations."),
    click.option("--seed", type=int, help="Fault injection seed."),
)


@click.command()
@options(*RUN_OPTIONS)
def run(
    jobs_file: Path,
    simulate: bool,
    output_dir: str | None,
    concurrency: int | None,
    only: tuple[str, ...],
    shard: str | None,
    log_format: str,
    progress: str,
    workers: int | None,
    metrics_pushgateway: str | None,
    deadline: str | None,
    verbose: int,
) -> int:
    """Run the exports of a job file and write results and manifest.json."""
    Verbosity.level = verbose
    # A thin layer over the Python API's code path (orchestrator/app.py): the CLI adds its
    # logging, the live display, signal handling and the exit code.
    from orchestrator.app import Console, RunOptions, check_workers, execute, job_names, resolve_deadline

    if workers is not None:
        check_workers(workers, f"--workers {workers}")
    options = RunOptions(
        jobs_file=jobs_file,
        simulate=simulate,
        output_dir=output_dir,
        concurrency=concurrency,
        only=job_names(only),
        shard=shard,
        workers=workers,
        metrics_pushgateway=metrics_pushgateway,
        deadline_s=resolve_deadline(deadline, "--deadline"),
    )
    return execute(options, Console(log_format=log_format, verbosity=verbose, progress=progress))


@click.command()
@click.argument("jobs_file", metavar="JOBS.yaml", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--check-queries",
    is_flag=True,
    help="Ask the API to check every query job's OTQL (creates nothing).",
)
def validate(jobs_file: Path, check_queries: bool) -> int:
    """Parse and check a job file; with --check-queries, also check queries on the API."""
    from orchestrator.config import load_job_file

    job_file = load_job_file(jobs_file)
    query_jobs = [j for j in job_file.jobs if j.query is not None]
    if check_queries and query_jobs:
        from orchestrator.queries import check_queries as check

        token = token_for(job_file.api.token_env)
        base = job_file.base_url()
        failures = anyio.run(check, base, token, query_jobs)
        for name, message in failures:
            click.echo(f"{jobs_file}: job {name!r}: query: {message}", err=True)
        if failures:
            return EXIT_FAILED
    click.echo(
        f"{jobs_file}: OK, {len(job_file.jobs)} job(s)"
        + (f", {len(query_jobs)} query(ies) checked" if check_queries and query_jobs else "")
    )
    return EXIT_OK


@click.command()
@options(*SIMULATE_OPTIONS)
def simulate(
    host: str,
    port: int,
    scenario: Path | None,
    token: str | None,
    rate_429: float | None,
    retry_after: float | None,
    rate_5xx: float | None,
    reset_after_bytes: int | None,
    reset_first_k: int | None,
    slow_body_bps: int | None,
    time_scale: float | None,
    seed: int | None,
) -> int:
    """Serve the simulated API (default: the demo exports, any other id derived on demand)."""
    from dataclasses import replace

    from orchestrator.simulator import Simulator, SimulatorConfig, demo_config

    try:
        config = SimulatorConfig.from_file(scenario) if scenario else demo_config()
    except (ValueError, TypeError, OSError) as exc:
        raise UsageError(f"{scenario}: {exc}") from None
    fault_changes = {
        k: v
        for k, v in {
            "rate_429": rate_429,
            "retry_after_s": retry_after,
            "rate_5xx": rate_5xx,
            "reset_after_bytes": reset_after_bytes,
            "reset_first_k": reset_first_k,
            "slow_body_bps": slow_body_bps,
            "seed": seed,
        }.items()
        if v is not None
    }
    config = replace(config, faults=replace(config.faults, **cast(Any, fault_changes)))
    if token:
        config = replace(config, token=token)
    if time_scale is not None:
        config = replace(config, time_scale=time_scale)

    async def serve() -> None:
        async with Simulator(config, host, port) as sim:
            click.echo(f"simulator listening on {sim.url}", err=True)
            click.echo(f"  export MICS_API_URL={sim.url} MICS_API_TOKEN={sim.token}", err=True)
            await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        return EXIT_SIGINT
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return EXIT_OK


__all__ = ["run", "simulate", "validate"]
