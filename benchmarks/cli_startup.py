"""Wall time of client commands, process start to exit, against a local `herder serve`.

Starts `herder serve` on the embedded default in a temporary data directory, then runs each
command N times as a shell loop would (the `herder` console script next to this Python) and
prints median / p90 wall time, twice:

- "compiled at each start": herder's own modules have no `.pyc` files and
  PYTHONDONTWRITEBYTECODE=1 (as in a sandbox that sets it), so Python compiles them every time;
- "with bytecode": herder's modules compiled first (`python -m compileall`) and the variable
  unset, as for an installed herder.

The standard library's bytecode is used in both.  With Slurm's `sbatch` and `squeue` on PATH and
a cluster answering (or `--slurm-cluster` to start a one-node cluster here, as the slurm
dispatcher's tests do), they are timed the same way beside it.

    uv run python benchmarks/cli_startup.py --runs 30 [--slurm-cluster]
"""

from __future__ import annotations

# ruff: noqa: S603, S607 - runs herder and Slurm commands it names itself
import argparse
import compileall
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

SCRIPT = Path(sys.executable).with_name("herder")
HERDER = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "herder.app.cli"]


def herder_package() -> Path:
    spec = importlib.util.find_spec("herder")
    assert spec is not None and spec.origin is not None
    return Path(spec.origin).parent


def without_bytecode(package: Path) -> None:
    """Remove herder's own `.pyc` files (only from a source checkout's package)."""
    if not (package.parents[2] / "benchmarks").is_dir():
        raise SystemExit(f"{package} is not this checkout's: not removing its bytecode")
    for cache in package.rglob("__pycache__"):
        shutil.rmtree(cache)


def timed(argv: list[str], env: dict[str, str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, env=env, capture_output=True, check=True, timeout=60)
        times.append(time.perf_counter() - start)
    return times


def summary(name: str, times: list[float]) -> str:
    ordered = sorted(times)
    p90 = ordered[int(0.9 * (len(ordered) - 1))]
    median = statistics.median(ordered) * 1000
    low = ordered[0] * 1000
    return f"{name:<28} median {median:6.1f} ms   p90 {p90 * 1000:6.1f} ms   min {low:6.1f} ms"


def probe_fails(env: dict[str, str]) -> bool:
    return (
        subprocess.run(["squeue", "-h"], env=env, capture_output=True, timeout=10).returncode != 0
    )


@contextlib.contextmanager
def slurm(start_cluster: bool) -> Iterator[dict[str, str] | None]:
    """The environment to run Slurm's commands in (None without them), with a local one-node
    cluster started for the measurement when asked."""
    if not (shutil.which("sbatch") and shutil.which("squeue")):
        yield None
        return
    if not start_cluster:
        yield dict(os.environ)
        return
    from herder_dispatcher_slurm.localcluster import LocalSlurm, missing_prerequisites

    problem = missing_prerequisites()
    if problem:
        raise SystemExit(f"cannot start a Slurm cluster: {problem}")
    with (
        tempfile.TemporaryDirectory(prefix="herder-cli-slurm-") as d,
        LocalSlurm(Path(d), nodes=1, cpus_per_node=2, real_memory_mb=2000),
    ):
        yield dict(os.environ)  # SLURM_CONF points at the cluster


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument(
        "--slurm-cluster",
        action="store_true",
        help="start a one-node Slurm cluster here for sbatch/squeue (needs slurmctld, munge)",
    )
    args = parser.parse_args()
    data = Path(tempfile.mkdtemp(prefix="herder-cli-bench-"))
    env = {**os.environ, "HERDER_DATA_DIR": str(data)}
    env.pop("HERDER_MANAGEMENT_TOKEN", None)
    serve = subprocess.Popen(
        [*HERDER, "serve", "--listen", "127.0.0.1:0"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not (data / "client.json").exists():
            if time.monotonic() > deadline or serve.poll() is not None:
                raise SystemExit("herder serve did not start")
            time.sleep(0.1)
        info = json.loads((data / "client.json").read_text())
        # The CLI finds the server through client.json, as on a user's machine.
        print(f"server {info['url']}, {args.runs} runs each\n")
        rows = [
            ("herder --version", [*HERDER, "--version"]),
            ("herder submit -- true", [*HERDER, "submit", "--", "true"]),
            ("herder containers --limit 20", [*HERDER, "containers", "--limit", "20"]),
            ("python -c pass", [sys.executable, "-c", "pass"]),
        ]
        package = herder_package()
        without_bytecode(package)
        cold = {**env, "PYTHONDONTWRITEBYTECODE": "1"}
        print("compiled at each start (no .pyc for herder, PYTHONDONTWRITEBYTECODE=1):")
        for name, argv in rows:
            print(summary(name, timed(argv, cold, args.runs)))
        compileall.compile_dir(package, quiet=1)
        warm = {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}
        print("\nwith bytecode (compileall, as installed):")
        for name, argv in rows:
            print(summary(name, timed(argv, warm, args.runs)))
        print()
        with slurm(args.slurm_cluster) as slurm_env:
            if slurm_env is None:
                print("no sbatch/squeue on PATH: Slurm not measured")
            elif probe_fails(slurm_env):
                print("sbatch/squeue present but no Slurm cluster answers: not measured")
            else:
                print(summary("squeue", timed(["squeue", "-h"], slurm_env, args.runs)))
                sbatch = ["sbatch", "--wrap", "true", "-o", "/dev/null"]
                print(summary("sbatch --wrap true", timed(sbatch, slurm_env, args.runs)))
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=30)
        shutil.rmtree(data, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
