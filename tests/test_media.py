"""Media loading: images, frame sampling of constant- and variable-rate videos, rotation, odd sizes, the error
cases, .srt parsing and the long-video prompt of the fixtures."""

import hashlib
import json
import warnings
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from conftest import cut_after_index

import media
from data import build_prompt
from media import (content_hash, iter_video, load_image, load_subtitles, load_video, movie_message, movie_prompt,
                   movie_video_input, write_video)


# Frame i of a test clip is one solid colour that encodes i, so a decoded frame tells which one it was even
# after lossy coding (steps of 32 per channel; compression moves a flat frame by a few levels).
def colour(i):
    return np.array([(i % 8) * 32 + 16, (i // 8) * 32 + 16, 128], np.uint8)


def clip(n, height=32, width=48):
    return np.stack([np.broadcast_to(colour(i), (height, width, 3)) for i in range(n)])


def which(frames):
    mean = frames.reshape(len(frames), -1, 3).mean(1)
    return [int(round((r - 16) / 32)) + 8 * int(round((g - 16) / 32)) for r, g, _ in mean]


def first_at_or_after(times, fps):
    """Hand-written reference of the sampling rule: for each k / fps, the first frame at or after it; a frame
    that is first for several targets is kept once."""
    picked = []
    for k in range(int(max(times) * fps) + 1):
        i = next((i for i, t in enumerate(times) if t >= k / fps), None)
        if i is not None and i not in picked:
            picked.append(i)
    return picked


# ---------------------------------------------------------------------------------------------------- images

def test_load_image_gives_rgb(tmp_path):
    grey = np.arange(12 * 7, dtype=np.uint8).reshape(7, 12)
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    rgba = np.zeros((5, 6, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")

    image = load_image(tmp_path / "grey.png")
    assert image.mode == "RGB" and image.size == (12, 7)
    assert (np.asarray(image) == grey[..., None]).all()
    assert (np.asarray(load_image(str(tmp_path / "rgba.png"))) == [200, 0, 0]).all()


def test_load_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        load_image(tmp_path / "nope.jpg")
    (tmp_path / "text.jpg").write_text("not pixels\n")
    with pytest.raises(ValueError, match="text.jpg is not an image Pillow can read"):
        load_image(tmp_path / "text.jpg")


# ---------------------------------------------------------------------------------------------------- sampling

def test_one_fps_matches_the_original_on_constant_rate(tmp_path):
    # 10 fps, 3.5 s. The original (decord) keeps indices range(0, n, round(10 / fps)) at times index / 10.
    n, rate = 35, 10
    write_video(tmp_path / "cfr.mp4", clip(n), rate)
    for fps in (1, 2, 0.5):
        frames, times = load_video(tmp_path / "cfr.mp4", fps=fps)
        expected = list(range(0, n, round(rate / fps)))
        assert which(frames) == expected
        assert times == pytest.approx([i / rate for i in expected])
        assert frames.dtype == np.uint8 and frames.shape == (len(expected), 32, 48, 3)
    frames, times = load_video(tmp_path / "cfr.mp4")  # default: 1 fps
    assert which(frames) == [0, 10, 20, 30] and times == pytest.approx([0, 1, 2, 3])


def test_sampling_follows_the_clock_when_rates_do_not_divide(tmp_path):
    # 15 fps at fps=2: the original's step round(7.5) = 8 would drift to 1.875 frames/s; we keep the first frame
    # at or after every half second.
    n, rate = 40, 15
    write_video(tmp_path / "15.mp4", clip(n), rate)
    frames, times = load_video(tmp_path / "15.mp4", fps=2)
    expected = first_at_or_after([i / rate for i in range(n)], 2)
    assert expected[:4] == [0, 8, 15, 23]
    assert which(frames) == expected
    assert times == pytest.approx([i / rate for i in expected])


def test_variable_frame_rate_is_sampled_by_real_time(tmp_path):
    times = [0.0, 0.1, 0.25, 1.3, 1.35, 2.9, 3.0, 4.6, 4.65, 6.2]
    write_video(tmp_path / "vfr.mp4", clip(len(times)), 2, times=times)
    frames, got = load_video(tmp_path / "vfr.mp4", fps=1)
    # slots [0,1) [1,2) [2,3) [3,4) [4,5) [5,6) [6,7): the first frame in each, the empty [5,6) skipped
    assert which(frames) == [0, 3, 5, 6, 7, 9] == first_at_or_after(times, 1)
    assert got == pytest.approx([times[i] for i in (0, 3, 5, 6, 7, 9)])
    # the original's index rule (decord: every round(average fps / fps)-th frame) picks other frames here
    with av.open(str(tmp_path / "vfr.mp4")) as container:
        step = round(float(container.streams.video[0].average_rate))
    assert list(range(0, len(times), step)) != [0, 3, 5, 6, 7, 9]
    frames, got = load_video(tmp_path / "vfr.mp4", fps=None)
    assert which(frames) == list(range(len(times))) and got == pytest.approx(times)


def test_variable_frame_rate_in_matroska(tmp_path):
    times = [0.0, 0.4, 0.45, 2.2, 2.5, 2.6, 3.95]
    write_video(tmp_path / "vfr.mkv", clip(len(times)), 5, times=times)
    frames, got = load_video(tmp_path / "vfr.mkv", fps=2)
    expected = first_at_or_after(times, 2)
    assert which(frames) == expected and got == pytest.approx([times[i] for i in expected])


def test_max_frames_spreads_evenly(tmp_path):
    n, rate = 35, 10
    write_video(tmp_path / "cfr.mp4", clip(n), rate)
    frames, times = load_video(tmp_path / "cfr.mp4", fps=2, max_frames=4)
    sampled = list(range(0, n, 5))  # fps=2 keeps every 5th frame: 7 of them
    expected = [sampled[i] for i in np.linspace(0, len(sampled) - 1, 4).astype(int)]
    assert which(frames) == expected == [0, 10, 20, 30]
    assert times == pytest.approx([i / rate for i in expected])

    frames, _ = load_video(tmp_path / "cfr.mp4", fps=None, max_frames=5)
    assert which(frames) == [0, 8, 17, 25, 34]  # linspace(0, 34, 5) -> 0, 8.5, 17, 25.5, 34, truncated
    frames, _ = load_video(tmp_path / "cfr.mp4", fps=1, max_frames=100)  # a cap above the count changes nothing
    assert which(frames) == [0, 10, 20, 30]
    assert len(load_video(tmp_path / "cfr.mp4", fps=1, max_frames=1)[0]) == 1


def test_iter_video_streams_the_same_frames(tmp_path, monkeypatch):
    write_video(tmp_path / "cfr.mp4", clip(23), 10)
    converted = []  # only the kept frames are converted to RGB arrays
    monkeypatch.setattr(media, "_upright", lambda frame, f=media._upright: converted.append(frame.pts) or f(frame))
    assert len(load_video(tmp_path / "cfr.mp4", fps=1)[0]) == len(converted) == 3
    monkeypatch.undo()
    pairs = list(iter_video(tmp_path / "cfr.mp4", fps=1))
    frames, times = load_video(tmp_path / "cfr.mp4", fps=1)
    assert [t for _, t in pairs] == times
    assert all((f == g).all() for (f, _), g in zip(pairs, frames))


# ---------------------------------------------------------------------------------------------------- geometry

def quadrants(height, width):
    """Four distinct colours in the four quadrants: any wrong turn or mirror moves them."""
    image = np.zeros((height, width, 3), np.uint8)
    h, w = height // 2, width // 2
    image[:h, :w], image[:h, w:] = (250, 250, 250), (230, 30, 30)
    image[h:, :w], image[h:, w:] = (30, 30, 230), (30, 200, 30)
    return image


@pytest.mark.parametrize("rotation,hflip", [(90, False), (-90, False), (180, False), (90, True), (0, True)])
def test_rotation_metadata_is_applied(tmp_path, rotation, hflip):
    stored = quadrants(32, 64)  # landscape pixels, as a phone sensor stores them
    write_video(tmp_path / "rot.mp4", np.stack([stored] * 3), 5, rotation=rotation, hflip=hflip)
    with av.open(str(tmp_path / "rot.mp4")) as container:  # the file really carries a display matrix
        assert "DISPLAYMATRIX" in [d.type.name for d in next(container.decode(video=0)).side_data]
    frames, _ = load_video(tmp_path / "rot.mp4")
    # display = the stored pixels turned `rotation` degrees counter-clockwise (np.rot90), then mirrored
    expected = np.rot90(stored, rotation // 90)
    expected = expected[:, ::-1] if hflip else expected
    assert frames.shape[1:] == expected.shape
    assert np.abs(frames[0].astype(int) - expected).mean() < 6  # a wrong orientation differs by ~100


def test_phone_portrait_video_comes_out_upright(tmp_path):
    # phones write "rotate 90" (clockwise) for portrait video: PyAV reads it back as rotation -90
    upright = quadrants(64, 32)  # what the camera saw: portrait
    stored = np.rot90(upright, 1)  # the sensor's landscape pixels
    write_video(tmp_path / "phone.mp4", np.stack([stored] * 2), 30, rotation=-90)
    frames, _ = load_video(tmp_path / "phone.mp4")
    assert frames.shape[1:] == (64, 32, 3)
    assert np.abs(frames[0].astype(int) - upright).mean() < 6


@pytest.mark.parametrize("codec", ["libx264", "mpeg4"])
def test_odd_sizes(tmp_path, codec):
    height, width = 157, 93
    frames_in = clip(12, height, width)
    write_video(tmp_path / "odd.mp4", frames_in, 4, codec=codec)
    frames, times = load_video(tmp_path / "odd.mp4", fps=1)
    assert frames.shape == (3, height, width, 3)
    assert which(frames) == [0, 4, 8] and times == pytest.approx([0, 1, 2])
    write_video(tmp_path / "odd_rot.mp4", np.stack([quadrants(height, width)] * 2), 4, rotation=90)
    frames, _ = load_video(tmp_path / "odd_rot.mp4")
    assert frames.shape == (1, width, height, 3)
    assert np.abs(frames[0].astype(int) - np.rot90(quadrants(height, width))).mean() < 6


# ---------------------------------------------------------------------------------------------------- errors

def test_video_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        load_video(tmp_path / "missing.mp4")
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        iter_video(tmp_path / "missing.mp4")  # at the call, not at the first frame

    (tmp_path / "notes.mp4").write_text("these are notes, not a video\n" * 20)
    with pytest.raises(ValueError, match="notes.mp4 is not a video"):
        load_video(tmp_path / "notes.mp4")

    with av.open(str(tmp_path / "audio.mp4"), "w") as container:  # an audio-only file
        stream = container.add_stream("aac", rate=16000)
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    with pytest.raises(ValueError, match="audio.mp4 has no video stream"):
        load_video(tmp_path / "audio.mp4")

    with pytest.raises(ValueError, match="fps"):
        load_video(tmp_path / "audio.mp4", fps=0)
    with pytest.raises(ValueError, match="max_frames"):
        load_video(tmp_path / "audio.mp4", max_frames=0)


@pytest.mark.parametrize("cut", [0, 24])
def test_truncated_video_has_no_decodable_frame(tmp_path, cut):
    # faststart puts the index (moov) first: cut inside the media data, the file still opens and lists its
    # video stream, but no frame decodes
    noise = np.random.default_rng(0).integers(0, 20, (10, 64, 64, 3), dtype=np.uint8)
    write_video(tmp_path / "full.mp4", clip(10, 64, 64) + noise, 10)
    cut_after_index(tmp_path / "full.mp4", tmp_path, cut)
    with av.open(str(tmp_path / "cut.mp4")) as container:
        assert len(container.streams.video) == 1
    with pytest.raises(ValueError, match="no decodable frame in .*cut.mp4"):
        load_video(tmp_path / "cut.mp4")


def test_truncated_tail_gives_the_frames_before_the_cut(tmp_path):
    noise = np.random.default_rng(0).integers(0, 20, (20, 64, 64, 3), dtype=np.uint8)
    write_video(tmp_path / "full.mp4", clip(20, 64, 64) + noise, 10)
    with av.open(str(tmp_path / "full.mp4")) as src, \
            av.open(str(tmp_path / "fast.mp4"), "w", options={"movflags": "faststart"}) as dst:
        stream = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.size:
                packet.stream = stream
                dst.mux(packet)
    data_bytes = (tmp_path / "fast.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data_bytes[:len(data_bytes) * 2 // 3])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FFmpeg may report the cut as an error (we warn) or as the end
        frames, times = load_video(tmp_path / "cut.mp4", fps=None)
    # (frames whose reference frames were cut off come out concealed, so only the first is checked by content)
    assert 0 < len(frames) < 20 and which(frames[:1]) == [0]
    assert times == pytest.approx([i / 10 for i in range(len(frames))])


def test_write_video_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "x.mp4", np.zeros((2, 8, 8, 3), np.float32), 5)
    with pytest.raises(ValueError, match="strictly increasing"):
        write_video(tmp_path / "x.mp4", clip(3), 5, times=[0, 1, 1])
    with pytest.raises(ValueError, match="encoder"):
        write_video(tmp_path / "x.mp4", clip(3), 5, codec="no_such_codec")


# ---------------------------------------------------------------------------------------------------- hashes

def test_content_hash(tmp_path):
    blob = np.random.default_rng(1).integers(0, 256, 3 * (1 << 20) + 17, dtype=np.uint8).tobytes()
    (tmp_path / "a.bin").write_bytes(blob)
    assert content_hash(tmp_path / "a.bin") == hashlib.sha256(blob).hexdigest()
    (tmp_path / "b.bin").write_bytes(blob[:-1] + b"\x00")
    assert content_hash(tmp_path / "b.bin") != content_hash(tmp_path / "a.bin")
    with pytest.raises(FileNotFoundError, match="c.bin"):
        content_hash(tmp_path / "c.bin")


# ---------------------------------------------------------------------------------------------------- subtitles

SRT = (
    "\ufeff1\r\n"
    "00:00:01,500 --> 00:00:03,000\r\n"
    "<i>Where are</i> we\r\n"
    "going?\r\n"
    "\r\n"
    "2\r\n"
    "00:00:03,000 --> 00:00:04,250 X1:40 X2:600 Y1:20 Y2:50\r\n"
    "{\\an8}<font color=\"#ffff00\">To the sea.</font>\r\n"
    "3\r\n"  # no blank line before the next index: the 3 is an index, not text
    "00:01:02.7 --> 01:00:00,010\r\n"
    "42\r\n"
    "\r\n"
    "\r\n"
    "4\r\n"
    "00:00:05,000 --> 00:00:06,000\r\n"
    "<b></b>\r\n"  # nothing left after the markup: dropped
    "\r\n"
)


def test_load_subtitles(tmp_path):
    (tmp_path / "movie.srt").write_bytes(SRT.encode("utf-8"))
    assert load_subtitles(tmp_path / "movie.srt") == [
        {"start_time": 1.5, "end_time": 3.0, "text": "Where are we going?"},
        {"start_time": 3.0, "end_time": 4.25, "text": "To the sea."},
        {"start_time": 62.7, "end_time": 3600.01, "text": "42"},
    ]
    (tmp_path / "latin.srt").write_bytes("1\n00:00:00,000 --> 00:00:01,000\nCaf\xe9\n".encode("latin-1"))
    assert load_subtitles(tmp_path / "latin.srt")[0]["text"] == "Caf\xe9"
    (tmp_path / "utf16.srt").write_bytes("1\n00:00:00,000 --> 00:00:01,000\nCaf\xe9\n".encode("utf-16"))
    assert load_subtitles(tmp_path / "utf16.srt")[0]["text"] == "Caf\xe9"
    (tmp_path / "empty.srt").write_text("\n")
    assert load_subtitles(tmp_path / "empty.srt") == []


def test_load_subtitles_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="none.srt"):
        load_subtitles(tmp_path / "none.srt")
    (tmp_path / "notes.srt").write_text("just some text\nno times at all\n")
    with pytest.raises(ValueError, match="notes.srt holds no subtitle cues"):
        load_subtitles(tmp_path / "notes.srt")


# ---------------------------------------------------------------------------------------------------- long video

def test_long_movie_prompt_matches_fixture(fixtures):
    case = json.loads((fixtures / "cases" / "long_movie.json").read_text())
    subtitles, frame_time, question = case["subtitles"], case["frame_time"], case["question"]
    assert movie_video_input(subtitles, frame_time) == case["video_input"]

    prompt = case["prompt"]
    human = prompt[prompt.index("USER: ") + len("USER: "):prompt.rindex(" ASSISTANT:")]
    video_token = prompt.count("<image>") // len(frame_time)  # tokens per frame, as the fixture was made
    assert video_token * len(frame_time) == prompt.count("<image>")
    assert movie_message(subtitles, frame_time, question, video_token) == human
    assert movie_prompt(subtitles, frame_time, video_token) + "\n" + question == human
    assert build_prompt([("USER", human), ("ASSISTANT", None)], "vicuna_v1") == prompt


def test_movie_video_input_by_hand():
    subtitles = [
        {"start_time": 0.2, "end_time": 1.0, "text": "a"},  # ends AT frame 1: goes after frame 0
        {"start_time": 1.0, "end_time": 1.01, "text": "b"},  # after frame 1
        {"start_time": 1.2, "end_time": 1.5, "text": "c"},  # same frame: joined with a space
        {"start_time": 9.0, "end_time": 99.0, "text": "d"},  # past the last frame: after the last frame
    ]
    assert movie_video_input(subtitles, [0.0, 1.0, 2.0]) == "<image>a<image>b c<image>d"
    assert movie_video_input([], [0.0, 1.0]) == "<image><image>"
    assert movie_prompt(subtitles[:1], [0.0], 3) == (
        "Below is a movie. Memorize the content and answer my question after watching this movie."
        "<image><image><image>aNow the movie end.")
    # video_token=0 is the original's --pure-text prompt: the <image> placeholders removed
    assert movie_prompt(subtitles, [0.0, 1.0, 2.0], 0) == (
        "Below is a movie. Memorize the content and answer my question after watching this movie."
        "ab cdNow the movie end.")
    with pytest.raises(ValueError, match="frame time"):
        movie_video_input(subtitles, [])


def test_the_same_frames_encode_to_the_same_bytes_in_any_process(tmp_path):
    """The quick start's clips encode to the same bytes whatever the process: write_video converts RGB to YUV itself
    (FFmpeg's converter rounded about 1 clip in 15 differently in a process whose allocator was set as train.py
    sets glibc's on a CPU) and shapes.CLIP_ENCODING leaves out x264's macroblock tree (about 1 in 300 more)."""
    import subprocess
    import sys
    script = (
        "import ctypes, hashlib, random, sys\n"
        "sys.path.insert(0, {root!r})\n"
        "if sys.argv[1] == 'tuned': [ctypes.CDLL('libc.so.6').mallopt(*o) for o in ((-3, 32 << 20), (-1, 1 << 30))]\n"
        "from media import write_video\n"
        "from shapes import CLIP_ENCODING, render_shapes_clip, shapes_clip\n"
        "for i in range(300):\n"
        "    path = {out!r} + sys.argv[1] + '.mp4'\n"
        "    write_video(path, render_shapes_clip(shapes_clip(random.Random(f'shapes-0-train-{{i}}'), 16, 64)), fps=2, options=CLIP_ENCODING)\n"
        "    print(hashlib.sha256(open(path, 'rb').read()).hexdigest())\n"
    ).format(root=str(Path(__file__).resolve().parents[1]), out=str(tmp_path / "clip_"))
    runs = [subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, timeout=300)
            for mode in ("plain", "tuned")]
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
    assert runs[0].stdout == runs[1].stdout
