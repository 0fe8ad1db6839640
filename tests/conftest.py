import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FIXTURES = ROOT.parent / "shared" / "fixtures" / "llamavid-tiny"


def fixtures_path() -> Path:
    return Path(os.environ.get("LLAMAVID_FIXTURES", DEFAULT_FIXTURES))


@pytest.fixture(scope="session")
def fixtures() -> Path:
    path = fixtures_path()
    if not (path / "MANIFEST.json").exists():
        pytest.skip(f"fixture set not found at {path} (set LLAMAVID_FIXTURES)")
    return path


def load_case(fixtures: Path, name: str):
    """(json dict, tensor dict) of one fixture case."""
    import json
    from safetensors.torch import load_file
    meta = json.loads((fixtures / "cases" / f"{name}.json").read_text())
    tensors = load_file(str(fixtures / "cases" / f"{name}.safetensors"))
    return meta, tensors


def case_names(fixtures: Path):
    import json
    return [c for c in json.loads((fixtures / "MANIFEST.json").read_text())["cases"] if c != "text"]
