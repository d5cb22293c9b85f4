"""Hearing: decoding, log-mel, the audio encoder and its expert group, video with its sound track, the CLI."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import wave

import av
import numpy as np
import pytest
import torch
from chat_fixtures import write_chat_checkpoint
from transformers import WhisperFeatureExtractor

import ernie45
from ernie45.config import AudioConfig
from ernie45.processing.audio import AudioProcessor, decode_audio, log_mel, mel_filters


def _sine(seconds=1.0, rate=16000, freq=440.0):
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _encode(samples: np.ndarray, rate: int, fmt: str, codec: str, layout="mono") -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as c:
        s = c.add_stream(codec, rate=rate, layout=layout)
        data = np.atleast_2d(samples) if layout == "mono" else np.stack([samples, samples])
        size = s.codec_context.frame_size or len(samples)
        for start in range(0, len(samples), size):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(data[:, start : start + size]), format="fltp", layout=layout
            )
            frame.sample_rate, frame.pts = rate, start
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return buf.getvalue()


def numpy_log_mel(x: np.ndarray, n_fft=400, hop=160, n_mels=128, rate=16000) -> np.ndarray:
    """An independent numpy log-mel: reflect-padded frames, periodic Hann, rfft power, Slaney filters."""
    pad = np.pad(x.astype(np.float64), n_fft // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(pad, n_fft)[::hop][: len(x) // hop]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    power = np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2
    mel = power @ mel_filters(rate, n_fft, n_mels).numpy().astype(np.float64).T
    logs = np.log10(np.maximum(mel, 1e-10))
    return (np.maximum(logs, logs.max() - 8.0) + 4.0) / 4.0


def test_log_mel_matches_numpy_and_whisper():
    x = _sine(1.3) + 0.1 * np.random.RandomState(0).randn(int(1.3 * 16000)).astype(np.float32)
    ours = log_mel(torch.from_numpy(x)).numpy()
    assert ours.shape == (130, 128)
    assert np.abs(ours - numpy_log_mel(x)).max() < 1e-4
    ref = WhisperFeatureExtractor(feature_size=128)._np_extract_fbank_features(x[None], "cpu")[0].T
    assert np.abs(ours - ref).max() < 1e-4


@pytest.mark.parametrize(
    ("fmt", "codec", "rate"),
    [("wav", "pcm_s16le", 44100), ("flac", "flac", 44100), ("ogg", "libopus", 48000), ("mp3", "libmp3lame", 44100)],
)
def test_formats_decode_to_16k_mono(fmt, codec, rate):
    data = _encode(_sine(1.0, rate), rate, fmt, codec, layout="stereo")
    wave_ = decode_audio(data)
    assert abs(wave_.numel() - 16000) < 1600 and wave_.abs().max() > 0.3
    spectrum = np.abs(np.fft.rfft(wave_.numpy()[2000:14000]))
    assert abs(np.argmax(spectrum) * 16000 / 12000 - 440) < 10  # still a 440 Hz tone


def test_bad_audio_gives_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="not readable audio"):
        decode_audio(b"\x89PNG\r\n\x1a\n" + b"0" * 300)
    good = _encode(_sine(1.0), 16000, "wav", "pcm_s16le")
    truncated = good[:44]  # the header only
    with pytest.raises(ValueError, match="empty|not readable"):
        decode_audio(truncated)
    with pytest.raises(ValueError, match="longer than the 0.5 s limit"):
        decode_audio(good, max_seconds=0.5)
    with pytest.raises(ValueError, match="the audio is empty"):
        decode_audio(np.zeros(0, np.float32))
    silent = AudioProcessor()(np.zeros(8000, np.float32))
    assert torch.isfinite(silent["audio_values"]).all() and silent["audio_lengths"].tolist() == [56]
    from test_processing import _mp4

    with pytest.raises(ValueError, match="no audio stream"):
        decode_audio(_mp4())


def _speech(tmp_path, text="Hello, this is a test of the audio path.") -> bytes:
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is not installed (.ci/run installs it: apt-get install espeak-ng)")
    out = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(out), text], check=True, capture_output=True)
    return out.read_bytes()


def _video_with_sound(seconds=5.0) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        vs = c.add_stream("mpeg4", rate=10)
        vs.width, vs.height, vs.pix_fmt = 64, 48, "yuv420p"
        aud = c.add_stream("aac", rate=16000, layout="mono")
        for i in range(int(seconds * 10)):
            a = np.full((48, 64, 3), i * 4, np.uint8)
            for p in vs.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        samples = _sine(seconds)
        for start in range(0, len(samples), 1024):
            frame = av.AudioFrame.from_ndarray(samples[None, start : start + 1024], format="fltp", layout="mono")
            frame.sample_rate = 16000
            frame.pts = start
            for p in aud.encode(frame):
                c.mux(p)
        for s in (vs, aud):
            for p in s.encode(None):
                c.mux(p)
    return buf.getvalue()


@pytest.fixture(scope="module")
def omni_dir(tmp_path_factory):
    return write_chat_checkpoint(tmp_path_factory.mktemp("omni"), audio=True)


def test_speech_through_processor_and_model(omni_dir, tmp_path):
    speech = _speech(tmp_path)
    with wave.open(io.BytesIO(speech)) as w:
        seconds = w.getnframes() / w.getframerate()
    llm = ernie45.LLM(omni_dir)
    conv = [{"role": "user", "content": [{"type": "audio", "audio": speech}, {"type": "text", "text": "Transcribe."}]}]
    enc = llm.processor.encode_chat(conv)
    ids = enc["input_ids"]
    n_audio = ids.count(llm.processor.ids["audio"])
    assert n_audio == int(np.ceil(seconds * 12.5)) and enc["audio_lengths"].tolist() == [n_audio * 8]
    model = llm.model
    batch = llm.processor.collate([enc])
    modality = model.model.modality_ids(batch["input_ids"])
    audio_rows = (batch["input_ids"] == llm.processor.ids["audio"]) | (
        batch["input_ids"] == llm.processor.ids["audio_start"]
    )
    assert (modality[audio_rows] == 3).all() and (modality[~audio_rows & (modality != 3)] == 0).all()
    with torch.no_grad():
        heard = model(**batch).logits
        other = model(**dict(batch, audio_values=batch["audio_values"].flip(0))).logits
    assert (heard - other).abs().max() > 1e-3  # what was said changes the output
    out = llm.chat(conv, ernie45.SamplingParams(max_tokens=5, temperature=0))[0]
    assert out.completion_tokens >= 1


def test_omni_scaled_copy_forward_and_backward(omni_dir, tmp_path):
    model = ernie45.load(omni_dir).train()
    llm = ernie45.LLM(model, processor=ernie45.load_processor(omni_dir))
    from PIL import Image

    img = Image.fromarray((np.random.RandomState(0).rand(40, 60, 3) * 255).astype(np.uint8))
    conv = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": img},
                {"type": "audio", "audio": _sine(1.0)},
                {"type": "video", "video": _video_with_sound(), "use_audio": True},
                {"type": "text", "text": "What do you see and hear?"},
            ],
        }
    ]
    llm.processor.video.min_pixels = llm.processor.video.max_pixels = 56 * 56
    batch = llm.processor.collate([llm.processor.encode_chat(conv)])
    out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    for name in ("vision_tower", "audio_tower", "audio_resampler"):
        grads = [p.grad for p in getattr(model.model, name).parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), name
    audio_group = model.model.layers[1].mlp.groups["audio"]
    assert audio_group.gate_up_proj.grad.abs().sum() > 0


def test_video_with_sound_interleaves_in_time_order(omni_dir):
    proc = ernie45.load_processor(omni_dir)
    proc.video.min_pixels = proc.video.max_pixels = 56 * 56
    video = _video_with_sound(5.0)
    conv = [{"role": "user", "content": [{"type": "video", "video": video, "use_audio": True}]}]
    enc = proc.encode_chat(conv)
    last = int(np.ceil((decode_audio(video).numel() - 4 * 16000) / 1280))  # the codec adds a few ms
    ids = enc["input_ids"]
    vid, aud, a0, a1 = (proc.ids[k] for k in ("video", "audio", "audio_start", "audio_end"))
    runs = []
    for t in ids:
        kind = {vid: "V", aud: "A"}.get(t)
        if kind and (not runs or runs[-1][0] != kind):
            runs.append([kind, 0])
        if kind:
            runs[-1][1] += 1
    # 5 s: chunks [0,2), [2,4), [4,5) -- each: its frame pairs, then its 2 s of sound (25 tokens, ~13 for 1 s)
    assert [k for k, _ in runs] == ["V", "A", "V", "A", "V", "A"]
    assert [n for k, n in runs if k == "A"] == [25, 25, last] and 13 <= last <= 15
    grid = enc["video_grid_thw"][0].tolist()
    per_pair = grid[1] * grid[2] // 4
    assert sum(n for k, n in runs if k == "V") == grid[0] // 2 * per_pair
    assert ids.count(a0) == ids.count(a1) == 3
    # the model places them on one time axis: positions never go back
    model = ernie45.load(omni_dir)
    batch = proc.collate([enc])
    pos = model.model.positions(
        batch["input_ids"], batch["attention_mask"], None, 0, len(ids), "cpu", None, batch["video_grid_thw"]
    )
    t_axis = pos[0, 0]
    firsts = [t_axis[i] for i in range(1, len(ids)) if ids[i] != ids[i - 1]]
    assert all(b >= a for a, b in zip(firsts, firsts[1:], strict=False))


def test_generate_with_audio_on_the_command_line(omni_dir, tmp_path):
    speech = tmp_path / "s.wav"
    speech.write_bytes(_speech(tmp_path, "one two three"))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "ernie45",
            "generate",
            "What was said?",
            "--audio",
            str(speech),
            "--model",
            str(omni_dir),
            "--max-tokens",
            "4",
            "--temperature",
            "0",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["prompt_tokens"] > 15


def test_audio_config_defaults_describe_the_front_end():
    c = AudioConfig()
    assert c.n_fft == 400 and c.hop_length == 160 and c.mel_frames_per_token == 8  # 12.5 tokens per second
