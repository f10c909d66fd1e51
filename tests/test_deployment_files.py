"""docker-compose.yml and .env.example: valid Compose, and in step with the settings the code reads.

The compose file is checked against the Compose Specification's JSON schema as vendored by
check-jsonschema (no network at test time). scripts/container-smoke.sh runs the image with
what these files declare; these tests catch drift without podman.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from buffer_service.config import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
_ASSIGNMENT = re.compile(r"^(?:# )?([A-Z][A-Z0-9_]*)=(.*)$")


def _validate(path: Path) -> subprocess.CompletedProcess[str]:
    cli = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent))
    assert cli, "check-jsonschema is missing: `make install` installs the test extras"
    return subprocess.run([cli, "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=60)


def _example_assignments() -> dict[str, str]:
    """NAME=value lines of .env.example, set or commented out (`# NAME=default`)."""
    found: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        match = _ASSIGNMENT.match(line)
        if match:
            found[match.group(1)] = match.group(2)
    return found


def _names_settings_read() -> list[str]:
    class Recording(dict[str, str]):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def get(self, key: str, default: object = None) -> object:  # type: ignore[override]
            self.names.append(key)
            return super().get(key, default)

    env = Recording()
    Settings.from_env(env)
    # If Settings ever stops reading through .get(), say so instead of checking nothing.
    assert {"REDIS_URL", "OPENAI_API_KEY", "MESSAGE_BUFFER_DURATION_MS"} <= set(env.names), env.names
    return env.names


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    result = _validate(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_validator_rejects_a_misspelt_key(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text(encoding="utf-8").replace("    healthcheck:", "    healthchek:", 1))
    result = _validate(broken)
    assert result.returncode != 0 and "healthchek" in result.stdout


def test_env_example_documents_every_setting_the_service_reads() -> None:
    documented = _example_assignments()
    missing = [name for name in _names_settings_read() if name not in documented]
    assert not missing, f".env.example lacks {missing}"


def test_env_example_documents_every_variable_the_compose_file_uses() -> None:
    used = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", COMPOSE.read_text(encoding="utf-8")))
    missing = sorted(used - _example_assignments().keys())
    assert not missing, f".env.example lacks {missing}"


def test_every_line_of_env_example_is_explained_by_a_comment_above_it() -> None:
    lines = ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if _ASSIGNMENT.match(line):
            above = lines[i - 1] if i else ""
            assert above.startswith("#"), f".env.example:{i + 1}: {line!r} has no comment above it"


def test_the_defaults_env_example_shows_are_the_code_defaults() -> None:
    read = set(_names_settings_read())
    shown = {name: value for name, value in _example_assignments().items() if name in read and value}
    assert Settings.from_env(shown) == Settings.from_env({})


def test_compose_services_run_the_image_with_settings_the_service_accepts() -> None:
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    read = set(_names_settings_read())
    for name in ("buffer-service", "worker"):
        service = compose["services"][name]
        assert service["env_file"] == ".env"
        assert service["image"].startswith("buffer-service:") and service["build"]["context"] == "."
        unknown = set(service["environment"]) - read
        assert not unknown, f"{name} sets {unknown}, which the service does not read"
    assert compose["services"]["worker"]["profiles"] == ["workers"]
    assert compose["services"]["worker"]["command"] == ["worker"]


def test_env_example_values_survive_env_file_parsing() -> None:
    # Docker and podman take everything after '=' literally: a quote or a trailing comment would
    # end up in the value.
    for name, value in _example_assignments().items():
        assert not value.startswith(("'", '"')) and "#" not in value, f"{name}={value}"
