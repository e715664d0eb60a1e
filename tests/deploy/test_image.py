"""deploy/Dockerfile and its build-context filter against the project (no Docker engine needed).

The instructions are read as Dockerfile reference defines them (one per line, `\\` continues
a line, JSON arrays for the exec form); the ignore file is applied with Docker's rules (the
last matching pattern wins, `!` re-includes, a pattern matching a folder covers its contents).
"""

import json
import re
import subprocess
import tomllib

import pytest

from tests.deploy.sources import (
    DEPLOY,
    IMAGE_ENTRYPOINT,
    ROOT,
    parse_cli,
    served_paths,
    settings_env_names,
    settings_from,
)

DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"

Instruction = tuple[str, str]


def instructions(text: str) -> list[Instruction]:
    """(INSTRUCTION, arguments) for each instruction; comments and blank lines dropped."""
    joined = re.sub(r"\\\n", " ", text)
    result = []
    for line in joined.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, args = line.strip().partition(" ")
            result.append((keyword.upper(), args.strip()))
    return result


def stages(text: str) -> dict[str, list[Instruction]]:
    """The instructions of each build stage, by stage name (`FROM image AS name`)."""
    result: dict[str, list[Instruction]] = {}
    current: list[Instruction] = []
    for keyword, args in instructions(text):
        if keyword == "FROM":
            current = result.setdefault(args.split()[-1], [("FROM", args)])
        elif result:
            current.append((keyword, args))
    return result


def only(stage: list[Instruction], keyword: str) -> str:
    """The arguments of the one `keyword` instruction of a stage; fails the test otherwise."""
    found = [args for kw, args in stage if kw == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {found}"
    return found[0]


@pytest.fixture(scope="module")
def runtime() -> list[Instruction]:
    """The final stage: the image that runs."""
    return list(stages(DOCKERFILE.read_text()).values())[-1]


def test_image_has_a_builder_and_a_runtime_on_the_same_python(runtime: list[Instruction]) -> None:
    """The venv copied from the builder points at the builder's interpreter, so both stages
    must start from the same base image."""
    by_name = stages(DOCKERFILE.read_text())
    assert list(by_name) == ["builder", "runtime"]
    bases = {only(stage, "FROM").split()[0] for stage in by_name.values()}
    assert len(bases) == 1, bases
    assert "--from=builder /opt/venv /opt/venv" in [a for k, a in runtime if k == "COPY"]


def test_runtime_installs_nothing_and_runs_unprivileged(runtime: list[Instruction]) -> None:
    for keyword, args in runtime:
        if keyword == "RUN":
            assert not re.search(r"\b(apt-get|apt|apk|pip)\b", args), f"RUN {args}"
    user = only(runtime, "USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root uid (Kubernetes runAsNonRoot)"


def test_builder_takes_wheels_only() -> None:
    builder = stages(DOCKERFILE.read_text())["builder"]
    installs = [args for kw, args in builder if kw == "RUN" and "pip install" in args]
    assert installs and all("--only-binary=:all:" in args for args in installs)


def test_entrypoint_and_cmd_run_the_gateway_through_the_console_script(
    runtime: list[Instruction],
) -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert json.loads(only(runtime, "ENTRYPOINT")) == [IMAGE_ENTRYPOINT]
    assert IMAGE_ENTRYPOINT in scripts
    assert parse_cli(json.loads(only(runtime, "CMD"))) == "serve"


def test_env_sets_real_settings_with_valid_values(runtime: list[Instruction]) -> None:
    pairs = dict(
        re.findall(r"(\w+)=(\"[^\"]*\"|\S+)", " ".join(a for k, a in runtime if k == "ENV"))
    )
    assert pairs["PYTHONUNBUFFERED"] == "1"
    settings_env = {k: v for k, v in pairs.items() if k.startswith("USERSTREAM_")}
    assert set(settings_env) <= settings_env_names()
    assert settings_from(settings_env).log_format == "json"


def test_healthcheck_probes_a_served_route_on_the_exposed_port(runtime: list[Instruction]) -> None:
    check = only(runtime, "HEALTHCHECK")
    command = json.loads(check.split(" CMD ", 1)[1])
    assert command[:2] == ["python", "-c"]
    compile(command[2], "HEALTHCHECK", "exec")  # raises SyntaxError
    (path,) = re.findall(r"http://127\.0\.0\.1:%s(/\w+)", command[2])
    assert path == "/healthz" and path in served_paths()
    (port_variable,) = re.findall(r"environ\.get\('(\w+)', '(\d+)'\)", command[2])
    assert port_variable[0] in settings_env_names()
    default_port = settings_from({}).port
    assert int(port_variable[1]) == default_port
    assert only(runtime, "EXPOSE").split() == [str(default_port)]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match, plus `**` for any number of folders) as a
    regex over slash-separated paths relative to the context root."""
    text, out, i = pattern.strip("/"), [], 0
    while i < len(text):
        if text.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif text.startswith("**", i):
            out.append(".*")
            i += 2
        elif text[i] in "*?":
            out.append("[^/]*" if text[i] == "*" else "[^/]")
            i += 1
        elif text[i] == "[":
            end = text.index("]", i)
            out.append(text[i : end + 1])
            i = end + 1
        else:
            out.append(re.escape(text[i]))
            i += 1
    return re.compile("".join(out))


def in_context(path: str, patterns: list[str]) -> bool:
    """Whether Docker sends `path` (relative to the context root) with these ignore patterns:
    the last pattern matching the path or one of its parent folders decides."""
    parents = [path] + ["/".join(path.split("/")[:i]) for i in range(1, path.count("/") + 1)]
    included = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _pattern_regex(pattern.removeprefix("!"))
        if any(regex.fullmatch(p) for p in parents):
            included = negate
    return included


def ignore_patterns() -> list[str]:
    """The patterns of deploy/Dockerfile.dockerignore, in order."""
    lines = DOCKERIGNORE.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def tracked_files() -> list[str]:
    """Paths of the files git tracks, relative to the repository root."""
    out = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    return out.splitlines()


def test_build_context_holds_the_packages_and_nothing_else() -> None:
    """Every file the wheel is built from (pyproject's packages, package data and readme) is
    in the context; local state and other folders are not."""
    patterns = ignore_patterns()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    needed = ["pyproject.toml", project["project"]["readme"]]
    needed += [f for f in tracked_files() if f.split("/")[0] in packages]
    assert len(needed) > 10
    assert [f for f in needed if not in_context(f, patterns)] == []
    for outside in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/conftest.py",
        "bench/latency.py",
        ".userstream/pg/PG_VERSION",
        "gateway/__pycache__/app.cpython-311.pyc",
        "deploy/Dockerfile",
    ):
        assert not in_context(outside, patterns), outside


def test_copy_sources_exist_and_are_in_the_context() -> None:
    patterns = ignore_patterns()
    builder = stages(DOCKERFILE.read_text())["builder"]
    sources = [s for kw, args in builder if kw == "COPY" for s in args.split()[:-1]]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert in_context(source.rstrip("/"), patterns), source
