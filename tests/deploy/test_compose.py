"""deploy/compose.yaml, deploy/.env.example and deploy/nginx.conf against the project itself.

No Docker engine is needed: the file is interpolated with the values of `.env.example` as
Compose would (Compose spec "Interpolation"), validated against the Compose JSON schema that
check-jsonschema ships (`vendor.compose-spec`), and its commands, settings, dependencies and
stop timing are checked against the code: the `userstream` CLI parser, `Settings`, and
`server_shutdown_timeout_s`.
"""

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from check_jsonschema.builtin_schemas import get_builtin_schema

from gateway.shutdown import server_shutdown_timeout_s
from tests.deploy.nginx_conf import Block, parse
from tests.deploy.sources import (
    DEPLOY,
    duration_s,
    parse_cli,
    read_env_file,
    served_paths,
    settings_env_names,
    settings_from,
)

COMPOSE = DEPLOY / "compose.yaml"
ENV_EXAMPLE = DEPLOY / ".env.example"
NGINX = DEPLOY / "nginx.conf"
STREAM_PATH = "/me/stream"

_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_]\w*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_]\w*))"
)

Service = dict[str, Any]


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """`text` with `$$`, `$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?err}`,
    `${VAR?err}`, `${VAR:+alt}` and `${VAR+alt}` replaced as Compose does. Raises KeyError for
    a variable that is unset (or empty, with `:?`) where `?` requires it."""

    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["bare"]
        op, arg = match["op"] or "", match["arg"] or ""
        value = env.get(name)
        present = value is not None and (value != "" or not op.startswith(":"))
        if op.endswith("-"):
            return value if present and value is not None else arg
        if op.endswith("?"):
            if not present or value is None:
                raise KeyError(f"{name}: {arg}")
            return value
        if op.endswith("+"):
            return arg if present else ""
        return value or ""

    return _VARIABLE.sub(replace, text)


def variables_used(text: str) -> set[str]:
    """Names of the variables `text` interpolates (`$$` is a literal dollar, not one)."""
    return {m["braced"] or m["bare"] for m in _VARIABLE.finditer(text) if not m["escaped"]}


def interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    """Every string value of a loaded YAML tree interpolated (keys are left alone)."""
    if isinstance(node, dict):
        return {key: interpolate_tree(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate_tree(item, env) for item in node]
    return interpolate(node, env) if isinstance(node, str) else node


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    """deploy/.env.example as Compose reads it."""
    return read_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def compose(env_example: dict[str, str]) -> dict[str, Any]:
    """The Compose file as Compose sees it with `--env-file deploy/.env.example`."""
    return dict(interpolate_tree(yaml.safe_load(COMPOSE.read_text()), env_example))


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Service]:
    """The interpolated services, by name."""
    return dict(compose["services"])


def ours(services: Mapping[str, Service]) -> dict[str, Service]:
    """The services that run the userstream image (built from deploy/Dockerfile)."""
    return {
        name: svc
        for name, svc in services.items()
        if svc.get("build", {}).get("dockerfile") == "deploy/Dockerfile"
    }


def role(service: Service) -> str:
    """The `userstream` sub-command a service of our image runs."""
    return parse_cli(list(service["command"]))


def environment_of(service: Service) -> dict[str, str]:
    """A service's `environment` mapping, values as the strings the container receives."""
    env = service.get("environment", {})
    assert isinstance(env, dict), "write environment as a mapping"
    return {key: "" if value is None else str(value) for key, value in env.items()}


def test_compose_file_is_valid_for_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = get_builtin_schema("vendor.compose-spec")
    jsonschema.Draft202012Validator(schema).validate(compose)


def test_every_variable_the_compose_file_uses_has_a_value_in_env_example(
    env_example: dict[str, str],
) -> None:
    used = variables_used(COMPOSE.read_text())
    assert used, "the compose file is expected to take its secrets from the .env file"
    missing = sorted(name for name in used if not env_example.get(name))
    assert not missing, f"not set in .env.example: {missing}"
    unused = sorted(set(env_example) - used)
    assert not unused, f"set in .env.example but never used by compose.yaml: {unused}"


def test_env_example_names_of_the_userstream_prefix_are_real_settings(
    env_example: dict[str, str],
) -> None:
    unknown = sorted(
        name
        for name in env_example
        if name.startswith("USERSTREAM_") and name not in settings_env_names()
    )
    assert not unknown, f"no such setting in gateway.settings.Settings: {unknown}"


def test_services_of_the_image_run_commands_the_cli_accepts(services: dict[str, Service]) -> None:
    image_services = ours(services)
    roles = {name: role(svc) for name, svc in image_services.items()}
    assert sorted(roles.values()) == ["migrate", "relay", "serve", "serve"], roles
    for name, svc in image_services.items():
        assert "entrypoint" not in svc, f"{name}: the image's ENTRYPOINT is `userstream`"


def test_services_of_the_image_get_only_real_settings_with_valid_values(
    services: dict[str, Service],
) -> None:
    for name, svc in ours(services).items():
        env = environment_of(svc)
        unknown = sorted(set(env) - settings_env_names())
        assert not unknown, f"{name}: not settings: {unknown}"
        settings = settings_from(env)  # raises on a value the settings refuse
        assert settings.database_url and settings.redis_url, name
        assert settings.jwt_secret is not None and settings.admin_token is not None, name


def test_relay_runs_two_replicas(services: dict[str, Service]) -> None:
    relays = [svc for svc in ours(services).values() if role(svc) == "relay"]
    assert [svc["deploy"]["replicas"] for svc in relays] == [2]


def test_gateways_stop_grace_period_exceeds_their_shutdown_timeout(
    services: dict[str, Service],
) -> None:
    """SIGKILL must not come before the gateway has drained its streams and exited
    (gateway/shutdown.py: `server_shutdown_timeout_s` after SIGTERM)."""
    gateways = {n: s for n, s in ours(services).items() if role(s) == "serve"}
    assert len(gateways) == 2
    for name, svc in gateways.items():
        settings = settings_from(environment_of(svc))
        needed_s = server_shutdown_timeout_s(settings)
        assert duration_s(svc["stop_grace_period"]) > needed_s, (name, needed_s)


def _has_healthcheck(service: Service) -> bool:
    check = service.get("healthcheck", {})
    if check.get("disable"):
        return False
    # The image's HEALTHCHECK (deploy/Dockerfile) probes /healthz of a `serve` process only.
    return bool(check.get("test")) or ("build" in service and role(service) == "serve")


def test_depends_on_targets_exist_and_their_conditions_can_be_met(
    services: dict[str, Service],
) -> None:
    for name, svc in services.items():
        for target, spec in svc.get("depends_on", {}).items():
            assert target in services, f"{name} depends on unknown {target}"
            condition = spec["condition"]
            if condition == "service_healthy":
                assert _has_healthcheck(services[target]), f"{name}: {target} has no check"
            elif condition == "service_completed_successfully":
                assert services[target].get("restart", "no") == "no", (
                    f"{name} waits for {target} to exit, but it is restarted"
                )
            else:
                assert condition == "service_started", (name, target, condition)


def test_depends_on_has_no_cycle(services: dict[str, Service]) -> None:
    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"dependency cycle: {' -> '.join((*path, name))}"
        for target in services[name].get("depends_on", {}):
            visit(target, (*path, name))

    for name in services:
        visit(name, ())


def test_each_role_waits_for_what_it_needs(services: dict[str, Service]) -> None:
    image_services = ours(services)
    migrate = [n for n, s in image_services.items() if role(s) == "migrate"]
    assert len(migrate) == 1
    postgres = {"postgres": "service_healthy"}
    needs = {
        "migrate": postgres,
        "relay": {**postgres, "redis": "service_healthy"},
        "serve": {**postgres, "redis": "service_healthy"},
    }
    needs["relay"][migrate[0]] = needs["serve"][migrate[0]] = "service_completed_successfully"
    for name, svc in image_services.items():
        conditions = {t: spec["condition"] for t, spec in svc.get("depends_on", {}).items()}
        assert conditions == needs[role(svc)], name


@pytest.fixture(scope="module")
def nginx() -> Block:
    """deploy/nginx.conf, parsed."""
    return parse(NGINX.read_text())


def test_nginx_proxies_to_exactly_the_compose_gateways(
    nginx: Block, services: dict[str, Service]
) -> None:
    gateways = {n: s for n, s in ours(services).items() if role(s) == "serve"}
    ports = {settings_from(environment_of(s)).port for s in gateways.values()}
    (upstream,) = nginx.find("upstream")
    servers = {args[0] for args in upstream.own("server")}
    assert servers == {f"{name}:{port}" for name in gateways for port in ports}
    proxy = [svc for svc in services.values() if str(svc.get("image", "")).startswith("nginx")]
    assert len(proxy) == 1
    assert set(proxy[0]["depends_on"]) == set(gateways)


def test_nginx_stream_location_is_configured_for_sse(
    nginx: Block, env_example: dict[str, str]
) -> None:
    """nginx buffers proxied responses and closes reads idle for 60 s by default; an SSE stream
    needs neither (FIELD-NOTES §6 "Proxies/CDNs"; nginx ngx_http_proxy_module)."""
    assert STREAM_PATH in served_paths()
    (location,) = nginx.find("location", "=", STREAM_PATH)
    (upstream,) = nginx.find("upstream")
    assert location.effective("proxy_pass") == [(f"http://{upstream.args[0]}",)]
    assert location.effective("proxy_buffering") == [("off",)]
    assert location.effective("proxy_cache") == [("off",)]
    assert location.effective("proxy_http_version") == [("1.1",)]
    assert ("Connection", "") in location.effective("proxy_set_header")
    assert location.effective("gzip") == [("off",)]
    keepalive_s = settings_from(env_example).keepalive_s
    (read_timeout,) = location.effective("proxy_read_timeout")
    assert duration_s(read_timeout[0]) >= 10 * keepalive_s
    assert upstream.own("least_conn") == [()]
    assert upstream.own("keepalive"), "keep upstream connections alive"


def test_nginx_logs_leave_out_the_stream_query_string(nginx: Block) -> None:
    """`access_token` may be sent as a query parameter (PROTOCOL.md §3): the access log format
    leaves the query string out, and since nginx's error lines quote the whole request line,
    the stream location logs only critical errors."""
    (http,) = nginx.find("http")
    formats = {args[0]: " ".join(args[1:]) for args in http.own("log_format")}
    for args in http.effective("access_log"):
        assert len(args) > 1 and args[1] in formats, "use a log_format of this file"
        assert not re.search(r"\$(request\b|request_uri|args|query_string|arg_)", formats[args[1]])
    (location,) = nginx.find("location", "=", STREAM_PATH)
    levels = [args[-1] for args in location.effective("error_log")]
    assert levels and set(levels) <= {"crit", "alert", "emerg"}, levels


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a ${X} $X $$X", "a 1 1 $X"),
        ("${UNSET:-d} ${EMPTY:-d} ${EMPTY-d}", "d d "),
        ("${X:+alt} ${UNSET:+alt}", "alt "),
    ],
)
def test_interpolation_follows_compose(text: str, expected: str) -> None:
    assert interpolate(text, {"X": "1", "EMPTY": ""}) == expected


def test_interpolation_refuses_a_missing_required_variable() -> None:
    with pytest.raises(KeyError, match="SECRET: set it"):
        interpolate("${SECRET:?set it}", {"SECRET": ""})


def test_env_file_reader_refuses_a_line_that_is_not_an_assignment(tmp_path: Path) -> None:
    bad = tmp_path / ".env"
    bad.write_text("A=1\nexport B=2\n")
    with pytest.raises(ValueError, match=r"\.env:2: not a KEY=value line"):
        read_env_file(bad)
