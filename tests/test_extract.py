"""The Transformer encoder stage (`vis4mer extract`): small synthetic videos written with PyAV, a
tiny randomly initialised ViT (same 197 tokens, 64 dims, 2 blocks) loaded from a checkpoint file,
through the Ray Data job to feature shards, locally and on S3 (moto); the same for a tiny Video Swin.

The built-in encoders are checked against timm's ViT and torchvision's Video Swin through reference
outputs in tests/fixtures (made once by tests/fixtures/make_encoder_refs.py in a scratch environment
with timm and torchvision; nothing here needs them or downloads anything)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from torch import nn

from vis4mer.datasets.encoders import (
    SWIN_ARCHS,
    VIT_ARCHS,
    Encoder,
    EncoderError,
    EncoderSpec,
    SwinTransformer3d,
    VisionTransformer,
    check_weights,
    load_state_dict,
    swin_keys_from_original,
    weights_layout,
)
from vis4mer.datasets.errors import UserError
from vis4mer.datasets.format import open_dataset, verify, video_features
from vis4mer.datasets.storage import StorageOptions
from vis4mer.datasets.video import Sampling, decode
from vis4mer.orchestrator.cli import main

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ROOT = Path(__file__).resolve().parents[1]


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


@pytest.mark.parametrize("case", ["extractor", "videos", "weights-missing", "weights-shape", "task", "labels",
                                  "swin-weights", "swin-size"])
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
        "swin-weights": cmd(extractor="swin"),  # the tiny ViT's weights into the tiny Video Swin
        "swin-size": cmd(extractor="swin", arch="large", weights=str(FIXTURES / "swin_tiny.pth")),  # into Swin-B
    }[case]
    if case == "labels":
        (tmp_path / "bad.csv").write_text("video_id,label\na,7\n")  # lvu_genre has 4 classes
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
            "weights-shape": "tiny.pth: keys do not match the vit_large_patch16_224_in21k encoder: first mismatch: "
                             "cls_token has shape (1, 1, 64): expected (1, 1, 1024)",
            "task": "breakfast", "labels": "bad.csv:2",
            "swin-weights": "tiny.pth: keys do not match the swin3d_tiny_test encoder: first mismatch: "
                            "patch_embed.proj.weight has shape (64, 3, 16, 16): expected (8, 3, 2, 4, 4)",
            "swin-size": "swin_tiny.pth: keys do not match the swin3d_b encoder: first mismatch: "
                         "patch_embed.proj.weight has shape (8, 3, 2, 4, 4): expected (128, 3, 2, 4, 4)"}[case] in err
    assert not out.exists()  # nothing half-written


@pytest.mark.parametrize("target", ["a-file", "other-files", "dangling-link"])
def test_extract_writes_only_into_an_empty_or_extract_target(material, tmp_path, capsys, target):
    """Never into a file or a link to nowhere, and never among another folder's files (say, the videos'
    own folder) without --overwrite: one line, the target as it was."""
    out = tmp_path / "out"
    if target == "a-file":
        out.write_text("mine")
    elif target == "other-files":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    else:
        out.symlink_to(tmp_path / "nowhere")
    before = sorted((p.name, p.is_symlink(), p.read_bytes() if p.is_file() else b"") for p in tmp_path.rglob("*"))
    code = main(["extract", "--videos", str(material["videos"]), "--out", str(out), "--extractor", "vit",
                 "--arch", "tiny", "--weights", material["weights"]])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert str(out) in err
    assert sorted((p.name, p.is_symlink(), p.read_bytes() if p.is_file() else b"")
                  for p in tmp_path.rglob("*")) == before


# --- the built-in encoders against timm and torchvision (tests/fixtures, no Ray) -----------------


def segment_frames() -> np.ndarray:
    """tests/fixtures/make_encoder_refs.py's segment (the same formula, broadcast): 32 frames of 224 x 224,
    uint8 (1, 32, 224, 224, 3)."""
    t, y, x, c = (np.arange(n).reshape([-1 if i == j else 1 for j in range(4)])
                  for i, n in enumerate((32, 224, 224, 3)))
    return ((3 * t + 5 * y + 7 * x + 50 * c + (x * y) // 9 + (t * x) // 5) % 256).astype(np.uint8)[None]


def _fixture_sd(name: str) -> dict[str, torch.Tensor]:
    return load_state_dict((FIXTURES / name).read_bytes(), name)


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).norm() / ref.double().norm())


def _close(got: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4) -> None:
    """Relative error <= tol: over the whole tensor, and per element against the reference's scale."""
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert _rel(got, ref) <= tol, _rel(got, ref)
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol * float(ref.abs().max()))


def _tiny_swin(num_classes: int = 0) -> SwinTransformer3d:
    """With torchvision's argument names, as make_encoder_refs.py builds the reference (= SWIN_ARCHS["tiny"])."""
    return SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=8, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8],
                             window_size=[8, 7, 7], num_classes=num_classes)


def to_original_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's Video Swin keys -> the original repository's (mmaction's Recognizer3D: backbone.*,
    layers.N.blocks.M, layers.N.downsample, mlp.fc1/fc2, cls_head.fc_cls), written independently of
    swin_keys_from_original."""
    out = {}
    for k, v in sd.items():
        if m := re.fullmatch(r"features\.(\d+)\.(\d+)\.(.+)", k):  # stages sit at even indices
            rest = re.sub(r"^mlp\.0\.", "mlp.fc1.", re.sub(r"^mlp\.3\.", "mlp.fc2.", m[3]))
            k = f"backbone.layers.{int(m[1]) // 2}.blocks.{m[2]}.{rest}"
        elif m := re.fullmatch(r"features\.(\d+)\.(reduction|norm)\.(.+)", k):  # patch merging at odd ones
            k = f"backbone.layers.{int(m[1]) // 2}.downsample.{m[2]}.{m[3]}"
        elif k.startswith("head."):
            k = "cls_head.fc_cls." + k[len("head."):]
        else:
            k = "backbone." + k
        out[k] = v
    return out


def test_builtin_vit_matches_timm():
    """timm's VisionTransformer (the tiny arch: 224 x 224, 197 tokens, 64 dims, 2 blocks), every
    parameter random, its weights as safetensors wrote them: the built-in ViT within 1e-4."""
    sd = _fixture_sd("vit_tiny.safetensors")
    ref = np.load(FIXTURES / "vit_tiny.npz")
    assert "head.weight" in sd  # timm's classifier head: ignored
    assert set(VisionTransformer(VIT_ARCHS["tiny"]).state_dict()) == {k for k in sd if not k.startswith("head.")}
    enc = Encoder(EncoderSpec(arch="tiny"), sd, device="cpu")
    assert enc.implementation == "builtin"
    with torch.inference_mode():
        got = enc.model.forward_features(torch.from_numpy(ref["x"]).float())
    _close(got, torch.from_numpy(ref["features"]))


def test_builtin_video_swin_matches_torchvision():
    """torchvision's SwinTransformer3d (patch (2, 4, 4), window (8, 7, 7), embed_dim 8, 2 blocks per
    stage), every parameter random, on a (2, 3, 23, 36, 58) input: patch padding in T and W, shifted
    windows padded in T, H and W (stage 1: grid (12, 9, 15) -> (16, 14, 21), shift (4, 3, 3)), odd patch
    merging, a window shrunk to the height (the relative position table's first 280 x 280 entries),
    shifted and padded in T and W (stage 2), T-only shifts (stages 3, 4); make_encoder_refs.py has the
    list. Features and logits within 1e-4, and the output shape (B, T/2, H/32, W/32, 8 * embed_dim)."""
    sd = _fixture_sd("swin_tiny.pth")
    ref = np.load(FIXTURES / "swin_tiny.npz")
    model = _tiny_swin(num_classes=10).eval()
    result = model.load_state_dict(sd, strict=False)  # the fixture leaves out the (computed) index buffers
    assert not result.unexpected_keys and all(k.endswith(".relative_position_index") for k in result.missing_keys)
    x = torch.from_numpy(ref["x"]).float()
    with torch.inference_mode():
        feats, logits = model.forward_features(x), model(x)
    assert feats.shape == (2, 12, 2, 2, 64)  # sizes round up: T 23 -> 12, H 36 -> 2, W 58 -> 2
    _close(feats, torch.from_numpy(ref["features"]))
    _close(logits, torch.from_numpy(ref["logits"]))
    # the fixture tells the shift apart: without it the features are far off
    for m in model.modules():
        if hasattr(m, "shift_size"):
            m.shift_size = [0, 0, 0]
    with torch.inference_mode():
        assert _rel(model.forward_features(x), torch.from_numpy(ref["features"])) > 1e-2


def test_swin_encoder_on_a_segment_matches_torchvision():
    """One 32-frame 224 x 224 segment as `vis4mer extract --extractor swin` encodes it (ImageNet
    mean/std, the model up to its final norm, mean over time -> 49 tokens) against torchvision."""
    enc = Encoder(EncoderSpec("swin", "model", "tiny"), _fixture_sd("swin_tiny.pth"), device="cpu")
    assert (enc.implementation, enc.spec.tokens, enc.spec.dim) == ("builtin", 49, 64)
    ref = torch.from_numpy(np.load(FIXTURES / "swin_tiny.npz")["segment_tokens"])
    frames = segment_frames()
    _close(enc._forward(enc.preprocess(frames)), ref)
    out = enc.encode(frames)  # float16, as shards store it
    assert out.shape == (1, 49, 64) and out.dtype == np.float16
    np.testing.assert_allclose(out.astype(np.float32), ref.numpy(), rtol=2e-3, atol=2e-3 * float(ref.abs().max()))


def _meta_sd(name: str) -> dict[str, torch.Tensor]:
    """A full-size checkpoint's keys and shapes (tests/fixtures/keys.json), as meta tensors: no memory."""
    shapes = json.loads((FIXTURES / "keys.json").read_text())[name]
    return {k: torch.empty(v, device="meta") for k, v in shapes.items()}


def test_full_size_checkpoints_users_have_fit_key_for_key():
    """timm's vit_large_patch16_224.augreg_in21k and torchvision's swin3d_b (keys and shapes as the
    libraries save them), and swin3d_b in the original repository's layout."""
    vit, swin = _meta_sd("vit_large_patch16_224.augreg_in21k"), _meta_sd("swin3d_b")
    with torch.device("meta"):
        own_vit = VisionTransformer(VIT_ARCHS["large"]).state_dict()
        own_swin = SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=128, depths=[2, 2, 18, 2],
                                     num_heads=[4, 8, 16, 32], window_size=[8, 7, 7], num_classes=400).state_dict()
        assert SwinTransformer3d.from_config(SWIN_ARCHS["large"]).state_dict().keys() == \
            {k for k in own_swin if not k.startswith("head.")}
    shapes = lambda sd: {k: tuple(v.shape) for k, v in sd.items()}  # noqa: E731
    assert shapes(own_vit) == {k: s for k, s in shapes(vit).items() if not k.startswith("head.")}
    assert shapes(own_swin) == shapes(swin)  # head (400 classes) included: key for key
    assert check_weights(EncoderSpec("vit", "released", "large"), vit, "model.safetensors") in ("builtin", "timm")
    spec = EncoderSpec("swin", "model", "large")
    assert check_weights(spec, swin, "swin3d_b.pth") in ("builtin", "torchvision")
    original = to_original_layout(swin)
    assert weights_layout("swin", original) == "original" and weights_layout("swin", swin) == "torchvision"
    check_weights(spec, original, "swin_base_patch244_window877_kinetics600_22k.pth")
    # without the index buffers (computed by the model) it fits too
    check_weights(spec, {k: v for k, v in swin.items() if not k.endswith("relative_position_index")}, "swin3d_b.pth")


def test_original_key_names_map_to_torchvision():
    t = torch.zeros(1)
    assert set(swin_keys_from_original({"backbone.layers.2.blocks.17.mlp.fc2.bias": t,
                                        "backbone.layers.2.blocks.0.attn.relative_position_bias_table": t,
                                        "backbone.layers.2.downsample.reduction.weight": t,
                                        "backbone.patch_embed.norm.weight": t, "backbone.norm.bias": t,
                                        "cls_head.fc_cls.weight": t})) == {
        "features.4.17.mlp.3.bias", "features.4.0.attn.relative_position_bias_table", "features.5.reduction.weight",
        "patch_embed.norm.weight", "norm.bias", "cls_head.fc_cls.weight"}


def test_an_original_video_swin_checkpoint_loads_to_the_same_encoder():
    """The tiny torchvision reference renamed into the original repository's layout, saved as mmaction
    saves (`{"meta": ..., "state_dict": {...}}`), with and without the index buffers: outputs equal."""
    sd = _fixture_sd("swin_tiny.pth")
    spec = EncoderSpec("swin", "model", "tiny")
    x = torch.from_numpy(np.load(FIXTURES / "swin_tiny.npz")["x"]).float()
    tv = Encoder(spec, sd, device="cpu")
    with torch.inference_mode():
        want = tv.model.forward_features(x)
    for source in (sd, tv.model.state_dict()):  # the fixture has no relative_position_index; a model's has
        buf = io.BytesIO()
        torch.save({"meta": {"epoch": 30, "config": "..."}, "state_dict": to_original_layout(source)}, buf)
        orig = load_state_dict(buf.getvalue(), "swin_tiny_original.pth")
        assert weights_layout("swin", orig) == "original"
        assert any(k.startswith("backbone.layers.0.blocks.1.mlp.fc1") for k in orig)
        enc = Encoder(spec, orig, weights_name="swin_tiny_original.pth", device="cpu")
        with torch.inference_mode():
            torch.testing.assert_close(enc.model.forward_features(x), want, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["vit-into-swin", "swin-into-vit", "window", "shallower", "extra"])
def test_a_checkpoint_of_another_architecture_is_refused_naming_the_first_mismatching_key(case):
    swin, vit = _fixture_sd("swin_tiny.pth"), _fixture_sd("vit_tiny.safetensors")
    original = to_original_layout(swin)
    table = "backbone.layers.0.blocks.0.attn.relative_position_bias_table"
    spec, sd, expected = {
        "vit-into-swin": (EncoderSpec("swin", "model", "tiny"), vit,
                          "first mismatch: patch_embed.proj.weight has shape (64, 3, 16, 16): "
                          "expected (8, 3, 2, 4, 4)"),
        "swin-into-vit": (EncoderSpec("vit", "released", "tiny"), swin, "first mismatch: cls_token missing"),
        "window": (EncoderSpec("swin", "model", "tiny"), {**original, table: torch.zeros(3 * 13 * 13, 1)},  # (2, 7, 7)
                   f"first mismatch: features.0.0.attn.relative_position_bias_table ({table} in the file) has "
                   "shape (507, 1): expected (2535, 1)"),
        "shallower": (EncoderSpec("swin", "model", "tiny"), {k: v for k, v in swin.items() if ".6.1." not in k},
                      "first mismatch: features.6.1.norm1.weight missing"),
        "extra": (EncoderSpec("swin", "model", "tiny"), {**swin, "features.6.2.norm1.weight": torch.zeros(64)},
                  "first mismatch: unexpected key features.6.2.norm1.weight"),
    }[case]
    with pytest.raises(EncoderError) as e:
        check_weights(spec, sd, "--weights w.pth")
    assert isinstance(e.value, UserError) and len(str(e.value).splitlines()) == 1
    assert str(e.value).startswith(f"--weights w.pth: keys do not match the {spec.describe()['name']} encoder: ")
    assert expected in str(e.value), str(e.value)
    with pytest.raises(EncoderError):  # the encoder itself refuses the same way
        Encoder(spec, sd, device="cpu")


@pytest.mark.parametrize("extractor", ["vit", "swin"])
def test_autocast_encoders_stay_close_to_float32(extractor):
    """`--dtype bfloat16` (torch.autocast; on CPU here): the same tokens to bfloat16's precision."""
    name = "vit_tiny.safetensors" if extractor == "vit" else "swin_tiny.pth"
    spec = EncoderSpec(extractor, "model", "tiny")
    frames = segment_frames()[0, :2] if extractor == "vit" else segment_frames()
    ref, low = (Encoder(spec, _fixture_sd(name), device="cpu", autocast=a) for a in (None, torch.bfloat16))
    want, got = ref.encode(frames).astype(np.float32), low.encode(frames).astype(np.float32)
    assert got.shape == want.shape and 0 < np.linalg.norm(got - want) / np.linalg.norm(want) < 5e-2


def test_flop_counts():
    """The FLOP counts docs/benchmarks.md's arithmetic uses (multiply-adds x 2): ViT-L/16 61.6 G MACs
    per frame and Video Swin-B 282 G MACs per 32 x 224 x 224 segment, as their papers report."""
    from vis4mer.datasets.encoders import swin_flops_per_segment, vit_flops_per_frame

    assert 122e9 < vit_flops_per_frame(VIT_ARCHS["large"]) < 124e9
    assert 560e9 < swin_flops_per_segment(SWIN_ARCHS["large"]) < 566e9


def test_encoder_throughput_imports_neither_ray_mlflow_omegaconf_nor_fsspec():
    """benchmarks/extract.py's encoder_throughput, as a GPU check script calls it (tiny archs here)."""
    bench = str(ROOT / "benchmarks" / "extract.py")
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('bench_extract', {bench!r})\n"
            "m = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(m)\n"
            "r = [m.encoder_throughput(e, 'cpu', 'float32', 2, 0.0, arch='tiny', warmup=0) for e in ('vit', 'swin')]\n"
            "print(sorted(x for x in ('ray', 'mlflow', 'omegaconf', 'fsspec') if x in sys.modules))\n"
            "print(r[0]['frames_per_s'] == r[0]['items_per_s'] > 0,\n"
            "      r[1]['frames_per_s'] == 32 * r[1]['items_per_s'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[:2] == ["[]", "True True"], out.stdout


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


@pytest.mark.ray
def test_extract_swin_end_to_end(material, tmp_path, capsys, ray_session):
    """`vis4mer extract --extractor swin` with the tiny built-in Video Swin (random init, seed 0) on the
    small videos: one 32-frame segment each -> 49 tokens x 64, a dataset in the shard format that
    `vis4mer data verify` accepts and the training pipeline reads."""
    from vis4mer.datasets.pipeline import eval_videos, read_split, train_batches
    from vis4mer.datasets.reader import ShardReader
    from vis4mer.datasets.windows import device_windows

    out = tmp_path / "swin"
    argv = ["extract", "--videos", str(material["videos"]), "--out", str(out), "--extractor", "swin", "--arch", "tiny",
            "--random-init", "--labels", material["labels"], "--batch-frames", "64", "--progress-s", "0.01",
            "--concurrency", "1"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "4 videos under" in text and "(swin3d_tiny_test, builtin, preprocess model)" in text
    assert "3 encoded, 0 already there, 1 failed" in text
    assert main(["data", "verify", str(out)]) == 0
    assert "3 videos" in capsys.readouterr().out

    ds, rows = _rows(str(out), tokens=49, dim=64)
    assert (ds.task.name, ds.task.tokens_per_frame, ds.task.feature_dim) == ("breakfast", 49, 64)
    # a: 32 frames, sub/b: 24, c: 15 -> one segment each (the last two padded with their final frame)
    assert {v: (r[0], r[1], r[2].shape) for v, r in rows.items()} == {
        "a": (2, "train", (1, 49, 64)), "sub/b": (1, "val", (1, 49, 64)), "c": (3, "test", (1, 49, 64))}
    ref = Encoder(EncoderSpec("swin", "model", "tiny"), seed=0, device="cpu")  # what --random-init (seed 0) builds
    for vid, path in [("a", "a.mp4"), ("sub/b", "sub/b.mp4"), ("c", "c.mkv")]:
        want = ref.encode(decode(str(material["videos"] / path), Sampling("segments")))
        np.testing.assert_allclose(rows[vid][2].astype(np.float32), want.astype(np.float32), atol=2e-2, rtol=1e-2)
    ex = ds.manifest.extractor
    assert (ex["name"], ex["implementation"], ex["preprocess"]) == ("swin3d_tiny_test", "builtin", "model")
    assert (ex["segment_frames"], ex["tokens_per_frame"], ex["feature_dim"]) == (32, 49, 64)
    assert ex["weights"].startswith("random init (seed 0)")
    failures = json.loads((out / "failures.json").read_text())["failures"]
    assert [f["video_id"] for f in failures] == ["broken"]

    # what training reads: 64 segment indices x 49 tokens per example
    assert ds.manifest.format_version == 2
    reader = ShardReader(ds)
    batch = next(iter(train_batches(read_split(ds, "train"), ds.task, batch_size=1, seed=0, epoch=0, reader=reader)))
    assert tuple(batch["x"].shape) == (1, 64 * 49, 64) and batch["y"].tolist() == [2]
    (video,) = list(eval_videos(read_split(ds, "test"), ds.task, reader))
    (windows,) = list(device_windows(video["x"], ds.task, batch_size=4))
    assert tuple(windows.shape) == (1, 64 * 49, 64) and video["video_id"] == "c"
