"""Wall time of client commands, process start to exit, against a local `herder serve`.

Starts `herder serve` on the embedded default in a temporary data directory, then runs each
command N times as a shell loop would and prints median / p90 wall time.  With Slurm's `sbatch`
and `squeue` on PATH and a cluster answering, they are timed the same way beside it.

    uv run python benchmarks/cli_startup.py --runs 30
"""

from __future__ import annotations

# ruff: noqa: S603, S607 - runs herder and Slurm commands it names itself
import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERDER = [sys.executable, "-m", "herder.app.cli"]


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
    return f"{name:<28} median {median:6.1f} ms   p90 {p90 * 1000:6.1f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30)
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
        ]
        for name, argv in rows:
            print(summary(name, timed(argv, env, args.runs)))
        if shutil.which("sbatch") and shutil.which("squeue"):
            probe = subprocess.run(["squeue", "-h"], capture_output=True, timeout=10)
            if probe.returncode == 0:
                print(summary("squeue", timed(["squeue", "-h"], env, args.runs)))
                sbatch = ["sbatch", "--wrap", "true", "-o", "/dev/null"]
                print(summary("sbatch --wrap true", timed(sbatch, env, args.runs)))
            else:
                print("sbatch/squeue present but no Slurm cluster answers: not measured")
        else:
            print("no sbatch/squeue on PATH: Slurm not measured")
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=30)
        shutil.rmtree(data, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
