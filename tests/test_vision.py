"""vision.py against the original's outputs (fixtures), timm's Eva on tiny random configs, and hand-computed
preprocessing values."""

import functools
import json
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from conftest import case_names, fixtures_path, load_case
from media import CLIP_MEAN, CLIP_STD, preprocess_frames, preprocess_images
from model import image_size_from_config
from vision import EVAViT

LONG_PREFIX = "model.vision_tower.vision_tower."


def _cases_with(key):
    """Names of the fixture cases whose tensors include `key` (read at collection time)."""
    root = fixtures_path()
    if not (root / "MANIFEST.json").exists():
        return []
    return [n for n in case_names(root) if key in json.loads((root / "cases" / f"{n}.json").read_text())["tensors"]]


def _image_size(fixtures, meta):
    return image_size_from_config(json.loads((fixtures / meta["checkpoint"] / "config.json").read_text()))


@functools.lru_cache(maxsize=None)
def _tower(path, img_size):
    return EVAViT.from_lavis(path, img_size=img_size)


def _assert_close(ours, ref, rel=1e-5):
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    scale = ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    assert diff <= rel * max(scale, 1.0), f"max abs diff {diff} > {rel} * {scale}"


# ----------------------------------------------------------------------------- preprocessing

@pytest.mark.parametrize("name", _cases_with("pixels"))
def test_preprocess_matches_original(fixtures, name):
    meta, tensors = load_case(fixtures, name)
    size = _image_size(fixtures, meta)
    if "image_size" in meta:
        assert size == meta["image_size"]
    if "image" in meta:  # images are padded to a square: image_aspect_ratio "pad" in every config
        pixels = preprocess_images([Image.open(fixtures / "cases" / meta["image"])], size, pad_to_square=True)
    else:
        pixels = preprocess_frames(tensors["frames"].numpy(), size)
    assert pixels.dtype == torch.float32
    _assert_close(pixels, tensors["pixels"])


def test_preprocess_frames_accepts_tensor_and_numpy():
    frames = np.random.default_rng(0).integers(0, 256, (3, 31, 57, 3), dtype=np.uint8)
    a = preprocess_frames(frames, 56)
    b = preprocess_frames(torch.from_numpy(frames), 56)
    assert a.shape == (3, 3, 56, 56) and torch.equal(a, b)
    with pytest.raises(ValueError, match="uint8"):
        preprocess_frames(frames.astype(np.float32), 56)


@pytest.mark.parametrize("size", [224, 336])
def test_pad_colour_and_constant_regions_by_hand(size):
    # a white 60x20 image is centred on a 60x60 canvas of int(255 * CLIP mean); far from the seam the
    # normalised values must be exactly ((c / 255) - mean) / std
    mean, std = np.array(CLIP_MEAN), np.array(CLIP_STD)
    pad_value = (np.array([122, 116, 104]) / 255 - mean) / std   # int(0.48145466*255) = 122, ...
    white = (1.0 - mean) / std
    pixels = preprocess_images([Image.new("RGB", (60, 20), (255, 255, 255))], size)[0].double()
    assert pixels.shape == (3, size, size)
    third = size // 3
    margin = int(2.5 * size / 60) + 1  # bicubic reaches 2 source pixels across the seam
    top, middle = pixels[:, : third - margin], pixels[:, third + margin: 2 * third - margin]
    assert (top - torch.tensor(pad_value)[:, None, None]).abs().max() < 1e-6
    assert (middle - torch.tensor(white)[:, None, None]).abs().max() < 1e-6
    # without padding the whole (centre-cropped) image is white
    unpadded = preprocess_images([Image.new("RGB", (60, 20), (255, 255, 255))], size, pad_to_square=False)[0]
    assert (unpadded.double() - torch.tensor(white)[:, None, None]).abs().max() < 1e-6


def test_image_size_from_config():
    assert image_size_from_config({"image_processor": "./llamavid/processor/clip-patch14-224"}) == 224
    assert image_size_from_config({"image_processor": "./llamavid/processor/clip-patch14-336/"}) == 336
    with pytest.raises(ValueError, match="image_processor"):
        image_size_from_config({"image_processor": "./model_zoo/some-processor"})


# ----------------------------------------------------------------------------- the tower vs the original

@pytest.mark.parametrize("name", _cases_with("vision_features"))
def test_tower_matches_original(fixtures, name):
    meta, tensors = load_case(fixtures, name)
    size = _image_size(fixtures, meta)
    pixels = tensors["pixels"] if "pixels" in tensors else preprocess_frames(tensors["frames"], size)
    tower = _tower(str(fixtures / "eva_vit_g.pth"), size)
    stored = torch.load(fixtures / "eva_vit_g.pth", map_location="cpu", weights_only=True)
    n_stored = len({k.split(".")[1] for k in stored if k.startswith("blocks.")})
    assert len(tower.blocks) == n_stored - 1  # the last stored block does not run
    with torch.no_grad():
        features = tower(pixels)
    _assert_close(features, tensors["vision_features"])


def _long_state_dict(fixtures):
    sd = {}
    for f in sorted((fixtures / "long").glob("pytorch_model*.bin")):
        sd.update(torch.load(f, map_location="cpu", weights_only=True))
    return sd


def test_long_checkpoint_tower_matches_extracted_features(fixtures):
    meta, tensors = load_case(fixtures, "long_movie")
    sd = _long_state_dict(fixtures)
    n_stored = len({k[len(LONG_PREFIX):].split(".")[1] for k in sd if k.startswith(LONG_PREFIX + "blocks.")})
    assert n_stored > 0
    tower = EVAViT.from_lavis(sd, img_size=_image_size(fixtures, meta))
    assert len(tower.blocks) == n_stored  # this checkpoint stores only the blocks that run
    with torch.no_grad():
        features = tower(preprocess_frames(tensors["frames"], tower.cfg.img_size))
    _assert_close(features, tensors["features"])


def test_dtype_and_device(fixtures):
    tower = EVAViT.from_lavis(fixtures / "eva_vit_g.pth", img_size=224, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in tower.parameters())
    ref = _tower(str(fixtures / "eva_vit_g.pth"), 224)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        _assert_close(tower(x).float(), ref(x), rel=5e-2)


# ----------------------------------------------------------------------------- parity with timm's Eva

def _timm_eva(img_size, depth, seed):
    from timm.models.eva import Eva
    torch.manual_seed(seed)
    # EVA-g's block: q/v bias (k bias is a zero buffer in timm), exact GELU MLP, no rope, LayerNorm eps 1e-6
    model = Eva(img_size=img_size, patch_size=14, num_classes=0, embed_dim=176, depth=depth, num_heads=2,
                qkv_bias=True, mlp_ratio=4.3637, swiglu_mlp=False, use_rot_pos_emb=False,
                norm_layer=partial(nn.LayerNorm, eps=1e-6)).eval()
    model.norm = nn.Identity()  # EVA as LAVIS runs it has no final norm: compare the blocks' output
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
        for blk in model.blocks:  # LayerNorm gains near 1, as trained ones are
            blk.norm1.weight.add_(1.0)
            blk.norm2.weight.add_(1.0)
    return model


def _as_lavis(timm_sd, extra_block_from=None):
    """timm Eva keys -> LAVIS eva_vit_g.pth keys (the same names, less timm's pooling norm/head)."""
    sd = {k: v.clone() for k, v in timm_sd.items() if not k.startswith(("fc_norm.", "head.", "norm."))}
    if extra_block_from is not None:  # a stored last block, which must not run
        i, src = extra_block_from
        sd.update({f"blocks.{i}." + k.split(".", 2)[2]: torch.randn_like(v) for k, v in src.items()
                   if k.startswith("blocks.0.")})
    return sd


def test_matches_timm_eva():
    depth, img_size = 2, 42
    ref = _timm_eva(img_size, depth, seed=0)
    timm_sd = ref.state_dict()
    assert not any(k.endswith("k_bias") for k in timm_sd)  # a zero buffer, not saved
    x = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        expected = ref.forward_features(x)
        # LAVIS layout: depth + 1 stored blocks, the last one random and unused
        ours = EVAViT.from_lavis(_as_lavis(timm_sd, (depth, timm_sd)), img_size=img_size)
        assert len(ours.blocks) == depth
        _assert_close(ours(x), expected)
        # long-checkpoint layout: exactly the running blocks, under the LLaMA-VID prefix, among other keys
        long_sd = {LONG_PREFIX + k: v for k, v in _as_lavis(timm_sd).items()}
        long_sd["model.embed_tokens.weight"] = torch.zeros(4, 4)
        _assert_close(EVAViT.from_lavis(long_sd, img_size=img_size)(x), expected)


def test_pos_embed_interpolation_matches_timm():
    # stored grid 3x3 (42 px), run at 70 px (grid 5x5): timm resamples with its own code path
    from timm.layers import resample_abs_pos_embed
    depth = 2
    small = _timm_eva(42, depth, seed=1)
    big = _timm_eva(70, depth, seed=2)
    sd = small.state_dict()
    big_sd = dict(sd)
    big_sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], [5, 5], num_prefix_tokens=1,
                                                 interpolation="bicubic", antialias=False, align_corners=False)
    big.load_state_dict(big_sd, strict=False)
    x = torch.randn(1, 3, 70, 70)
    with torch.no_grad():
        ours = EVAViT.from_lavis(_as_lavis(sd, (depth, sd)), img_size=70)
        assert ours.pos_embed.shape == (1, 26, 176)
        _assert_close(ours.pos_embed, big_sd["pos_embed"], rel=1e-6)
        _assert_close(ours(x), big.forward_features(x))


# ----------------------------------------------------------------------------- errors

def test_missing_file_names_it(tmp_path):
    missing = tmp_path / "nowhere" / "eva_vit_g.pth"
    with pytest.raises(FileNotFoundError, match="eva_vit_g.pth"):
        EVAViT.from_lavis(missing)


def test_bad_state_dicts_name_the_key(fixtures):
    good = torch.load(fixtures / "eva_vit_g.pth", map_location="cpu", weights_only=True)
    with pytest.raises(ValueError, match="pos_embed"):  # a foreign state dict
        EVAViT.from_lavis({"vision_model.embeddings.patch_embedding.weight": torch.zeros(8, 3, 14, 14)})

    bad = dict(good)
    bad["blocks.0.attn.qkv.weight"] = bad["blocks.0.attn.qkv.weight"][:-1]
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv\.weight"):
        EVAViT.from_lavis(bad)

    bad = dict(good)
    del bad["blocks.0.attn.v_bias"]
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.v_bias"):
        EVAViT.from_lavis(bad)

    bad = dict(good)
    bad["blocks.0.attn.relative_position_bias_table"] = torch.zeros(3)
    with pytest.raises(ValueError, match="relative_position_bias_table"):
        EVAViT.from_lavis(bad)

    width = good["pos_embed"].shape[-1]
    bad = dict(good)
    bad["pos_embed"] = torch.zeros(1, 11, width)  # 10 patches is not a square grid
    with pytest.raises(ValueError, match="pos_embed"):
        EVAViT.from_lavis(bad)


def test_wrong_pixel_size_is_a_clear_error(fixtures):
    tower = _tower(str(fixtures / "eva_vit_g.pth"), 224)
    with pytest.raises(ValueError, match="224"):
        tower(torch.zeros(1, 3, 336, 336))


class _RunsCode:
    """Pickles as a call of exec: loading a file holding it with plain pickle would run the code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def test_truncated_or_code_carrying_weights_are_one_line(fixtures, tmp_path):
    data = (fixtures / "eva_vit_g.pth").read_bytes()
    cut = tmp_path / "eva_vit_g.pth"
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError) as e:
        EVAViT.from_lavis(cut)
    assert str(cut) in str(e.value) and "truncated" in str(e.value) and "\n" not in str(e.value)

    marker = tmp_path / "code-ran"
    poisoned = tmp_path / "poisoned" / "eva_vit_g.pth"
    poisoned.parent.mkdir()
    for legacy in (False, True):  # the zip format torch writes today, and the older plain pickle
        sd = dict(torch.load(fixtures / "eva_vit_g.pth", weights_only=True), extra=_RunsCode(marker))
        torch.save(sd, poisoned, _use_new_zipfile_serialization=not legacy)
        with pytest.raises(ValueError) as e:
            EVAViT.from_lavis(poisoned)
        msg = str(e.value)
        assert not marker.exists()
        assert str(poisoned) in msg and "\n" not in msg
        assert "not loaded" in msg and "truncated" not in msg.replace(str(poisoned), "")
