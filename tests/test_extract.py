"""The Transformer encoder stage (`vis4mer extract`): small synthetic videos written with PyAV, a
tiny randomly initialised ViT (same 197 tokens, 64 dims, 2 blocks) loaded from a checkpoint file,
through the Ray Data job to feature shards, locally and on S3 (moto)."""
from __future__ import annotations

import hashlib
import json
import os
import struct

import av
import numpy as np
import pytest
import torch
from torch import nn

from vis4mer.datasets.encoders import VIT_ARCHS, Encoder, EncoderSpec, VisionTransformer, load_state_dict
from vis4mer.datasets.format import open_dataset, verify, video_features
from vis4mer.datasets.storage import StorageOptions
from vis4mer.datasets.video import Sampling, decode
from vis4mer.orchestrator.cli import main


def make_video(path, seconds: float, fps: int = 8, size=(64, 48), codec="libx264", seed=0) -> None:
    """Noise that changes every frame, plus a grey level that encodes the frame index."""
    rng = np.random.default_rng(seed)
    w, h = size
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(int(seconds * fps)):
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            img[h // 2 :] = (i * 7) % 256
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def tiny_weights(path, seed=0) -> str:
    torch.manual_seed(seed)
    sd = VisionTransformer(VIT_ARCHS["tiny"]).state_dict()
    sd["head.weight"], sd["head.bias"] = torch.randn(10, 64), torch.zeros(10)  # a classifier head: ignored
    torch.save(sd, path)
    return str(path)


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    vids = root / "videos"
    (vids / "sub").mkdir(parents=True)
    make_video(vids / "a.mp4", 4, seed=1)
    make_video(vids / "sub" / "b.mp4", 3, codec="mpeg4", seed=2)
    make_video(vids / "c.mkv", 2.5, fps=6, seed=3)
    (vids / "broken.mp4").write_bytes(np.random.default_rng(0).bytes(4000))  # not a video
    (vids / "notes.txt").write_text("not a video")
    labels = root / "labels.csv"
    labels.write_text("video_id,label,split\na,2,train\nsub/b,1,val\nc,3,test\nbroken,0,train\nd,1,train\n")
    return {"root": root, "videos": vids, "labels": str(labels), "weights": tiny_weights(root / "tiny.pth")}


def _reference(material, vid_path):
    sd = load_state_dict(open(material["weights"], "rb").read(), "tiny.pth")
    enc = Encoder(EncoderSpec(arch="tiny"), sd)
    return enc.encode(decode(str(vid_path), Sampling("fps")))


def _rows(uri, storage=None, tokens=197, dim=64):
    import pyarrow.parquet as pq

    ds = open_dataset(uri, storage)
    rows = {}
    for s in ds.manifest.shards:
        with ds.res.pa.open_input_file(ds.res.join(s["path"])) as f:
            t = pq.read_table(f)
        feats = video_features(t.column("features"), tokens, dim)
        for vid, label, split, x in zip(t.column("video_id").to_pylist(), t.column("label").to_pylist(),
                                        t.column("split").to_pylist(), feats):
            rows[vid] = (label, split, x)
    return ds, rows


# --- no Ray -------------------------------------------------------------------------------------


def test_one_frame_per_second_and_swin_segments(material):
    x = decode(str(material["videos"] / "a.mp4"), Sampling("fps"))
    assert x.shape == (4, 224, 224, 3) and x.dtype == np.uint8
    grey = [float(f[130:, :, 1].mean()) for f in x]  # frames 0, 8, 16, 24: grey 0, 56, 112, 168
    np.testing.assert_allclose(grey, [0, 56, 112, 168], atol=6)
    seg = decode(str(material["videos"] / "a.mp4"), Sampling("segments"))
    assert seg.shape == (1, 32, 224, 224, 3)  # exactly 32 frames: one segment, no padding
    seg = decode(str(material["videos"] / "c.mkv"), Sampling("segments"))  # 15 frames: padded with the last
    assert seg.shape == (1, 32, 224, 224, 3)
    np.testing.assert_array_equal(seg[0, 14], seg[0, 31])


def test_builtin_vit_matches_timm_layout_and_a_reference(material):
    sd = load_state_dict(open(material["weights"], "rb").read(), "tiny.pth")
    expected = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
                "norm.bias"}
    for i in range(2):
        expected |= {f"blocks.{i}.{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
                     for p in ("weight", "bias")}
    assert set(VisionTransformer(VIT_ARCHS["tiny"]).state_dict()) == expected  # timm's keys
    # an independent forward pass: torch's MultiheadAttention (in_proj = [q; k; v], as timm's qkv)
    x = torch.rand(2, 3, 224, 224)
    h = nn.functional.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16)
    h = torch.cat([sd["cls_token"].expand(2, -1, -1), h.flatten(2).transpose(1, 2)], 1) + sd["pos_embed"]
    ln = lambda t, p: nn.functional.layer_norm(t, (64,), sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)  # noqa: E731
    for i in range(2):
        b = f"blocks.{i}."
        mha = nn.MultiheadAttention(64, 2, batch_first=True)
        mha.load_state_dict({"in_proj_weight": sd[b + "attn.qkv.weight"], "in_proj_bias": sd[b + "attn.qkv.bias"],
                             "out_proj.weight": sd[b + "attn.proj.weight"], "out_proj.bias": sd[b + "attn.proj.bias"]})
        z = ln(h, b + "norm1")
        h = h + mha(z, z, z, need_weights=False)[0]
        z = nn.functional.gelu(nn.functional.linear(ln(h, b + "norm2"), sd[b + "mlp.fc1.weight"],
                                                    sd[b + "mlp.fc1.bias"]))
        h = h + nn.functional.linear(z, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
    ref = ln(h, "norm")
    enc = Encoder(EncoderSpec(arch="tiny"), sd)
    with torch.inference_mode():
        got = enc.model.forward_features(x)
    assert got.shape == (2, 197, 64)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    # released: /255 only; model: (x - 0.5) / 0.5 (ImageNet-21k ViT)
    frames = np.full((1, 224, 224, 3), 51, np.uint8)
    assert torch.allclose(enc.preprocess(frames), torch.full((1, 3, 224, 224), 0.2))
    assert torch.allclose(Encoder(EncoderSpec(arch="tiny", preprocess="model")).preprocess(frames),
                          torch.full((1, 3, 224, 224), -0.6))


def test_safetensors_weights_load(material, tmp_path):
    sd = torch.load(material["weights"], weights_only=True)
    header, blobs, off = {}, [], 0
    for k, v in sd.items():
        b = v.numpy().astype(np.float32).tobytes()
        header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    data = struct.pack("<Q", len(h)) + h + b"".join(blobs)
    got = load_state_dict(data, "tiny.safetensors")
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)


@pytest.mark.parametrize("case", ["extractor", "videos", "weights-missing", "weights-shape", "task", "labels", "swin"])
def test_cli_errors_are_one_line(material, tmp_path, capsys, case):
    out = tmp_path / "out"

    def cmd(videos=str(material["videos"]), extractor="vit", arch="tiny", weights=material["weights"], *extra):
        return ["extract", "--videos", videos, "--out", str(out), "--extractor", extractor, "--arch", arch,
                *(["--weights", weights] if weights else []), *extra]
    argv = {
        "extractor": cmd(extractor="resnet"),
        "videos": cmd(str(tmp_path / "nowhere")),
        "weights-missing": cmd(weights=str(tmp_path / "missing.pth")),
        "weights-shape": cmd(arch="large"),  # tiny weights into ViT-L/16
        "task": cmd() + ["--task", "breakfast"],  # 49 tokens per segment: a Video Swin task
        "labels": cmd() + ["--labels", str(tmp_path / "bad.csv")],
        "swin": cmd(extractor="swin", arch="large", weights=None) + ["--random-init"],
    }[case]
    if case == "labels":
        (tmp_path / "bad.csv").write_text("video_id,label\na,7\n")  # lvu_genre has 4 classes
    if case == "swin":
        try:
            import torchvision.models.video  # noqa: F401
            pytest.skip("torchvision imports here: swin is available")
        except Exception:
            pass
    if case == "extractor":
        with pytest.raises(SystemExit) as e:
            main(argv)
        code = e.value.code
    else:
        code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert {"extractor": "resnet", "videos": "nowhere", "weights-missing": "missing.pth",
            "weights-shape": "tiny.pth: keys do not match", "task": "breakfast", "labels": "bad.csv:2",
            "swin": "torchvision"}[case] in err
    assert not out.exists()  # nothing half-written


# --- the Ray Data job ---------------------------------------------------------------------------


@pytest.mark.ray
def test_extract_writes_resumes_and_records_failures(material, tmp_path, capsys, ray_session):
    out = tmp_path / "feats"
    argv = ["extract", "--videos", str(material["videos"]), "--out", str(out), "--extractor", "vit", "--arch", "tiny",
            "--weights", material["weights"], "--labels", material["labels"], "--batch-frames", "3",
            "--part-mb", "0.05", "--progress-s", "0.01", "--concurrency", "1"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "4 videos under" in text and "0 already in" in text and "frames/s" in text
    assert "3 encoded, 0 already there, 1 failed" in text and "1 not in the labels" not in text

    ds, rows = _rows(str(out))
    assert verify(str(out))["videos"] == 3
    assert ds.manifest.split_rows() == {"train": 1, "val": 1, "test": 1}
    assert {v: (r[0], r[1], r[2].shape) for v, r in rows.items()} == {
        "a": (2, "train", (4, 197, 64)), "sub/b": (1, "val", (3, 197, 64)), "c": (3, "test", (3, 197, 64))}
    for vid, path in [("a", "a.mp4"), ("sub/b", "sub/b.mp4"), ("c", "c.mkv")]:
        ref = _reference(material, material["videos"] / path)
        np.testing.assert_allclose(rows[vid][2].astype(np.float32), ref.astype(np.float32), atol=2e-2, rtol=1e-2)
    ex = ds.manifest.extractor
    assert ex["weights"] == "tiny.pth"
    assert ex["weights_sha256"] == hashlib.sha256(open(material["weights"], "rb").read()).hexdigest()
    assert ex["preprocess"] == "released" and ex["frames_per_second"] == 1 and ex["frame_size"] == [224, 224]
    failures = json.loads((out / "failures.json").read_text())["failures"]
    assert [f["video_id"] for f in failures] == ["broken"] and "InvalidData" in failures[0]["reason"]
    assert len(ds.manifest.shards) >= 2  # small parts: several, all in one manifest

    # another setup into the same output is refused before anything changes
    capsys.readouterr()
    assert main(argv + ["--preprocess", "model"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "another extractor setup" in err

    # rerun with a killed run's leftover (a part without its manifest) and a new video
    shard_files = {p: p.stat().st_mtime_ns for p in (out / "parts").rglob("*.parquet")}
    (out / "parts" / "deadbeefdeadbeef").mkdir()
    (out / "parts" / "deadbeefdeadbeef" / "train-00000.parquet").write_bytes(b"partial")
    make_video(material["videos"] / "d.mp4", 2, seed=4)
    try:
        capsys.readouterr()
        assert main(argv) == 0
        text = capsys.readouterr().out
    finally:
        os.remove(material["videos"] / "d.mp4")
    assert "removing" in text and "deadbeefdeadbeef" in text and not (out / "parts" / "deadbeefdeadbeef").exists()
    assert "5 videos under" in text and "3 already in" in text and "2 to encode" in text  # d, and broken again
    assert "1 encoded, 3 already there, 1 failed" in text
    assert {p: p.stat().st_mtime_ns for p in shard_files} == shard_files  # finished parts untouched
    ds, rows = _rows(str(out))
    assert set(rows) == {"a", "sub/b", "c", "d"} and rows["d"][:2] == (1, "train")


@pytest.mark.ray
def test_extract_from_and_to_s3(material, s3_server, s3_bucket, ray_session, capsys):
    bucket, fs = s3_bucket
    fs.put(str(material["videos"] / "a.mp4"), f"{bucket}/videos/a.mp4")
    fs.put(str(material["videos"] / "broken.mp4"), f"{bucket}/videos/broken.mp4")
    out = f"s3://{bucket}/feats"
    argv = ["extract", "--videos", f"s3://{bucket}/videos", "--out", out, "--extractor", "vit", "--arch", "tiny",
            "--weights", material["weights"], "--preprocess", "model", "--endpoint-url", s3_server.endpoint]
    assert main(argv) == 0
    assert "1 encoded, 0 already there, 1 failed" in capsys.readouterr().out
    storage = StorageOptions(endpoint_url=s3_server.endpoint)
    ds, rows = _rows(out, storage)
    assert ds.manifest.extractor["preprocess"] == "model"
    sd = load_state_dict(open(material["weights"], "rb").read(), "tiny.pth")
    ref = Encoder(EncoderSpec(arch="tiny", preprocess="model"), sd).encode(decode(str(material["videos"] / "a.mp4"),
                                                                                  Sampling("fps")))
    assert rows["a"][:2] == (0, "train")
    np.testing.assert_allclose(rows["a"][2].astype(np.float32), ref.astype(np.float32), atol=2e-2, rtol=1e-2)
    failures = json.loads(fs.cat(f"{bucket}/feats/failures.json"))["failures"]
    assert failures[0]["uri"] == f"s3://{bucket}/videos/broken.mp4"
    # a rerun finds everything done
    assert main(argv) == 0
    assert "1 already in" in capsys.readouterr().out
