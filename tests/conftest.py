import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FIXTURES = ROOT / "tests" / "fixtures" / "llamavid-tiny"  # LLAMAVID_FIXTURES overrides it


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


def cut_after_index(src, tmp_path, keep=8):
    """A copy of the mp4 src with its index (moov) first, cut `keep` bytes into the frame data (mdat): the file
    opens and lists its video stream, but its frames do not decode. Returns the path of the cut file."""
    import av
    fast, cut = tmp_path / "fast.mp4", tmp_path / "cut.mp4"
    with av.open(str(src)) as inp, av.open(str(fast), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(inp.streams.video[0]):
            if packet.size:
                packet.stream = stream
                out.mux(packet)
    data = fast.read_bytes()
    mdat = data.index(b"mdat")
    assert data.index(b"moov") < mdat
    cut.write_bytes(data[:mdat + keep])
    return cut
