"""What a user installs is what the code needs: every import is declared, no collective pickles
through numpy (which torch does not depend on), the deviations files ship, and README's set-up
commands are the ones CI runs."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conformance import declared as deviations

REPO = Path(__file__).resolve().parents[1]
OWN = {"reference", "conformance", "tests", "tools"} | {p.stem for p in (REPO / "tools").glob("*.py")}
# Distribution name -> the module it is imported as, where the two differ.
IMPORT_NAMES = {"pytest-xdist": "xdist"}
# Imported only inside functions, installed by hand on the GPU machine: not a PyPI extra.
OPTIONAL_BY_HAND = {"megatron": "Megatron-Bridge and megatron-core wheels (tools/run_megatron_bridge.sh)"}
OBJECT_COLLECTIVES = re.compile(r"\b(all_gather_object|gather_object|broadcast_object_list|scatter_object_list|"
                                r"send_object_list|recv_object_list)\s*\(")


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")   # Python >= 3.11
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def _module_name(requirement: str) -> str:
    distribution = re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].strip().lower()
    return IMPORT_NAMES.get(distribution, distribution.replace("-", "_"))


def _imports(path: Path):
    """(top-level module, at module level?) for every absolute import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(n) for n in ast.walk(node) if n is not node)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        else:
            continue
        for name in names:
            yield name.split(".")[0], id(node) not in in_function


def _python_files():
    for folder in ("reference", "conformance", "tools", "tests"):
        yield from sorted((REPO / folder).rglob("*.py"))


def test_every_import_is_declared():
    """Module-level imports: the standard library, the project, or a core dependency. Imports inside
    functions (optional backends, tools) may also name an extra of pyproject or a documented by-hand
    install. Nothing else: a fresh environment with the declared dependencies runs everything."""
    project = _pyproject()["project"]
    core = {_module_name(r) for r in project["dependencies"]}
    extras = {_module_name(r) for reqs in project["optional-dependencies"].values() for r in reqs}
    known = set(sys.stdlib_module_names) | OWN
    bad = []
    for path in _python_files():
        for module, top_level in _imports(path):
            allowed = known | core if top_level else known | core | extras | set(OPTIONAL_BY_HAND)
            if module not in allowed:
                where = "at module level" if top_level else "in a function"
                bad.append(f"{path.relative_to(REPO)}: {module} ({where})")
    assert not bad, "imports not declared in pyproject.toml:\n" + "\n".join(bad)


def test_no_object_collectives():
    """torch's *_object collectives pickle through numpy, which is not a dependency: the suite agrees on
    outcomes with conformance.agreement.all_gather_json instead."""
    used = [f"{p.relative_to(REPO)}:{n}" for p in _python_files() if p.parent.name != "tests"
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if OBJECT_COLLECTIVES.search(line)]
    assert not used, used


def test_deviations_files_are_package_data():
    """The shipped deviations files match pyproject's package-data pattern, so the wheel carries them."""
    patterns = _pyproject()["tool"]["setuptools"]["package-data"]["conformance"]
    files = sorted((REPO / "conformance" / "deviations").iterdir())
    assert files and all(any(f.relative_to(REPO / "conformance").match(p) for p in patterns) for f in files), \
        (patterns, files)


def test_deviations_by_shipped_name():
    """[LORA-CFG-1] `--deviations peft` is the shipped file; a path wins over a name; an unknown name is an
    error listing the shipped ones."""
    shipped = deviations.shipped()
    assert {"peft", "loralib", "megatron_bridge", "automodel"} <= set(shipped)
    assert deviations.resolve("peft") == shipped["peft"]
    assert deviations.resolve(str(shipped["peft"])) == shipped["peft"]
    assert deviations.load("megatron_bridge") == deviations.load(str(shipped["megatron_bridge"]))
    with pytest.raises(deviations.DeviationError, match="shipped: automodel, loralib, megatron_bridge, peft"):
        deviations.resolve("lora_lib")


def _readme_command(number: int, readme: Path = REPO / "README.md") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "readme_commands.py"), str(number), "--readme",
                           str(readme)], capture_output=True, text=True, timeout=60)


def test_readme_setup_commands_are_the_two_ci_runs(tmp_path):
    """README's set-up section holds exactly two one-line commands, the ones .ci/run takes from it;
    they install the pinned CPU torch and start torchrun so that two runs cannot collide. A README
    whose set-up section lost a block makes the tool (and so CI) fail."""
    suite, tests = (_readme_command(n).stdout.strip() for n in (1, 2))
    assert suite.startswith("pip install torch==2.13.0 -e . && ") and "torchrun --standalone" in suite
    assert tests == 'pip install torch==2.13.0 -e ".[test]" && python -m pytest tests'
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert "tools/readme_commands.py" in ci and "readme_command 1" in ci and "readme_command 2" in ci
    broken = tmp_path / "README.md"
    broken.write_text("intro\n## Set-up: two commands\n\n```bash\npip install x\n```\n## Next\n")
    done = _readme_command(1, broken)
    assert done.returncode == 1 and "2 ```bash blocks, found 1" in done.stderr, done.stderr
