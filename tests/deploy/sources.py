"""What the deployment files are checked against: the project's own settings, command line,
routes and shutdown timing, read from the code rather than restated here.

Helpers shared by `tests/deploy/`: file locations, `.env` parsing, the names of every setting's
environment variable, `Settings` built from a given environment, CLI parsing without exiting,
the served routes, and Go-style durations (`30s`, `1m30s`) as used by Compose.
"""

import contextlib
import io
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

from pydantic import AliasChoices

from gateway.app import create_app
from gateway.cli import _parser
from gateway.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = ROOT / "k8s"

IMAGE_ENTRYPOINT = "userstream"
"""The console script the image's ENTRYPOINT runs (pyproject `[project.scripts]`)."""


def settings_env_names() -> frozenset[str]:
    """Every environment variable `Settings` reads: a field's explicit aliases (`DATABASE_URL`,
    `REDIS_URL`, ...) or `env_prefix` + the field name, upper-cased (pydantic-settings matches
    names case-insensitively by default)."""
    prefix = str(Settings.model_config.get("env_prefix", ""))
    names: set[str] = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(choice.upper() for choice in alias.choices if isinstance(choice, str))
        elif isinstance(alias, str):
            names.add(alias.upper())
        else:
            names.add(f"{prefix}{name}".upper())
    return frozenset(names)


@contextlib.contextmanager
def environment(env: Mapping[str, str]) -> Iterator[None]:
    """Run the block with exactly `env` as the settings' environment: every variable
    `Settings` reads is removed first, and all are restored afterwards."""
    names = settings_env_names()
    saved = {key: value for key, value in os.environ.items() if key.upper() in names}
    for key in saved:
        del os.environ[key]
    os.environ.update(env)
    try:
        yield
    finally:
        for key in env:
            os.environ.pop(key, None)
        os.environ.update(saved)


def settings_from(env: Mapping[str, str]) -> Settings:
    """`Settings()` as a process with environment `env` builds it; raises
    pydantic.ValidationError on a value the settings refuse."""
    with environment(env):
        return Settings()


def parse_cli(argv: list[str]) -> str:
    """Parse `argv` with the `userstream` command's own parser (`gateway.cli._parser`) and
    return the sub-command. Raises ValueError, with argparse's message, where the real
    command would exit with a usage error."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = _parser().parse_args(argv)
    except SystemExit as exc:
        raise ValueError(f"`userstream {' '.join(argv)}`: {stderr.getvalue().strip()}") from exc
    return str(args.command)


def served_paths() -> frozenset[str]:
    """The paths the gateway app routes, outside demo mode (nothing is started: `create_app`
    only builds the routes; the lifespan runs under a server)."""
    return create_app(settings_from({})).paths()


def read_env_file(path: Path) -> dict[str, str]:
    """`KEY=value` lines of a Compose `.env` file; blank lines and `#` lines are skipped and
    the value is taken literally. Raises ValueError on any other line or a repeated key."""
    env: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"{path.name}:{number}: not a KEY=value line: {line!r}")
        if key in env:
            raise ValueError(f"{path.name}:{number}: {key} is set twice")
        env[key] = value
    return env


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}


def duration_s(text: str) -> float:
    """A Go-style duration (`30s`, `1m30s`, `1h`; Compose spec "Duration") in seconds.
    Raises ValueError on anything else."""
    if not text or _DURATION_PART.sub("", text):
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * _UNIT_S[unit] for n, unit in _DURATION_PART.findall(text))
