"""MPRNet (Zamir et al., CVPR 2021, "Multi-Stage Progressive Image Restoration").

Written from the paper and from the official state_dict layout in ``../shared/specs/`` so that
official checkpoints load key for key and shape for shape:

* stage 1 works on four quarter patches with an encoder-decoder (U-Net of channel-attention
  blocks, CABs), stage 2 on two half patches, stage 3 at full resolution with the
  original-resolution subnetwork (ORSNet: ORBs of CABs, no down-sampling);
* supervised attention modules (SAM) pass attention-gated features and an intermediate image
  from one stage to the next;
* cross-stage feature fusion (CSFF): stage 1's encoder and decoder features are added into
  stage 2's encoder (1x1 convs ``csff_*``), stage 2's into the ORSNet (``conv_enc*``/``conv_dec*``);
* the output is ``[stage3 + input, stage2, stage1]``.

One ``nn.PReLU`` (a single scalar weight) is shared by every CAB in the network, as in the
official code: the state_dict therefore lists that one tensor under many ``*.body.1.weight`` keys,
while ``parameters()`` yields it once. `checkpoint.py` keeps that meaning when saving/loading.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uniremoval.errors import ConfigError

ARCH_NAME = "mprnet"
# Stage 1 splits the image in four, then the U-Net halves twice: H and W must be multiples of 8.
SIZE_MULTIPLE = 8


@dataclass(frozen=True)
class MPRNetConfig:
    in_c: int = 3
    out_c: int = 3
    n_feat: int = 96
    scale_unetfeats: int = 48
    scale_orsnetfeats: int = 32
    num_cab: int = 8
    kernel_size: int = 3
    reduction: int = 4
    bias: bool = False


PRESETS: dict[str, MPRNetConfig] = {
    # Official deblurring model (GoPro): 20,127,073 parameters.
    "deblur": MPRNetConfig(n_feat=96, scale_unetfeats=48, scale_orsnetfeats=32),
    # Official deraining model (Rain13K): 3,637,249 parameters.
    "derain": MPRNetConfig(n_feat=40, scale_unetfeats=20, scale_orsnetfeats=16),
    # Official denoising model (SIDD).
    "denoise": MPRNetConfig(n_feat=80, scale_unetfeats=48, scale_orsnetfeats=32),
    # CPU tests and the demo: same topology, narrow, one CAB per ORB (~0.2M parameters).
    "tiny": MPRNetConfig(n_feat=12, scale_unetfeats=6, scale_orsnetfeats=4, num_cab=1),
}


def _conv(in_ch: int, out_ch: int, kernel_size: int, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=bias)


class CALayer(nn.Module):
    """Channel attention: global average pool -> 1x1 squeeze -> ReLU -> 1x1 excite -> sigmoid."""

    def __init__(self, channels: int, reduction: int, bias: bool) -> None:
        super().__init__()
        self.conv_du = nn.Sequential(
            nn.Conv2d(channels, channels // reduction, 1, bias=bias),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels // reduction, channels, 1, bias=bias),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x * self.conv_du(x.mean(dim=(2, 3), keepdim=True))


class CAB(nn.Module):
    """Channel attention block: conv-act-conv, channel attention, residual."""

    def __init__(self, channels: int, kernel_size: int, reduction: int, bias: bool, act: nn.Module) -> None:
        super().__init__()
        # Registration order (CA, then body) follows the official state_dict key order.
        self.CA = CALayer(channels, reduction, bias)
        self.body = nn.Sequential(
            _conv(channels, channels, kernel_size, bias), act, _conv(channels, channels, kernel_size, bias)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.CA(self.body(x)) + x


def _cabs(n: int, channels: int, cfg: MPRNetConfig, act: nn.Module) -> nn.Sequential:
    return nn.Sequential(*[CAB(channels, cfg.kernel_size, cfg.reduction, cfg.bias, act) for _ in range(n)])


class SAM(nn.Module):
    """Supervised attention module: predicts the stage image and gates the features with it."""

    def __init__(self, n_feat: int, in_c: int, bias: bool) -> None:
        super().__init__()
        # The official model builds its SAMs with kernel size 1.
        self.conv1 = _conv(n_feat, n_feat, 1, bias)
        self.conv2 = _conv(n_feat, in_c, 1, bias)
        self.conv3 = _conv(in_c, n_feat, 1, bias)

    def forward(self, x: Tensor, x_img: Tensor) -> tuple[Tensor, Tensor]:
        img = self.conv2(x) + x_img
        gated = self.conv1(x) * torch.sigmoid(self.conv3(img))
        return gated + x, img


class DownSample(nn.Module):
    def __init__(self, in_ch: int, s_factor: int) -> None:
        super().__init__()
        # The official bilinear x0.5 (align_corners=False) samples each output pixel at the centre
        # of a 2x2 block with weights 1/4: exactly a 2x2 average pool (sides are even: multiples of
        # 8 / 2), which is cheaper and whose backward scatters without atomics. Then a 1x1 conv, as
        # in the official layout (`down.1.weight`).
        self.down = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(in_ch, in_ch + s_factor, 1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.down(x)


def _upsample2x_axis(x: Tensor, dim: int) -> Tensor:
    """Bilinear x2 along `dim` (align_corners=False): output 2i is 0.75 x[i] + 0.25 x[i-1], output
    2i+1 is 0.75 x[i] + 0.25 x[i+1], the sample past each border being the border one."""
    n = x.shape[dim]
    prev = torch.cat([x.narrow(dim, 0, 1), x.narrow(dim, 0, n - 1)], dim)
    after = torch.cat([x.narrow(dim, 1, n - 1), x.narrow(dim, n - 1, 1)], dim)
    even, odd = x * 0.75 + prev * 0.25, x * 0.75 + after * 0.25
    shape = list(x.shape)
    shape[dim] = 2 * n
    return torch.stack([even, odd], dim + 1).reshape(shape)


def upsample2x(x: Tensor) -> Tensor:
    """Bilinear x2 with align_corners=False (the official ``nn.Upsample``), on N x C x H x W.

    Eager: PyTorch's kernel. Under torch.compile: the same maths as a two-tap stencil per axis
    (bilinear is separable; the weights 1/4, 3/4 are exact in binary). Inductor decomposes the
    native op so that its backward scatters into the input gradient with atomic adds (four
    ``index_put`` with accumulate); the stencil's backward is a gather that fuses with its
    neighbours. Channels-last in, channels-last out (the next convolution's layout).
    """
    if not _compiling():
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    return upsample2x_stencil(x)


def _compiling() -> bool:
    # torch.compiler.is_compiling is torch 2.3+; model.compile needs 2.6+ (fast.require_compile_support),
    # so an older torch only ever runs the model eagerly.
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling()) if is_compiling is not None else False


def upsample2x_stencil(x: Tensor) -> Tensor:
    """`upsample2x`'s compiled form (callable eagerly too: bench/gpu.py times both). At least fp32
    inside, rounded once at the end as PyTorch's kernel does (under bf16 autocast the input is bf16; the
    compiled kernel upcasts in registers, so this costs no memory traffic)."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    y = _upsample2x_axis(_upsample2x_axis(x.to(torch.promote_types(x.dtype, torch.float32)), 3), 2).to(x.dtype)
    return y.contiguous(memory_format=torch.channels_last) if channels_last else y


class UpSample(nn.Module):
    def __init__(self, in_ch: int, s_factor: int) -> None:
        super().__init__()
        # Official layout: bilinear x2, then a 1x1 conv (`up.1.weight`).
        self.up = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Conv2d(in_ch + s_factor, in_ch, 1, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        # Run in the other order: a 1x1 conv mixes channels pixel by pixel and the bilinear x2 mixes
        # pixels channel by channel with weights summing to 1, so the two commute exactly. Conv
        # first works on a quarter of the pixels and leaves fewer channels to up-sample.
        _, conv = self.up  # the nn.Upsample keeps the official layout (`up.1.weight`); upsample2x is its maths
        return upsample2x(conv(x))


class SkipUpSample(UpSample):
    def forward(self, x: Tensor, skip: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x) + skip


class Encoder(nn.Module):
    """Three-level U-Net encoder (2 CABs per level); with CSFF it adds the previous stage's features."""

    def __init__(self, cfg: MPRNetConfig, act: nn.Module, csff: bool) -> None:
        super().__init__()
        c1, s = cfg.n_feat, cfg.scale_unetfeats
        widths = (c1, c1 + s, c1 + 2 * s)
        self.encoder_level1 = _cabs(2, widths[0], cfg, act)
        self.encoder_level2 = _cabs(2, widths[1], cfg, act)
        self.encoder_level3 = _cabs(2, widths[2], cfg, act)
        self.down12 = DownSample(widths[0], s)
        self.down23 = DownSample(widths[1], s)
        self.csff = csff
        if csff:
            for i, w in enumerate(widths, start=1):
                setattr(self, f"csff_enc{i}", nn.Conv2d(w, w, 1, bias=cfg.bias))
            for i, w in enumerate(widths, start=1):
                setattr(self, f"csff_dec{i}", nn.Conv2d(w, w, 1, bias=cfg.bias))

    def forward(
        self, x: Tensor, encoder_outs: list[Tensor] | None = None, decoder_outs: list[Tensor] | None = None
    ) -> list[Tensor]:
        fuse = encoder_outs is not None and decoder_outs is not None
        outs: list[Tensor] = []
        levels = (self.encoder_level1, self.encoder_level2, self.encoder_level3)
        downs = (self.down12, self.down23)
        for i, level in enumerate(levels):
            if i > 0:
                x = downs[i - 1](x)
            x = level(x)
            if fuse:
                x = (
                    x
                    + getattr(self, f"csff_enc{i + 1}")(encoder_outs[i])  # type: ignore[index]
                    + getattr(self, f"csff_dec{i + 1}")(decoder_outs[i])  # type: ignore[index]
                )
            outs.append(x)
        return outs


class Decoder(nn.Module):
    """Three-level U-Net decoder with CAB-refined skip connections."""

    def __init__(self, cfg: MPRNetConfig, act: nn.Module) -> None:
        super().__init__()
        c1, s = cfg.n_feat, cfg.scale_unetfeats
        self.decoder_level1 = _cabs(2, c1, cfg, act)
        self.decoder_level2 = _cabs(2, c1 + s, cfg, act)
        self.decoder_level3 = _cabs(2, c1 + 2 * s, cfg, act)
        self.skip_attn1 = CAB(c1, cfg.kernel_size, cfg.reduction, cfg.bias, act)
        self.skip_attn2 = CAB(c1 + s, cfg.kernel_size, cfg.reduction, cfg.bias, act)
        self.up21 = SkipUpSample(c1, s)
        self.up32 = SkipUpSample(c1 + s, s)

    def forward(self, outs: list[Tensor]) -> list[Tensor]:
        enc1, enc2, enc3 = outs
        dec3 = self.decoder_level3(enc3)
        dec2 = self.decoder_level2(self.up32(dec3, self.skip_attn2(enc2)))
        dec1 = self.decoder_level1(self.up21(dec2, self.skip_attn1(enc1)))
        return [dec1, dec2, dec3]


class ORB(nn.Module):
    """Original-resolution block: `num_cab` CABs and a conv, with a residual."""

    def __init__(self, channels: int, cfg: MPRNetConfig, act: nn.Module) -> None:
        super().__init__()
        body: list[nn.Module] = [
            CAB(channels, cfg.kernel_size, cfg.reduction, cfg.bias, act) for _ in range(cfg.num_cab)
        ]
        # The official ORB's closing conv always has bias=False (its `conv()` default).
        body.append(_conv(channels, channels, cfg.kernel_size, bias=False))
        self.body = nn.Sequential(*body)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x) + x


class ORSNet(nn.Module):
    """Stage 3: three ORBs at full resolution, fused with stage 2's (up-sampled) U-Net features."""

    def __init__(self, cfg: MPRNetConfig, act: nn.Module) -> None:
        super().__init__()
        c1, s, o = cfg.n_feat, cfg.scale_unetfeats, cfg.scale_orsnetfeats
        self.orb1 = ORB(c1 + o, cfg, act)
        self.orb2 = ORB(c1 + o, cfg, act)
        self.orb3 = ORB(c1 + o, cfg, act)
        self.up_enc1 = UpSample(c1, s)
        self.up_dec1 = UpSample(c1, s)
        self.up_enc2 = nn.Sequential(UpSample(c1 + s, s), UpSample(c1, s))
        self.up_dec2 = nn.Sequential(UpSample(c1 + s, s), UpSample(c1, s))
        for name in ("conv_enc1", "conv_enc2", "conv_enc3", "conv_dec1", "conv_dec2", "conv_dec3"):
            setattr(self, name, nn.Conv2d(c1, c1 + o, 1, bias=cfg.bias))

    def forward(self, x: Tensor, encoder_outs: list[Tensor], decoder_outs: list[Tensor]) -> Tensor:
        x = self.orb1(x)
        x = x + self.conv_enc1(encoder_outs[0]) + self.conv_dec1(decoder_outs[0])
        x = self.orb2(x)
        x = x + self.conv_enc2(self.up_enc1(encoder_outs[1])) + self.conv_dec2(self.up_dec1(decoder_outs[1]))
        x = self.orb3(x)
        x = x + self.conv_enc3(self.up_enc2(encoder_outs[2])) + self.conv_dec3(self.up_dec2(decoder_outs[2]))
        return x


def pad_to_multiple(x: Tensor, multiple: int = SIZE_MULTIPLE) -> tuple[Tensor, int, int]:
    """Pad bottom/right to the next multiple (reflect, as the official demo does); return (x, h, w).

    Reflect padding needs the pad to be smaller than the side; images smaller than that (a few
    pixels) fall back to replicate padding instead of failing.
    """
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    if pad_h == 0 and pad_w == 0:
        return x, h, w
    mode = "reflect" if pad_h < h and pad_w < w else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode), h, w


class MPRNet(nn.Module):
    """MPRNet, parameter-for-parameter the official network.

    ``forward(x)`` returns ``[final, stage2_img, stage1_img]`` where ``final = stage3 + x``.
    ``forward(x, return_feature=True)`` returns ``(images, feature)``.

    The feature for the feature-grained contrastive loss (L_fg) is the ORSNet output of stage 3,
    i.e. the input of the final ``tail`` conv: shape (N, n_feat + scale_orsnetfeats, H, W).
    Why this one: it is the deepest, most refined feature and the only stage-3 feature at full
    resolution (needed because the cache pools it on a 16x16-pixel grid of the whole image); the
    restored image is a single 3x3 conv of it, so matching it to the teacher's constrains exactly
    the representation the output is read from, while leaving the student free in earlier
    stages. It costs no extra forward pass. ``feature_channels`` gives its channel count.

    Inputs whose height/width are not multiples of 8 are reflect-padded at the bottom/right and
    every output (images and feature) is cropped back to the input size.
    """

    arch = ARCH_NAME

    def __init__(self, preset: str = "deblur", **overrides: object) -> None:
        super().__init__()
        if preset not in PRESETS:
            raise ConfigError(f"unknown MPRNet preset {preset!r}; choose one of {sorted(PRESETS)}")
        fields = set(MPRNetConfig.__dataclass_fields__)
        unknown = set(overrides) - fields
        if unknown:
            raise ConfigError(f"unknown MPRNet option(s) {sorted(unknown)}; valid: {sorted(fields)}")
        cfg = replace(PRESETS[preset], **overrides)  # type: ignore[arg-type]
        self.preset = preset
        self.config = cfg
        self.overrides = dict(overrides)
        self.feature_channels: int = cfg.n_feat + cfg.scale_orsnetfeats

        # A single PReLU shared by every CAB (official semantics).
        act = nn.PReLU()
        k, b = cfg.kernel_size, cfg.bias
        for i in (1, 2, 3):
            setattr(
                self,
                f"shallow_feat{i}",
                nn.Sequential(_conv(cfg.in_c, cfg.n_feat, k, b), CAB(cfg.n_feat, k, cfg.reduction, b, act)),
            )
        self.stage1_encoder = Encoder(cfg, act, csff=False)
        self.stage1_decoder = Decoder(cfg, act)
        self.stage2_encoder = Encoder(cfg, act, csff=True)
        self.stage2_decoder = Decoder(cfg, act)
        self.stage3_orsnet = ORSNet(cfg, act)
        self.sam12 = SAM(cfg.n_feat, cfg.in_c, b)
        self.sam23 = SAM(cfg.n_feat, cfg.in_c, b)
        self.concat12 = _conv(cfg.n_feat * 2, cfg.n_feat, k, b)
        self.concat23 = _conv(cfg.n_feat * 2, cfg.n_feat + cfg.scale_orsnetfeats, k, b)
        self.tail = _conv(cfg.n_feat + cfg.scale_orsnetfeats, cfg.out_c, k, b)

    def forward(self, x: Tensor, return_feature: bool = False):
        x_pad, h, w = pad_to_multiple(x)
        images, feature = self._forward_padded(x_pad)
        if x_pad.shape[-2:] != x.shape[-2:]:
            images = [im[..., :h, :w] for im in images]
            feature = feature[..., :h, :w]
        if return_feature:
            return images, feature
        return images

    def _forward_padded(self, x3_img: Tensor) -> tuple[list[Tensor], Tensor]:
        # Stage 2 sees two half patches (top/bottom), stage 1 four quarter patches. The patches of
        # a stage go through its networks together, stacked on the batch dimension ([top; bottom],
        # [top-left; top-right; bottom-left; bottom-right]): every layer works per sample, so this is
        # the official per-patch computation, in one call with N x patches samples instead of one
        # call per patch (a quarter of the kernel launches in stage 1, each on 4x the pixels).
        halves_img = torch.cat(_split(x3_img, 2), 0)  # [top; bottom]
        quarters_img = torch.cat(_split(halves_img, 3), 0)  # [left of each half; right of each half]

        # ---- Stage 1: encode the quarters, join left/right into halves, decode the halves.
        feat1 = [_join_left_right(f) for f in self.stage1_encoder(self.shallow_feat1(quarters_img))]
        res1 = self.stage1_decoder(feat1)
        x2_sam, stage1_halves = self.sam12(res1[0], halves_img)
        stage1_img = _join_top_bottom(stage1_halves)

        # ---- Stage 2: shallow features + SAM features, encoder with CSFF from stage 1.
        x2 = self.concat12(torch.cat((self.shallow_feat2(halves_img), x2_sam), 1))
        feat2 = [_join_top_bottom(f) for f in self.stage2_encoder(x2, feat1, res1)]
        res2 = self.stage2_decoder(feat2)
        x3_sam, stage2_img = self.sam23(res2[0], x3_img)

        # ---- Stage 3: full resolution ORSNet with CSFF from stage 2.
        x3 = self.concat23(torch.cat((self.shallow_feat3(x3_img), x3_sam), 1))
        feature = self.stage3_orsnet(x3, feat2, res2)
        stage3_img = self.tail(feature)
        return [stage3_img + x3_img, stage2_img, stage1_img], feature


def _split(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """The first and second half of `x` along `dim` (H or W: multiples of 8, so halves are equal)."""
    half = x.shape[dim] // 2
    return x.narrow(dim, 0, half), x.narrow(dim, half, half)


def _join_left_right(quarters: Tensor) -> Tensor:
    """(4N, ...) stacked [left halves; right halves] -> (2N, ...) halves with both sides side by side."""
    left, right = quarters.chunk(2, 0)
    return torch.cat((left, right), 3)


def _join_top_bottom(halves: Tensor) -> Tensor:
    """(2N, ...) stacked [top; bottom] -> (N, ...) with the halves one above the other."""
    top, bottom = halves.chunk(2, 0)
    return torch.cat((top, bottom), 2)


def infer_config(shapes: dict[str, tuple[int, ...]]) -> MPRNetConfig | None:
    """Read the MPRNet hyper-parameters back from a state_dict's key shapes (None if not MPRNet)."""
    try:
        n_feat, in_c, kernel_size, _ = shapes["shallow_feat1.0.weight"]
        squeeze = shapes["shallow_feat1.1.CA.conv_du.0.weight"][0]
        enc2 = shapes["stage1_encoder.encoder_level2.0.body.0.weight"][0]
        out_c, tail_in = shapes["tail.weight"][:2]
    except (KeyError, ValueError):
        return None
    num_cab = sum(
        1 for k in shapes if k.startswith("stage3_orsnet.orb1.body.") and k.endswith(".body.0.weight")
    )
    return MPRNetConfig(
        in_c=in_c,
        out_c=out_c,
        n_feat=n_feat,
        scale_unetfeats=enc2 - n_feat,
        scale_orsnetfeats=tail_in - n_feat,
        num_cab=num_cab,
        kernel_size=kernel_size,
        reduction=max(1, n_feat // max(1, squeeze)),
        bias="shallow_feat1.0.bias" in shapes,
    )


def preset_and_overrides(cfg: MPRNetConfig) -> tuple[str, dict]:
    """Express a config as the closest preset plus the fields that differ from it."""
    best = min(
        PRESETS,
        key=lambda name: sum(
            getattr(PRESETS[name], f) != getattr(cfg, f) for f in MPRNetConfig.__dataclass_fields__
        ),
    )
    base = PRESETS[best]
    overrides = {
        f: getattr(cfg, f) for f in MPRNetConfig.__dataclass_fields__ if getattr(base, f) != getattr(cfg, f)
    }
    return best, overrides
