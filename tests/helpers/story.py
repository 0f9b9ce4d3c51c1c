"""Steps of the lost-tablet story that more than one end-to-end test runs
through the real ``writ`` program: the root key is made with 2-of-3 share
sheets; an on-call engineer's revoker key is created and granted, then
revokes ``tablet-07`` from its own machine.

``writ`` is the test's runner: ``writ(*args, code=0, extra_env=None)`` runs
the ``writ`` console script, checks its exit code and returns its JSON.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

WritRun = Callable[..., dict[str, Any]]


def root_init(writ: WritRun, tmp_path: Path, *extra: object) -> tuple[dict[str, Any], list[object]]:
    """``writ root init`` of ``root.key`` (passphrase from $PW) with 2-of-3 share sheets in
    ``shares/`` (``extra``: more options); its JSON and the ``--key`` arguments that sign with it."""
    root = tmp_path / "root.key"
    init = writ(
        "root",
        "init",
        "--out",
        root,
        "--passphrase-env",
        "PW",
        "--shares",
        "2-of-3",
        "--shares-out",
        tmp_path / "shares",
        *extra,
    )
    return init, ["--key", root, "--passphrase-env", "PW"]


def grant_oncall(writ: WritRun, url: str, key: Sequence[object], tmp_path: Path) -> dict[str, Any]:
    """Create ``oncall.key`` (role revoker, passphrase from $PW) and grant it as ``oncall``
    with the root ``key`` arguments; the ``key init`` JSON (``public_key``)."""
    oncall = writ(
        "key", "init", "--out", tmp_path / "oncall.key", "--passphrase-env", "PW", "--role", "revoker"
    )
    writ(
        "grant",
        "--server",
        url,
        "--subject",
        oncall["public_key"],
        "--role",
        "revoker",
        "--name",
        "oncall",
        *key,
    )
    return oncall


def oncall_env(tmp_path: Path, anchor: str) -> dict[str, str]:
    """The on-call engineer's own machine: its own mirror, the anchor from the environment."""
    return {"WRIT_HOME": str(tmp_path / "oncall-home"), "WRIT_ANCHOR": anchor}


def oncall_revokes_tablet(
    writ: WritRun, url: str, tmp_path: Path, anchor: str, code: int = 0
) -> dict[str, Any]:
    """THE lost-tablet command: revoke ``tablet-07`` (reason lost) with the on-call key."""
    return writ(
        "revoke",
        "--name",
        "tablet-07",
        "--reason",
        "lost",
        "--revoker-key",
        tmp_path / "oncall.key",
        "--passphrase-env",
        "PW",
        "--server",
        url,
        code=code,
        extra_env=oncall_env(tmp_path, anchor),
    )
