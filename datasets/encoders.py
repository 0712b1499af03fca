"""The frozen Transformer encoders of ViS4mer's first stage (../shared/spec/vis4mer-model.md, section 1).

* `vit`: ViT-L/16 at 224 x 224 (timm `vit_large_patch16_224` / `.augreg_in21k`, ImageNet-21k).
  Tokens = `forward_features`: all 197 tokens (CLS first, then the 14 x 14 patches row-major) after
  the final LayerNorm, 1024 dims. timm's own VisionTransformer is used when timm imports; otherwise a
  plain-PyTorch ViT with exactly timm's state-dict keys (patch_embed.proj, cls_token, pos_embed,
  blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}, norm), so one checkpoint serves both.
* `swin`: Video Swin-B on 32-frame segments: the final stage after its LayerNorm, (16, 7, 7, 1024),
  averaged over time -> 49 tokens x 1024. torchvision's `swin3d_b` when torchvision imports;
  otherwise a plain-PyTorch Video Swin (`SwinTransformer3d` below) with exactly torchvision's
  state-dict keys and computation (patch_embed -> features -> norm, the same window padding, cyclic
  shift, -100 shift mask and relative position bias).

Weights come only from a file (.pth/.pt/.bin torch state dict, or .safetensors) named by the caller;
nothing is ever downloaded (pretrained=False everywhere). Layouts read: timm's ViT keys; for the
Video Swin, torchvision's keys and the original Video Swin repository's (mmaction: `backbone.`
prefix, `layers.N.blocks.M...`, `layers.N.downsample`, `mlp.fc1/fc2`, usually inside `state_dict`),
mapped to torchvision's (`swin_keys_from_original`). Classifier heads (head.*, pre_logits.*,
fc_norm.*, cls_head.*) in a checkpoint are ignored, and a missing relative_position_index (a buffer
the model computes) is filled in; any other missing, unexpected or misshapen key is an error that
names the first mismatching key.

Preprocessing: `released` divides by 255 and normalises nothing (what the authors' LVU features
did); `model` applies the encoder's own mean/std (ImageNet-21k ViT: 0.5/0.5; torchvision's Video
Swin: ImageNet mean/std). No Ray import here (nor MLflow, omegaconf or fsspec: benchmarks import
this module alone).
"""
from __future__ import annotations

import functools
import hashlib
import io
import math
import re
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vis4mer.datasets.errors import UserError
from vis4mer.datasets.strict_json import parse_json

EXTRACTORS = ("vit", "swin")
PREPROCESSING = ("released", "model")
IGNORED_PREFIXES = ("head.", "pre_logits.", "fc_norm.", "cls_head.")
# buffers the model computes itself: a checkpoint without them is fine (one with them must match in shape)
OPTIONAL_SUFFIXES = (".relative_position_index",)


class EncoderError(UserError):
    """Bad weights, an impossible option, a missing dependency: one line (CLI exit 2)."""


@dataclass(frozen=True)
class ViTConfig:
    img_size: int = 224
    patch: int = 16
    dim: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    eps: float = 1e-6

    @property
    def tokens(self) -> int:
        return (self.img_size // self.patch) ** 2 + 1


# "large" is the paper's ViT-L/16; "tiny" (same 197 tokens, 64 dims, 2 blocks) is for tests only.
VIT_ARCHS = {"large": ViTConfig(), "tiny": ViTConfig(dim=64, depth=2, heads=2)}


# --- a plain-PyTorch ViT with timm's state-dict keys ---------------------------------------


class _PatchEmbed(nn.Module):
    def __init__(self, c: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, c.dim, c.patch, c.patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, 196, D), patches row-major


class _Attention(nn.Module):
    def __init__(self, c: ViTConfig):
        super().__init__()
        self.heads = c.heads
        self.qkv = nn.Linear(c.dim, 3 * c.dim)
        self.proj = nn.Linear(c.dim, c.dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class _Mlp(nn.Module):
    def __init__(self, c: ViTConfig):
        super().__init__()
        hidden = int(c.dim * c.mlp_ratio)
        self.fc1, self.act, self.fc2 = nn.Linear(c.dim, hidden), nn.GELU(), nn.Linear(hidden, c.dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, c: ViTConfig):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(c.dim, eps=c.eps), _Attention(c)
        self.norm2, self.mlp = nn.LayerNorm(c.dim, eps=c.eps), _Mlp(c)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """timm's VisionTransformer (class token, learned position embedding, pre-norm blocks, final
    norm), forward_features only."""

    def __init__(self, c: ViTConfig):
        super().__init__()
        self.config = c
        self.patch_embed = _PatchEmbed(c)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim))
        self.pos_embed = nn.Parameter(torch.randn(1, c.tokens, c.dim) * 0.02)
        self.blocks = nn.Sequential(*[_Block(c) for _ in range(c.depth)])
        self.norm = nn.LayerNorm(c.dim, eps=c.eps)
        nn.init.normal_(self.cls_token, std=1e-6)

    def forward_features(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.norm(self.blocks(x))


# --- a plain-PyTorch Video Swin Transformer with torchvision's state-dict keys ----------------


@dataclass(frozen=True)
class SwinConfig:
    """torchvision's SwinTransformer3d arguments (swin3d_b's values by default)."""

    patch_size: tuple[int, int, int] = (2, 4, 4)
    embed_dim: int = 128
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)
    window_size: tuple[int, int, int] = (8, 7, 7)
    mlp_ratio: float = 4.0

    @property
    def dim(self) -> int:
        return self.embed_dim * 2 ** (len(self.depths) - 1)


# "large" is the paper's Video Swin-B (torchvision swin3d_b); "tiny" (same 49 tokens per segment, 64 dims,
# 2 blocks per stage; not Swin-T) is for tests only, the configuration of tests/fixtures' torchvision reference.
SWIN_ARCHS = {"large": SwinConfig(), "tiny": SwinConfig(embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))}


@functools.lru_cache(maxsize=8)
def _shift_mask(size: tuple[int, int, int], window: tuple[int, ...], shift: tuple[int, ...],
                device: torch.device) -> torch.Tensor:
    """(windows, n, n): 0 within a region of the shifted grid, -100 across regions (torchvision's and
    the original repository's mask, built with their slices: a dimension whose shift is 0 is one region).
    Cached: every shifted block of a stage shares it (never an inference tensor: the cache outlives calls)."""
    with torch.inference_mode(False), torch.no_grad():
        return _build_shift_mask(size, window, shift, device)


def _build_shift_mask(size, window, shift, device) -> torch.Tensor:
    mask = torch.zeros(size, device=device)
    slices = [((0, -window[i]), (-window[i], -shift[i]), (-shift[i], None)) for i in range(3)]
    count = 0
    for d in slices[0]:
        for h in slices[1]:
            for w in slices[2]:
                mask[d[0]:d[1], h[0]:h[1], w[0]:w[1]] = count
                count += 1
    mask = mask.view(size[0] // window[0], window[0], size[1] // window[1], window[1], size[2] // window[2],
                     window[2]).permute(0, 2, 4, 1, 3, 5).reshape(-1, window[0] * window[1] * window[2])
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0)


class _WindowAttention3d(nn.Module):
    """(Shifted) window multi-head self-attention with a relative position bias, on (B, T, H, W, C)."""

    def __init__(self, dim: int, window_size: list[int], shift_size: list[int], num_heads: int):
        super().__init__()
        self.window_size, self.shift_size, self.num_heads = list(window_size), list(shift_size), num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        wd, wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wd - 1) * (2 * wh - 1) * (2 * ww - 1),
                                                                     num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(wd), torch.arange(wh), torch.arange(ww), indexing="ij"))
        coords = coords.flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (n, n, 3)
        rel = rel + torch.tensor([wd - 1, wh - 1, ww - 1], device=rel.device)
        rel = rel * torch.tensor([(2 * wh - 1) * (2 * ww - 1), 2 * ww - 1, 1], device=rel.device)
        self.register_buffer("relative_position_index", rel.sum(-1))  # (n, n), persistent as in torchvision

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h, w, c = x.shape
        window, shift = list(self.window_size), list(self.shift_size)
        for i, s in enumerate((t, h, w)):
            if s <= window[i]:  # a window larger than the input shrinks to it, unshifted
                window[i], shift[i] = s, 0
        pad = [(window[i] - s % window[i]) % window[i] for i, s in enumerate((t, h, w))]
        x = F.pad(x, (0, 0, 0, pad[2], 0, pad[1], 0, pad[0]))  # zeros after norm1, as torchvision
        tp, hp, wp = t + pad[0], h + pad[1], w + pad[2]
        shifted = sum(shift) > 0
        if shifted:
            x = torch.roll(x, shifts=(-shift[0], -shift[1], -shift[2]), dims=(1, 2, 3))
        nt, nh, nw = tp // window[0], hp // window[1], wp // window[2]
        windows, n, heads = nt * nh * nw, window[0] * window[1] * window[2], self.num_heads
        x = x.view(b, nt, window[0], nh, window[1], nw, window[2], c).permute(0, 1, 3, 5, 2, 4, 6, 7)
        x = x.reshape(b * windows, n, c)
        q, k, v = self.qkv(x).reshape(b * windows, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        # torchvision (and the original) index the full window's table with its first n x n entries
        bias = self.relative_position_bias_table[self.relative_position_index[:n, :n].reshape(-1)]
        bias = bias.view(n, n, heads).permute(2, 0, 1)  # (heads, n, n)
        if shifted:  # one mask per window: attend as (B, windows * heads) so the mask broadcasts over B only
            bias = bias.unsqueeze(0) + _shift_mask((tp, hp, wp), tuple(window), tuple(shift), x.device).unsqueeze(1)
            q, k, v = (z.reshape(b, windows * heads, n, -1) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.reshape(1, windows * heads, n, n).to(q.dtype))
            y = y.reshape(b * windows, heads, n, -1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0).to(q.dtype))
        x = self.proj(y.transpose(1, 2).reshape(b * windows, n, c))
        x = x.view(b, nt, nh, nw, window[0], window[1], window[2], c).permute(0, 1, 4, 2, 5, 3, 6, 7)
        x = x.reshape(b, tp, hp, wp, c)
        if shifted:
            x = torch.roll(x, shifts=(shift[0], shift[1], shift[2]), dims=(1, 2, 3))
        return x[:, :t, :h, :w].contiguous()


class _SwinBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, window_size: list[int], shift_size: list[int], mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = _WindowAttention3d(dim, window_size, shift_size, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        hidden = int(dim * mlp_ratio)  # torchvision's MLP: Linear, GELU, Dropout, Linear, Dropout -> mlp.0, mlp.3
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Identity(), nn.Linear(hidden, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchMerging(nn.Module):
    """2 x 2 spatial neighbours -> one token of twice the width (H, W padded to even first)."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim, eps=1e-5)

    def forward(self, x):
        h, w = x.shape[-3:-1]
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]], -1)
        return self.reduction(self.norm(x))


class _PatchEmbed3d(nn.Module):
    def __init__(self, patch_size: list[int], embed_dim: int):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv3d(3, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-5)

    def forward(self, x):  # (B, 3, T, H, W), each padded to a multiple of the patch -> (B, T', H', W', C)
        pad = [(p - s % p) % p for s, p in zip(x.shape[2:], self.patch_size)]
        x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]))
        return self.norm(self.proj(x).permute(0, 2, 3, 4, 1))


class SwinTransformer3d(nn.Module):
    """torchvision's SwinTransformer3d (Video Swin, Liu et al. 2022), inference only, with its argument
    names and state-dict keys: patch_embed.{proj,norm}, features.{2i}.{j}.{norm1, attn.{qkv, proj,
    relative_position_bias_table, relative_position_index}, norm2, mlp.{0,3}} (stage i, block j),
    features.{2i+1}.{reduction, norm} (patch merging), norm, and head with num_classes > 0.

    `forward_features(x)`: (B, 3, T, H, W) -> (B, T/2, H/32, W/32, 8 * embed_dim) (the last stage after
    the final norm; sizes round up); `forward(x)`: mean over those, then the head (num_classes > 0)."""

    def __init__(self, patch_size: list[int], embed_dim: int, depths: list[int], num_heads: list[int],
                 window_size: list[int], mlp_ratio: float = 4.0, num_classes: int = 0):
        super().__init__()
        if not (len(patch_size) == len(window_size) == 3 and len(depths) == len(num_heads)):
            raise ValueError("patch_size and window_size: 3 values (T, H, W); depths and num_heads: one per stage")
        self.patch_embed = _PatchEmbed3d(patch_size, embed_dim)
        layers: list[nn.Module] = []
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            dim = embed_dim * 2**i
            layers.append(nn.Sequential(*[
                _SwinBlock(dim, heads, window_size, [0 if j % 2 == 0 else s // 2 for s in window_size], mlp_ratio)
                for j in range(depth)]))
            if i < len(depths) - 1:
                layers.append(_PatchMerging(dim))
        self.features = nn.Sequential(*layers)
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(self.num_features, eps=1e-5)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else None
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @classmethod
    def from_config(cls, c: SwinConfig, num_classes: int = 0) -> SwinTransformer3d:
        return cls(patch_size=list(c.patch_size), embed_dim=c.embed_dim, depths=list(c.depths),
                   num_heads=list(c.num_heads), window_size=list(c.window_size), mlp_ratio=c.mlp_ratio,
                   num_classes=num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.features(self.patch_embed(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x).mean(dim=(1, 2, 3))
        return self.head(x) if self.head is not None else x


def swin_keys_from_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original Video Swin repository's keys (mmaction: backbone.layers.N.blocks.M..., mlp.fc1/fc2,
    layers.N.downsample, cls_head.*) -> torchvision's. Other keys pass unchanged."""
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("backbone.")
        if m := re.fullmatch(r"layers\.(\d+)\.blocks\.(\d+)\.(.+)", k):
            rest = re.sub(r"^mlp\.fc1\.", "mlp.0.", re.sub(r"^mlp\.fc2\.", "mlp.3.", m[3]))
            k = f"features.{2 * int(m[1])}.{m[2]}.{rest}"
        elif m := re.fullmatch(r"layers\.(\d+)\.downsample\.(.+)", k):
            k = f"features.{2 * int(m[1]) + 1}.{m[2]}"
        out[k] = v
    return out


def weights_layout(extractor: str, sd: dict[str, torch.Tensor]) -> str:
    """Which key layout a checkpoint uses: "timm" (vit), "torchvision" or "original" (Video Swin)."""
    if extractor == "vit":
        return "timm"
    keys = [k.removeprefix("backbone.") for k in sd]
    return "original" if any(k.startswith("layers.") for k in keys) else "torchvision"


def _looks_like(sd: dict[str, torch.Tensor]) -> str:
    keys = [k.removeprefix("backbone.") for k in sd]
    if any(k.startswith("blocks.") for k in keys) and "cls_token" in keys:
        return "a ViT checkpoint (timm keys)"
    if any(k.startswith("features.") for k in keys):
        return "a Video Swin checkpoint (torchvision keys)"
    if any(k.startswith("layers.") for k in keys):
        return "a Video Swin checkpoint (original repository keys)"
    return ""


def _timm_vit(c: ViTConfig) -> nn.Module | None:
    """timm's own ViT-L/16 when timm imports (it needs a torchvision that matches torch)."""
    if c != VIT_ARCHS["large"]:
        return None
    try:
        import timm
    except Exception:  # not installed, or torchvision broken against this torch (RuntimeError)
        return None
    return timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=0)


def _torchvision_swin(c: SwinConfig) -> nn.Module | None:
    """torchvision's own swin3d_b when torchvision imports (a build that matches this torch)."""
    if c != SWIN_ARCHS["large"]:
        return None
    try:
        from torchvision.models.video import swin3d_b
    except Exception:  # not installed, or built for another torch (RuntimeError, OSError)
        return None
    return swin3d_b(weights=None)


# --- weights -----------------------------------------------------------------------------------


_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32}
_SAFETENSORS_ITEMSIZE = {"BF16": 2, **{k: np.dtype(v).itemsize for k, v in _SAFETENSORS_DTYPES.items()}}


def _read_safetensors(data: bytes, where: str) -> dict[str, torch.Tensor]:
    """The safetensors layout (8-byte little-endian header length, JSON header, raw tensors),
    read without the safetensors package. The header is checked before any tensor is made: an
    object of name -> {dtype (one this reader knows), shape (a list of integers >= 0), data_offsets
    ([begin, end] inside the data, end - begin = the shape's size x the dtype's)}; anything else is
    one EncoderError naming the file and the tensor."""
    if len(data) < 8:
        raise EncoderError(f"{where}: not a safetensors file ({len(data)} bytes: expected an 8-byte header length)")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise EncoderError(f"{where}: not a safetensors file (header of {n} bytes in a file of {len(data)})")
    header = parse_json(data[8 : 8 + n], f"{where}: safetensors header", EncoderError)
    if not isinstance(header, dict):
        raise EncoderError(f"{where}: safetensors header: expected an object of tensors, got {type(header).__name__}")
    base, out = 8 + n, {}
    size = len(data) - base
    for name, meta in header.items():
        if name == "__metadata__":
            if not isinstance(meta, dict):
                raise EncoderError(f"{where}: __metadata__: expected an object, got {type(meta).__name__}")
            continue
        dtype, shape, (start, end) = _tensor_header(meta, size, f"{where}: tensor {name!r:.120}")
        raw = data[base + start : base + end]
        if dtype == "BF16":
            t = torch.frombuffer(bytearray(raw), dtype=torch.bfloat16).float() if raw else torch.zeros(0)
        else:
            t = torch.from_numpy(np.frombuffer(raw, dtype=_SAFETENSORS_DTYPES[dtype]).copy())
        out[name] = t.reshape(shape)
    return out


def _tensor_header(meta, size: int, where: str) -> tuple[str, list[int], list[int]]:
    """One tensor's entry of a safetensors header, checked: (dtype, shape, [begin, end])."""
    if not isinstance(meta, dict):
        raise EncoderError(f"{where}: expected an object with dtype, shape and data_offsets, got "
                           f"{type(meta).__name__}")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in meta:
            raise EncoderError(f"{where}: {key}: required field missing")
    dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _SAFETENSORS_ITEMSIZE:
        raise EncoderError(f"{where}: dtype {dtype!r:.40} not supported: expected one of "
                           f"{', '.join(_SAFETENSORS_ITEMSIZE)}")

    def ints(v) -> bool:
        return isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v)

    if not ints(shape) or math.prod(max(d, 1) for d in shape) >= 2**62:  # (strides of an empty tensor too)
        raise EncoderError(f"{where}: shape {shape!r:.80}: expected a list of integers >= 0 (fewer than 2^62 "
                           "elements)")
    if not ints(offsets) or len(offsets) != 2 or not offsets[0] <= offsets[1] <= size:
        raise EncoderError(f"{where}: data_offsets {offsets!r:.80}: expected [begin, end] with 0 <= begin <= end "
                           f"<= {size} (the bytes after the header)")
    nbytes = _SAFETENSORS_ITEMSIZE[dtype] * math.prod(shape)
    if offsets[1] - offsets[0] != nbytes:
        raise EncoderError(f"{where}: {offsets[1] - offsets[0]} bytes of data: expected {nbytes} for {dtype} of "
                           f"shape {tuple(shape)}")
    return dtype, shape, offsets


def load_state_dict(data: bytes, name: str) -> dict[str, torch.Tensor]:
    """A checkpoint's bytes -> a flat state dict (unwraps {"state_dict"|"model": ...}, "module.")."""
    if name.endswith(".safetensors"):
        sd = _read_safetensors(data, name)
    else:
        try:
            sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:
            raise EncoderError(f"{name}: not a readable torch state dict ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise EncoderError(f"{name}: expected a state dict of tensors")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def _load_into(model: nn.Module, sd: dict[str, torch.Tensor], where: str, spec: EncoderSpec) -> None:
    sd = _check_keys(model, sd, where, spec)
    own = model.state_dict()
    result = model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=False)
    assert not result.unexpected_keys and all(k.startswith(IGNORED_PREFIXES) or k.endswith(OPTIONAL_SUFFIXES)
                                              for k in result.missing_keys)


def _shape(t) -> str:
    return "(" + ", ".join(str(n) for n in t.shape) + ")"


def _check_keys(model: nn.Module, sd: dict[str, torch.Tensor], where: str,
                spec: EncoderSpec) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under the model's keys (an original-layout Video Swin mapped to
    torchvision's, heads dropped); EncoderError naming the first mismatching key, in the model's order."""
    name = spec.describe()["name"]
    original = {}
    if weights_layout(spec.extractor, sd) == "original":
        mapped = swin_keys_from_original(sd)
        original = dict(zip(mapped, sd))  # torchvision key -> the file's
        sd = mapped
    sd = {k: v for k, v in sd.items() if not k.startswith(IGNORED_PREFIXES)}
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(IGNORED_PREFIXES)}  # e.g. a class head
    missing = [k for k in own if k not in sd and not k.endswith(OPTIONAL_SUFFIXES)]
    unexpected = [k for k in sd if k not in own]
    misshapen = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or misshapen:
        def named(k: str) -> str:
            return f"{k} ({original[k]} in the file)" if k in original and original[k] != k else k
        bad = set(missing) | set(misshapen)
        first = next((k for k in own if k in bad), None)
        if first is None:
            why = f"unexpected key {named(unexpected[0])}"
        elif first in missing:
            why = f"{first} missing"
        else:
            why = f"{named(first)} has shape {_shape(sd[first])}: expected {_shape(own[first])}"
        looks = _looks_like(sd if not original else {original[k]: v for k, v in sd.items()})
        raise EncoderError(f"{where}: keys do not match the {name} encoder: first mismatch: {why} ({len(missing)} "
                           f"missing, {len(unexpected)} unexpected, {len(misshapen)} misshapen"
                           f"{'; the file looks like ' + looks if looks else ''})")
    return sd


def build_model(spec: EncoderSpec) -> tuple[nn.Module, str]:
    """The encoder module (random init) and which implementation provides it: timm's ViT-L/16 or
    torchvision's swin3d_b when they import, else the built-in ones (always for the tiny test archs)."""
    spec.validate()
    if spec.extractor == "vit":
        cfg = VIT_ARCHS[spec.arch]
        model = _timm_vit(cfg) or VisionTransformer(cfg)
        return model, "timm" if type(model).__module__.startswith("timm") else "builtin"
    cfg = SWIN_ARCHS[spec.arch]
    model = _torchvision_swin(cfg)
    return (model, "torchvision") if model is not None else (SwinTransformer3d.from_config(cfg), "builtin")


def check_weights(spec: EncoderSpec, sd: dict[str, torch.Tensor] | None, where: str) -> str:
    """Checks a state dict's keys and shapes against the encoder without allocating it (meta
    device); returns the implementation name."""
    with torch.device("meta"):
        model, impl = build_model(spec)
    if sd is not None:
        _check_keys(model, sd, where, spec)
    return impl


# --- the encoder -------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncoderSpec:
    extractor: str = "vit"  # vit | swin
    preprocess: str = "released"  # released | model
    arch: str = "large"  # large: ViT-L/16 or Video Swin-B | tiny: the test-only small archs

    def validate(self) -> None:
        if self.extractor not in EXTRACTORS:
            raise EncoderError(f"extractor {self.extractor!r}: expected one of {', '.join(EXTRACTORS)}")
        if self.preprocess not in PREPROCESSING:
            raise EncoderError(f"preprocess {self.preprocess!r}: expected one of {', '.join(PREPROCESSING)}")
        archs = VIT_ARCHS if self.extractor == "vit" else SWIN_ARCHS
        if self.arch not in archs:
            raise EncoderError(f"arch {self.arch!r}: expected one of {', '.join(archs)}")
        if self.extractor == "swin" and self.preprocess == "released":
            raise EncoderError("--extractor swin: the spec records no 'released' preprocessing for Video Swin "
                               "features: use --preprocess model")

    @property
    def tokens(self) -> int:
        return VIT_ARCHS[self.arch].tokens if self.extractor == "vit" else 49  # (224 / 32)^2

    @property
    def dim(self) -> int:
        return (VIT_ARCHS if self.extractor == "vit" else SWIN_ARCHS)[self.arch].dim

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        if self.extractor == "vit":
            return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # timm's config for the ImageNet-21k ViT
        return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's swin3d_b

    def describe(self) -> dict:
        mean, std = self.mean_std
        name = {"vit": f"vit_{self.arch}_patch16_224_in21k",
                "swin": "swin3d_b" if self.arch == "large" else f"swin3d_{self.arch}_test"}[self.extractor]
        pre = ("released: RGB / 255, no mean/std normalisation" if self.preprocess == "released"
               else f"model: (RGB / 255 - mean) / std, mean={list(mean)}, std={list(std)}")
        return {"name": name, **asdict(self), "tokens_per_frame": self.tokens, "feature_dim": self.dim,
                "tokens": ("final LayerNorm output, all 197 tokens (CLS first, then 14x14 patches row-major)"
                           if self.extractor == "vit" else
                           f"final stage after its LayerNorm (16, 7, 7, {self.dim}), mean over time -> 49 tokens"),
                "preprocessing": pre}


def weights_info(data: bytes | None, name: str | None, seed: int | None = None, layout: str | None = None) -> dict:
    """The manifest's record of the weights; `layout` only when a Video Swin checkpoint had the
    original repository's keys (mapped to torchvision's), so that other manifests stay as they were."""
    if data is None:
        return {"weights": f"random init (seed {seed}): meaningless features, for tests and benchmarks"}
    info = {"weights": name, "weights_sha256": hashlib.sha256(data).hexdigest()}
    if layout == "original":
        info["weights_layout"] = "original Video Swin repository (backbone.layers.N.blocks.M), mapped to torchvision's"
    return info


class Encoder:
    """One frozen encoder on one device: `encode(uint8 frames) -> float16 (n, tokens, dim)`.

    vit frames: (n, 224, 224, 3); swin segments: (n, 32, 224, 224, 3). `autocast` (e.g. torch.float16 or
    torch.bfloat16) runs the forward under torch.autocast (benchmarks; `vis4mer extract` runs fp32)."""

    def __init__(self, spec: EncoderSpec, state_dict: dict[str, torch.Tensor] | None = None,
                 weights_name: str = "weights", seed: int = 0, device: str | None = None, batch: int = 16,
                 autocast: torch.dtype | None = None):
        spec.validate()
        self.spec, self.batch, self.autocast = spec, max(1, batch), autocast
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.manual_seed(seed)
        model, self.implementation = build_model(spec)
        if state_dict is not None:
            _load_into(model, state_dict, weights_name, spec)
        self.model = model.eval().requires_grad_(False).to(self.device)
        mean, std = spec.mean_std
        shape = (1, 3, 1, 1) if spec.extractor == "vit" else (1, 3, 1, 1, 1)
        self.mean = torch.tensor(mean, device=self.device).reshape(shape)
        self.std = torch.tensor(std, device=self.device).reshape(shape)

    def preprocess(self, frames: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device)
        x = x.permute(0, 3, 1, 2) if x.ndim == 4 else x.permute(0, 4, 1, 2, 3)  # -> channels first
        x = x.float().div_(255.0)
        if self.spec.preprocess == "model":
            x = (x - self.mean) / self.std
        return x

    @torch.inference_mode()
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.autocast is not None:
            with torch.autocast(self.device.type, dtype=self.autocast):
                return self._features(x)
        return self._features(x)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.extractor == "vit":
            return self.model.forward_features(x)
        m = self.model  # SwinTransformer3d: (B, 3, T, H, W) -> (B, T/2, H/32, W/32, C)
        if isinstance(m, SwinTransformer3d):
            y = m.forward_features(x)
        else:  # torchvision's: no forward_features (its pos_drop is a Dropout: identity in eval)
            y = m.norm(m.features(m.pos_drop(m.patch_embed(x))))
        return y.mean(dim=1).flatten(1, 2)  # (B, 49, 1024)

    def encode(self, frames: np.ndarray) -> np.ndarray:
        out = [self._forward(self.preprocess(frames[i : i + self.batch])).to("cpu", torch.float16).numpy()
               for i in range(0, len(frames), self.batch)]
        return np.concatenate(out)


def vit_flops_per_frame(c: ViTConfig) -> float:
    """Multiply-adds x 2 of one frame through the ViT (for throughput reports)."""
    n, d = c.tokens, c.dim
    per_block = 2 * n * d * (3 * d + d + 2 * int(d * c.mlp_ratio)) + 2 * 2 * n * n * d
    return per_block * c.depth + 2 * (n - 1) * d * 3 * c.patch**2


def swin_flops_per_segment(c: SwinConfig, frames: int = 32, size: int = 224) -> float:
    """Multiply-adds x 2 of one (frames, size, size) segment through the Video Swin up to its final
    norm (patch embedding, qkv/proj/MLP, attention over the padded windows, patch merging)."""
    pt, ph, pw = c.patch_size
    grid = [-(-frames // pt), -(-size // ph), -(-size // pw)]
    total = 2.0 * grid[0] * grid[1] * grid[2] * c.embed_dim * 3 * pt * ph * pw
    for i, depth in enumerate(c.depths):
        d, n_tok = c.embed_dim * 2**i, grid[0] * grid[1] * grid[2]
        window = [min(w, g) for w, g in zip(c.window_size, grid)]
        padded = 1
        for w, g in zip(window, grid):
            padded *= -(-g // w) * w
        per_block = 2 * n_tok * d * d * (4 + 2 * c.mlp_ratio) + 2 * 2 * padded * window[0] * window[1] * window[2] * d
        total += depth * per_block
        if i < len(c.depths) - 1:
            grid = [grid[0], -(-grid[1] // 2), -(-grid[2] // 2)]
            total += 2 * grid[0] * grid[1] * grid[2] * 4 * d * 2 * d
    return total
