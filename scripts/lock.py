"""The lock of tested versions: `requirements.lock`, made from pyproject.toml by `uv pip compile --universal`.

    python scripts/lock.py            # bring requirements.lock in line with pyproject.toml, keeping current pins
                                      # where they still fit (needs the package index; uv comes with [dev])
    python scripts/lock.py --upgrade  # the newest versions pyproject.toml admits, for every package
    python scripts/lock.py --check    # offline: does the lock agree with pyproject.toml? (tests/unit/test_lock.py)

Why this shape: the lock is pip-tools' compiled-requirements format, so plain pip installs from it as constraints
(`pip install -c requirements.lock -e ".[dev]"`) and still takes the CPU build of torch a machine has at hand, which
uv's own installer would not. uv makes it because its resolution is universal: one file with environment markers for
every platform and Python version the project supports (3.10 and up), where pip-compile would pin this machine's only.

torch is pinned to the version CI tests (TESTED_TORCH). Its CUDA runtime packages (nvidia-*, cuda-*, triton) are
left out: each torch wheel pins its own exactly, so a CUDA build from PyTorch's index (cu126, cu128, ...) of the same
torch version installs with the lock, and a CPU build needs none of them.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest brings tomli
    import tomli as tomllib  # type: ignore[no-redef]
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = REPO / "pyproject.toml"
LOCK = REPO / "requirements.lock"
REFRESH_COMMAND = "python scripts/lock.py"
TESTED_TORCH = "2.13.0"  # what `.ci/run` and the README install first on CPU machines
OLDEST_PYTHON = "3.10"  # requires-python's lower bound: the universal lock covers it and every newer Python
TORCH_PINNED = re.compile(r"^(nvidia-.*|cuda-.*|triton)$")  # torch's own exact pins, per CUDA build


@dataclass
class Pin:
    name: str
    version: Version
    marker: str | None
    via: set[str] = field(default_factory=set)


def read_lock(text: str) -> list[Pin]:
    """The pins of a uv/pip-tools compiled file, with the `# via` names each one is annotated with."""
    pins: list[Pin] = []
    in_via = False
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line.startswith((" ", "#")):
            req = Requirement(line.split(" #", 1)[0].strip())
            (spec,) = req.specifier  # always exactly `==version`
            marker = str(req.marker) if req.marker else None
            pins.append(Pin(canonicalize_name(req.name), Version(spec.version), marker))
            in_via = False
            continue
        comment = line.strip().lstrip("#").strip()
        if not pins or not comment:
            continue
        if comment.startswith("via"):
            rest = comment[3:].strip()
            in_via = not rest
            if rest:
                pins[-1].via.add(rest)
        elif in_via:
            pins[-1].via.add(comment)
    return pins


def project_requirements(pyproject: dict) -> list[Requirement]:
    """Every requirement of the project, its extras' included."""
    project = pyproject["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project.get("optional-dependencies", {}).values():
        reqs += [Requirement(r) for r in extra]
    return reqs


def disagreements(pyproject: dict, lock_text: str) -> list[str]:
    """How the lock and pyproject.toml disagree; empty when the lock is current."""
    pins = read_lock(lock_text)
    by_name: dict[str, list[Pin]] = {}
    for pin in pins:
        by_name.setdefault(pin.name, []).append(pin)
    problems: list[str] = []
    wanted: set[str] = set()
    for req in project_requirements(pyproject):
        name = canonicalize_name(req.name)
        wanted.add(name)
        if name not in by_name:
            problems.append(f"{req} is in pyproject.toml but not in the lock")
            continue
        for pin in by_name[name]:
            if pin.version not in req.specifier:
                problems.append(f"the lock pins {name}=={pin.version}, outside pyproject.toml's {req}")
    project_name = canonicalize_name(pyproject["project"]["name"])
    direct = {pin.name for pin in pins if any(canonicalize_name(v.split(" ")[0]) == project_name for v in pin.via)}
    for name in sorted(direct - wanted):
        problems.append(f"the lock has {name} as a direct dependency, and pyproject.toml no longer asks for it")
    torch = [str(p.version) for p in by_name.get("torch", [])]
    if torch != [TESTED_TORCH]:
        problems.append(f"the lock must pin torch=={TESTED_TORCH} (the tested build), not {torch}")
    for name in sorted(n for n in by_name if TORCH_PINNED.match(n)):
        problems.append(f"{name} is pinned by torch itself and must stay out of the lock")
    if problems:
        problems.append(f"refresh the lock with `{REFRESH_COMMAND}`")
    return problems


def compile_lock(output: Path, no_emit: list[str], upgrade: bool) -> None:
    """uv pip compile into `output`; without `upgrade`, uv keeps the pins `output` already holds where they fit."""
    with tempfile.TemporaryDirectory() as tmp:
        torch_pin = Path(tmp) / "torch.txt"
        torch_pin.write_text(f"torch=={TESTED_TORCH}\n")
        command = [
            sys.executable, "-m", "uv", "pip", "compile", str(PYPROJECT.relative_to(REPO)),
            "--universal", "--python-version", OLDEST_PYTHON, "--all-extras",
            "--constraint", str(torch_pin), "--output-file", str(output),
            "--custom-compile-command", REFRESH_COMMAND, "--quiet",
        ]  # fmt: skip
        if upgrade:
            command.append("--upgrade")
        for name in no_emit:
            command += ["--no-emit-package", name]
        subprocess.run(command, cwd=REPO, check=True)
    # The constraint file's temporary path would change the lock at every refresh: name what it pins instead.
    text = re.sub(r"-c \S+/torch\.txt", f"-c torch=={TESTED_TORCH} (scripts/lock.py)", output.read_text())
    output.write_text(text)


def refresh(upgrade: bool) -> None:
    """Two passes: the first finds torch's CUDA packages, the second leaves them out."""
    with tempfile.TemporaryDirectory() as tmp:
        first = Path(tmp) / "first.lock"
        if LOCK.exists():
            first.write_text(LOCK.read_text())  # the current pins, as preferences
        compile_lock(first, [], upgrade)
        torch_pinned = sorted({p.name for p in read_lock(first.read_text()) if TORCH_PINNED.match(p.name)})
    compile_lock(LOCK, torch_pinned, upgrade)
    print(f"wrote {LOCK.relative_to(REPO)}: {len(read_lock(LOCK.read_text()))} pins; now run the whole test suite")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that the lock agrees with pyproject.toml")
    parser.add_argument("--upgrade", action="store_true", help="newest versions of everything, not only what changed")
    args = parser.parse_args()
    if not args.check:
        refresh(args.upgrade)
    problems = disagreements(tomllib.loads(PYPROJECT.read_text()), LOCK.read_text())
    for problem in problems:
        print(f"lock: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
