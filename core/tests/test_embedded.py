"""What `herder serve` takes from its data directory, with and without a configuration file."""

from __future__ import annotations

from pathlib import Path

import pytest

from herder.app.embedded import CLUSTER_ID_FILE, KEY_FILE, TOKEN_FILE, prepare_serve
from herder.config import Config


@pytest.fixture(autouse=True)
def no_token_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HERDER_MANAGEMENT_TOKEN", raising=False)


def test_a_file_that_sets_nothing_gets_the_embedded_defaults(tmp_path: Path) -> None:
    file_config = Config.model_validate({"cloud": {"driver": "loopback"}})
    first = prepare_serve(file_config, tmp_path).config
    embedded = prepare_serve(None, tmp_path).config
    assert first == embedded  # one behaviour, with or without a file
    assert first.cluster_id == (tmp_path / CLUSTER_ID_FILE).read_text().strip()
    assert first.cluster_id != "zzzzz"
    assert first.api.management_token == (tmp_path / TOKEN_FILE).read_text().strip()
    assert first.queue.path == str(tmp_path / "herder.db")
    assert first.containers.dispatch_private_key == str(tmp_path / KEY_FILE)
    assert first.cloud.driver_parameters["state_dir"] == str(tmp_path / "loopback")
    for name in (CLUSTER_ID_FILE, TOKEN_FILE, KEY_FILE):
        assert (tmp_path / name).stat().st_mode & 0o077 == 0, name


def test_what_the_file_sets_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = Config.model_validate(
        {
            "cluster_id": "abcde",
            "queue": {"path": "/elsewhere/q.db"},
            "api": {"management_token": "from-the-file"},
            "cloud": {"driver": "loopback", "driver_parameters": {"state_dir": "/srv/lb"}},
        }
    )
    out = prepare_serve(config, tmp_path).config
    assert out.cluster_id == "abcde"
    assert out.queue.path == "/elsewhere/q.db"
    assert out.api.management_token == "from-the-file"
    assert out.cloud.driver_parameters["state_dir"] == "/srv/lb"
    assert not (tmp_path / CLUSTER_ID_FILE).exists()
    assert not (tmp_path / TOKEN_FILE).exists()
    # A token from the environment is used as it is: none is generated.
    monkeypatch.setenv("HERDER_MANAGEMENT_TOKEN", "from-env")
    out = prepare_serve(Config(), tmp_path / "other").config
    assert out.api.management_token == ""
    assert out.api.resolve_management_token() == "from-env"
    assert not (tmp_path / "other" / TOKEN_FILE).exists()


def test_show_mode_writes_nothing_and_says_what_is_pending(tmp_path: Path) -> None:
    data = tmp_path / "data"
    setup = prepare_serve(Config(), data, create=False)
    assert not data.exists()
    assert set(setup.pending) == {CLUSTER_ID_FILE, TOKEN_FILE, KEY_FILE}
    prepare_serve(Config(), data)
    again = prepare_serve(Config(), data, create=False)
    assert again.pending == []
    assert again.config == prepare_serve(Config(), data).config
