"""The package as a user who never clones gets it: a wheel built from the project, installed into a
fresh virtual environment with its declared dependencies only, run from a folder outside the
repository (so nothing of the checkout is importable).

The fresh environment pins torch to the version running these tests: an unpinned `torch` would pull
a multi-GB CUDA build. Everything else comes from the wheel's own metadata.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SETUP_TIMEOUT_S = 900
RUN_TIMEOUT_S = 600
CLEAN_ENV_DROP = ("PYTHONPATH", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                  "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")


class FreshInstall:
    """A venv holding the wheel, and a working folder outside the repository."""

    def __init__(self, root: Path):
        self.root = root
        self.outside = root / "elsewhere"
        self.outside.mkdir()
        self.bin = root / "venv" / "bin"
        self.env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV_DROP}
        self.env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PIP_DISABLE_PIP_VERSION_CHECK="1")

    def run(self, *args, timeout=RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
        return subprocess.run([str(a) for a in args], cwd=self.outside, env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def pip_install(self, *requirements) -> None:
        done = self.run(self.bin / "python", "-m", "pip", "install", "-q", "--no-compile", *requirements,
                        timeout=SETUP_TIMEOUT_S)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _build_wheel(dest: Path) -> Path:
    """The wheel of a copy of the project's sources (the checkout itself is left untouched)."""
    source = dest / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", ".whl", ".gl"))
    isolation = ["--no-build-isolation"] if _has_setuptools_with_wheels() else []
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(dest),
                           str(source)], capture_output=True, text=True, timeout=SETUP_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = dest.glob("tp_lora_reference-*.whl")
    return wheel


def _has_setuptools_with_wheels() -> bool:
    """setuptools >= 70.1 builds wheels without the `wheel` package: then no build environment is needed."""
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        return False
    return tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) >= (70, 1)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> FreshInstall:
    root = tmp_path_factory.mktemp("wheel")
    wheel = _build_wheel(root)
    venv.create(root / "venv", with_pip=True)
    fresh = FreshInstall(root)
    fresh.pip_install(f"torch=={torch.__version__.split('+')[0]}", str(wheel))
    fresh.wheel = wheel
    return fresh


def test_the_wheel_ships_the_deviations_files(installed):
    """[LORA-CFG-1] `--list-deviations` names every deviations file of the repository, read from the
    installed package, not from the checkout."""
    done = installed.run(installed.bin / "python", "-m", "conformance", "--list-deviations")
    assert done.returncode == 0, done.stderr[-3000:]
    listed = {line.split()[0]: line.split()[-1] for line in done.stdout.splitlines() if line.strip()}
    expected = {f.stem for f in (REPO / "conformance" / "deviations").glob("*.txt")}
    assert set(listed) == expected and expected >= {"peft", "megatron_bridge"}
    for path in listed.values():
        assert str(installed.root / "venv") in path and str(REPO) not in path, path


def test_the_installed_suite_passes_on_the_reference(installed):
    """[LORA-FWD-1] torchrun at world 2, from outside the repository, on the installed wheel."""
    done = installed.run(installed.bin / "torchrun", "--standalone", "--nproc-per-node", "2", "-m", "conformance",
                         "--profile", "quick")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Clauses:" in done.stdout and "failed" not in done.stdout.split("Clauses:")[-1]
    where = installed.run(installed.bin / "python", "-c", "import conformance, reference; "
                          "print(conformance.__file__); print(reference.__file__)")
    assert all(str(installed.root / "venv") in line for line in where.stdout.split()), where.stdout


@pytest.mark.peft
def test_the_installed_suite_passes_peft_with_its_shipped_deviations(installed):
    """[LORA-MATCH-3] the PEFT backend, installed through the `peft` extra, passes with `--deviations peft`
    (a shipped name, no path) and --strict-deviations."""
    pytest.importorskip("peft")
    installed.pip_install(f"torch=={torch.__version__.split('+')[0]}", f"{installed.wheel}[peft]")
    done = installed.run(installed.bin / "python", "-m", "conformance", "--backend",
                         "conformance.backends.peft:PeftBackend", "--deviations", "peft", "--strict-deviations",
                         "--profile", "quick")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "xfailed" in done.stdout
