"""The runner's install and md5 check, run by a real shell: a directory no one else can plant in."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from herder.engine.worker.runner import RunnerDeployment

PROGRAM = b"#!/bin/sh\necho runner\n"


def deployment(directory: Path) -> RunnerDeployment:
    return RunnerDeployment.build(PROGRAM, str(directory), "unused")


def run(command: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    # As the instance's root user would: no sudo (this process is the runner's user).
    return subprocess.run(["sh", "-c", command], input=stdin, capture_output=True, timeout=30)


def install(dep: RunnerDeployment) -> subprocess.CompletedProcess[bytes]:
    return run(dep.install_command("root"), dep.data)


def check(dep: RunnerDeployment) -> bytes:
    return run(dep.md5_check_command("root")).stdout


def test_install_creates_a_private_directory_and_the_check_accepts_it(tmp_path: Path) -> None:
    dep = deployment(tmp_path / "a" / "runner")
    assert check(dep) == b""  # nothing there yet: install
    result = install(dep)
    assert result.returncode == 0, result.stderr
    directory = tmp_path / "a" / "runner"
    assert directory.stat().st_mode & 0o777 == 0o700
    assert Path(dep.command).read_bytes() == PROGRAM
    assert Path(dep.command).stat().st_mode & 0o777 == 0o700
    assert check(dep) == dep.md5_expected_output()
    assert list(directory.iterdir()) == [Path(dep.command)]  # no temporary file left


def test_a_directory_others_can_write_is_repaired_or_refused_by_the_check(tmp_path: Path) -> None:
    directory = tmp_path / "runner"
    dep = deployment(directory)
    assert install(dep).returncode == 0
    directory.chmod(0o777)
    assert check(dep) == b""  # not trusted as it is...
    assert install(dep).returncode == 0  # ...but it is ours, so the install closes it again
    assert directory.stat().st_mode & 0o777 == 0o700
    assert check(dep) == dep.md5_expected_output()


def test_a_symlink_in_place_of_the_program_is_replaced_not_written_through(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "runner"
    dep = deployment(directory)
    assert install(dep).returncode == 0
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    victim.chmod(0o600)
    os.unlink(dep.command)
    os.symlink(victim, dep.command)
    assert check(dep) == b""
    assert install(dep).returncode == 0
    assert victim.read_bytes() == b"precious\n" and victim.stat().st_mode & 0o777 == 0o600
    assert not Path(dep.command).is_symlink()
    assert hashlib.md5(Path(dep.command).read_bytes()).hexdigest() == dep.md5


def test_a_symlinked_directory_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "elsewhere"
    real.mkdir(mode=0o700)
    (tmp_path / "runner").symlink_to(real)
    dep = deployment(tmp_path / "runner")
    result = install(dep)
    assert result.returncode == 3
    assert b"refusing runner directory" in result.stderr and b"not a directory" in result.stderr
    assert list(real.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="making a directory another user owns needs root")
def test_a_directory_another_user_created_first_is_refused(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    directory = tmp_path / "runner"
    directory.mkdir(mode=0o777)
    planted = directory / "herder-runner~planted"
    planted.write_text("planted\n")
    os.chown(directory, 65534, 65534)  # nobody
    dep = deployment(directory)
    assert check(dep) == b""
    result = install(dep)
    assert result.returncode == 3
    assert b"owned by uid 65534, not by uid 0" in result.stderr
    assert not Path(dep.command).exists()  # nothing written into it
