"""Image and video processors: real files, the reference's pixel values, and clear errors for bad media."""

from __future__ import annotations

import base64
import io
import time

import av
import numpy as np
import pytest
import torch
from conftest import IMG, IMG_END, IMG_START, VID, VID_END, VID_START, make_reference_vl, reference_vl_kwargs
from PIL import Image
from transformers import Ernie4_5_VLMoeImageProcessorPil

import ernie45
from ernie45.processing import ImageProcessor, VideoProcessor, expand_ids, expand_text, smart_resize
from ernie45.processing.video import sample_indices, timestamp_text


def _image(w, h, seed=0):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8))


def _mp4(frames=30, fps=10, size=(160, 120)) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(frames):
            a = np.zeros((size[1], size[0], 3), np.uint8)
            a[..., 0] = i * 8
            a[(i * 3) % size[1] :][:10, :, 1] = 255
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


@pytest.mark.parametrize("size", [(517, 333), (40, 30), (3000, 2000), (28, 1400)])
def test_pixel_values_match_reference(size):
    img = _image(*size)
    ours = ImageProcessor()(img)
    ref = Ernie4_5_VLMoeImageProcessorPil()(img, return_tensors="pt")
    assert torch.equal(ours["image_grid_thw"], ref["image_grid_thw"])
    assert (ours["pixel_values"] - ref["pixel_values"]).abs().max() <= 1e-3


def test_every_input_kind_gives_the_same_pixels(tmp_path):
    img = _image(200, 120)
    path = tmp_path / "x.png"
    img.save(path)
    data = path.read_bytes()
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    kinds = [path, str(path), data, img, np.asarray(img), url]
    outs = [ImageProcessor()(k)["pixel_values"] for k in kinds]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    both = ImageProcessor()([img, _image(60, 90, seed=1)])
    assert both["image_grid_thw"].tolist() == [[1, 8, 14], [1, 6, 4]]


def test_bad_images_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"<9 bytes>: not a readable image"):
        ImageProcessor()(b"not a png")
    with pytest.raises(ValueError, match="no such file"):
        ImageProcessor()(tmp_path / "missing.jpg")
    with pytest.raises(ValueError, match="invalid base64"):
        ImageProcessor()("data:image/png;base64,@@@")
    with pytest.raises(ValueError, match="aspect ratio"):
        ImageProcessor()(_image(2900, 10))
    bomb = tmp_path / "bomb.png"
    Image.new("1", (12000, 6000)).save(bomb)  # 72 M pixels in a few KB
    start = time.perf_counter()
    with pytest.raises(ValueError, match="over the 64,000,000 pixel limit"):
        ImageProcessor()(bomb)
    assert time.perf_counter() - start < 1.0  # refused from the header, not decoded


def test_smart_resize_limits():
    assert smart_resize(333, 517, 28, 3136, 4_842_768) == (336, 504)
    h, w = smart_resize(10, 10, 28, 56 * 56, 10**7)
    assert (h, w) == (56, 56)
    h, w = smart_resize(4000, 3000, 28, 3136, 1_000_000)
    assert h * w <= 1_000_000 and h % 28 == 0 and w % 28 == 0


def test_video_sampling_timestamps_and_padding(tmp_path):
    data = _mp4(frames=30, fps=10)
    out = VideoProcessor()(data)
    t, h, w = out["video_grid_thw"][0].tolist()
    assert t == 16 and out["pixel_values_videos"].shape == (t * h * w, 588)  # 3 s at fps 2 -> 6, raised to 16
    path = tmp_path / "v.mp4"
    path.write_bytes(data)
    url = "data:video/mp4;base64," + base64.b64encode(data).decode()
    assert torch.equal(VideoProcessor()(path)["pixel_values_videos"], out["pixel_values_videos"])
    assert torch.equal(VideoProcessor()(url)["pixel_values_videos"], out["pixel_values_videos"])
    odd = VideoProcessor(min_frames=5, max_frames=5)(data)
    assert odd["video_grid_thw"][0, 0] == 6  # the 5th frame repeated
    plain = VideoProcessor(draw_timestamps=False)(data)["pixel_values_videos"]
    assert not torch.equal(plain, out["pixel_values_videos"])
    frames, seconds = VideoProcessor().decode(data)
    assert len(frames) == 16 and seconds[1] == pytest.approx(2 * 3.0 / 30)
    assert sample_indices(30, 3.0, 2.0, 16, 180)[:3] == [0, 2, 4]
    assert timestamp_text(3725.5) == "time: 01:02:05.50"


def test_bad_videos_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"<800 bytes>: not a readable video"):
        VideoProcessor()(b"notavideo" * 88 + b"12345678")
    wav = tmp_path / "a.wav"
    with av.open(str(wav), "w") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for p in s.encode(frame):
            c.mux(p)
    with pytest.raises(ValueError, match="no video stream"):
        VideoProcessor()(wav)


def test_placeholder_expansion():
    assert expand_ids([1, IMG, 2, IMG], IMG, [2, 3]) == [1, IMG, IMG, 2, IMG, IMG, IMG]
    assert expand_text("a<|IMAGE_PLACEHOLDER|>b", "<|IMAGE_PLACEHOLDER|>", [2]).count("PLACEHOLDER") == 2
    with pytest.raises(ValueError, match="2 placeholder tokens .* but 1 media items"):
        expand_ids([IMG, IMG], IMG, [1])


def test_processed_media_run_on_both_models(ref_vl_dir):
    """A batch made by our processors runs on ours and on the reference, with the same logits."""
    image = ImageProcessor(max_pixels=56 * 84)(_image(90, 60))
    video = VideoProcessor(min_pixels=56 * 56, max_pixels=56 * 56, min_frames=4, max_frames=4)(_mp4())
    n_img = ImageProcessor().num_tokens(image["image_grid_thw"][0].tolist())
    n_vid = VideoProcessor().num_tokens(video["video_grid_thw"][0].tolist())
    ids = [5, 6, IMG_START, IMG, IMG_END, 7, VID_START, VID, VID_END, 8]
    ids = expand_ids(expand_ids(ids, IMG, [n_img]), VID, [n_vid])
    batch = dict(
        input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), **image, **video
    )
    ours = ernie45.load(ref_vl_dir)
    with torch.no_grad():
        a = ours(**batch).logits
        b = make_reference_vl()(**reference_vl_kwargs(batch)).logits
    assert (a - b).abs().max() <= 1e-4
