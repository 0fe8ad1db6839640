"""The fixture set written by the original code ships inside the repository, so a fresh clone runs the parity
tests with nothing beside it (LLAMAVID_FIXTURES may point elsewhere)."""
import json

from conftest import DEFAULT_FIXTURES


def test_fixture_set_is_in_the_repository():
    manifest = json.loads((DEFAULT_FIXTURES / "MANIFEST.json").read_text())
    assert (DEFAULT_FIXTURES / "README.md").is_file()
    for name in manifest["checkpoints"]:
        ckpt = DEFAULT_FIXTURES / name
        index = json.loads((ckpt / "pytorch_model.bin.index.json").read_text())
        for shard in set(index["weight_map"].values()):
            assert (ckpt / shard).is_file(), f"{name}/{shard} is missing"
    for case in manifest["cases"]:
        assert (DEFAULT_FIXTURES / "cases" / f"{case}.json").is_file()
    for f in ("tokenizer.model", "eva_vit_g.pth", "bert-base-uncased/vocab.txt"):
        assert (DEFAULT_FIXTURES / f).is_file()
