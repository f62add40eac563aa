"""Fixtures for the deployment tests: helm and kustomize built by
scripts/install-go-tools.sh (or given as HL_HELM / HL_KUSTOMIZE)."""
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _tool(name: str, env: str) -> str:
    path = os.environ.get(env)
    if path:
        return path
    out = subprocess.run(["bash", str(ROOT / "scripts/install-go-tools.sh"), name], check=True,
                         capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def helm() -> str:
    return _tool("helm", "HL_HELM")


@pytest.fixture(scope="session")
def kustomize() -> str:
    return _tool("kustomize", "HL_KUSTOMIZE")
