"""The frozen Transformer encoders of ViS4mer's first stage (../shared/spec/vis4mer-model.md, section 1).

* `vit`: ViT-L/16 at 224 x 224 (timm `vit_large_patch16_224` / `.augreg_in21k`, ImageNet-21k).
  Tokens = `forward_features`: all 197 tokens (CLS first, then the 14 x 14 patches row-major) after
  the final LayerNorm, 1024 dims. timm's own VisionTransformer is used when timm imports; otherwise a
  plain-PyTorch ViT with exactly timm's state-dict keys (patch_embed.proj, cls_token, pos_embed,
  blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}, norm), so one checkpoint serves both.
* `swin`: Video Swin-B on 32-frame segments: the final stage after its LayerNorm, (16, 7, 7, 1024),
  averaged over time -> 49 tokens x 1024. Only torchvision provides it (`swin3d_b`, torchvision's
  state-dict layout); without a working torchvision it is refused with one line.

Weights come only from a file (.pth/.pt/.bin torch state dict, or .safetensors) named by the caller;
nothing is ever downloaded (pretrained=False everywhere). Classifier heads (head.*, pre_logits.*,
fc_norm.*) in a checkpoint are ignored; any other missing, unexpected or misshapen key is an error.

Preprocessing: `released` divides by 255 and normalises nothing (what the authors' LVU features
did); `model` applies the encoder's own mean/std (ImageNet-21k ViT: 0.5/0.5; torchvision's Video
Swin: ImageNet mean/std). No Ray import here.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vis4mer.datasets.errors import UserError

EXTRACTORS = ("vit", "swin")
PREPROCESSING = ("released", "model")
IGNORED_PREFIXES = ("head.", "pre_logits.", "fc_norm.")


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


def _timm_vit(c: ViTConfig) -> nn.Module | None:
    """timm's own ViT-L/16 when timm imports (it needs a torchvision that matches torch)."""
    if c != VIT_ARCHS["large"]:
        return None
    try:
        import timm
    except Exception:  # not installed, or torchvision broken against this torch (RuntimeError)
        return None
    return timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=0)


def _torchvision_swin() -> nn.Module:
    try:
        from torchvision.models.video import swin3d_b
    except Exception as e:
        raise EncoderError("--extractor swin needs torchvision's Video Swin-B (swin3d_b), which does not import "
                           f"here ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}): install "
                           "the torchvision build that matches this torch (pip install 'vis4mer[extract]')") from None
    return swin3d_b(weights=None)


# --- weights -----------------------------------------------------------------------------------


_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32}


def _read_safetensors(data: bytes, where: str) -> dict[str, torch.Tensor]:
    """The safetensors layout (8-byte little-endian header length, JSON header, raw tensors),
    read without the safetensors package."""
    n = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + n])
    except ValueError:
        raise EncoderError(f"{where}: not a safetensors file (unreadable header)") from None
    base, out = 8 + n, {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        raw = data[base + start : base + end]
        if meta["dtype"] == "BF16":
            t = torch.frombuffer(bytearray(raw), dtype=torch.bfloat16).float()
        elif meta["dtype"] in _SAFETENSORS_DTYPES:
            t = torch.from_numpy(np.frombuffer(raw, dtype=_SAFETENSORS_DTYPES[meta["dtype"]]).copy())
        else:
            raise EncoderError(f"{where}: tensor {name}: dtype {meta['dtype']} not supported")
        out[name] = t.reshape(meta["shape"])
    return out


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


def _load_into(model: nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    sd = _check_keys(model, sd, where)
    own = model.state_dict()
    result = model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=False)
    assert not result.unexpected_keys and all(k.startswith(IGNORED_PREFIXES) for k in result.missing_keys)


def _check_keys(model: nn.Module, sd: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    sd = {k: v for k, v in sd.items() if not k.startswith(IGNORED_PREFIXES)}
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(IGNORED_PREFIXES)}  # e.g. a class head
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        parts = ([f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"] if missing else []) + \
                ([f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}"]
                 if unexpected else [])
        raise EncoderError(f"{where}: keys do not match the encoder ({'; '.join(parts)})")
    for k, v in own.items():
        if sd[k].shape != v.shape:
            raise EncoderError(f"{where}: {k} has shape {tuple(sd[k].shape)}: expected {tuple(v.shape)}")
    return sd


def build_model(spec: EncoderSpec) -> tuple[nn.Module, str]:
    """The encoder module (random init) and which implementation provides it."""
    spec.validate()
    if spec.extractor == "vit":
        cfg = VIT_ARCHS[spec.arch]
        model = _timm_vit(cfg) or VisionTransformer(cfg)
        return model, "timm" if type(model).__module__.startswith("timm") else "builtin"
    return _torchvision_swin(), "torchvision"


def check_weights(spec: EncoderSpec, sd: dict[str, torch.Tensor] | None, where: str) -> str:
    """Checks a state dict's keys and shapes against the encoder without allocating it (meta
    device); returns the implementation name. Refuses a swin without torchvision."""
    with torch.device("meta"):
        model, impl = build_model(spec)
    if sd is not None:
        _check_keys(model, sd, where)
    return impl


# --- the encoder -------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncoderSpec:
    extractor: str = "vit"  # vit | swin
    preprocess: str = "released"  # released | model
    arch: str = "large"  # vit: large | tiny (tests)

    def validate(self) -> None:
        if self.extractor not in EXTRACTORS:
            raise EncoderError(f"extractor {self.extractor!r}: expected one of {', '.join(EXTRACTORS)}")
        if self.preprocess not in PREPROCESSING:
            raise EncoderError(f"preprocess {self.preprocess!r}: expected one of {', '.join(PREPROCESSING)}")
        if self.extractor == "vit" and self.arch not in VIT_ARCHS:
            raise EncoderError(f"arch {self.arch!r}: expected one of {', '.join(VIT_ARCHS)}")
        if self.extractor == "swin" and self.arch != "large":
            raise EncoderError("--extractor swin has only the Video Swin-B architecture")
        if self.extractor == "swin" and self.preprocess == "released":
            raise EncoderError("--extractor swin: the spec records no 'released' preprocessing for Video Swin "
                               "features: use --preprocess model")

    @property
    def tokens(self) -> int:
        return VIT_ARCHS[self.arch].tokens if self.extractor == "vit" else 49

    @property
    def dim(self) -> int:
        return VIT_ARCHS[self.arch].dim if self.extractor == "vit" else 1024

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        if self.extractor == "vit":
            return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # timm's config for the ImageNet-21k ViT
        return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's swin3d_b

    def describe(self) -> dict:
        mean, std = self.mean_std
        name = {"vit": f"vit_{self.arch}_patch16_224_in21k", "swin": "swin3d_b"}[self.extractor]
        pre = ("released: RGB / 255, no mean/std normalisation" if self.preprocess == "released"
               else f"model: (RGB / 255 - mean) / std, mean={list(mean)}, std={list(std)}")
        return {"name": name, **asdict(self), "tokens_per_frame": self.tokens, "feature_dim": self.dim,
                "tokens": ("final LayerNorm output, all 197 tokens (CLS first, then 14x14 patches row-major)"
                           if self.extractor == "vit" else
                           "final stage after its LayerNorm (16, 7, 7, 1024), mean over time -> 49 tokens"),
                "preprocessing": pre}


def weights_info(data: bytes | None, name: str | None, seed: int | None = None) -> dict:
    if data is None:
        return {"weights": f"random init (seed {seed}): meaningless features, for tests and benchmarks"}
    return {"weights": name, "weights_sha256": hashlib.sha256(data).hexdigest()}


class Encoder:
    """One frozen encoder on one device: `encode(uint8 frames) -> float16 (n, tokens, dim)`.

    vit frames: (n, 224, 224, 3); swin segments: (n, 32, 224, 224, 3)."""

    def __init__(self, spec: EncoderSpec, state_dict: dict[str, torch.Tensor] | None = None,
                 weights_name: str = "weights", seed: int = 0, device: str | None = None, batch: int = 16):
        spec.validate()
        self.spec, self.batch = spec, max(1, batch)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.manual_seed(seed)
        model, self.implementation = build_model(spec)
        if state_dict is not None:
            _load_into(model, state_dict, weights_name)
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
        if self.spec.extractor == "vit":
            return self.model.forward_features(x)
        m = self.model  # torchvision SwinTransformer3d: (B, 3, T, H, W) -> (B, T/2, H/32, W/32, C)
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
