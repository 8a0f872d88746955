"""Validation on paired sets, shared by the teacher and KT stages: PSNR/SSIM of the model's full-image
restorations (`eval.restore.restore_tensor`, scored by `eval.metrics` as `uniremoval eval` scores:
8-bit rounded, RGB), every rank its share, summed over ranks. Logged per set as
`val/<dataset>/psnr|ssim`, the degraded input's own PSNR as `val/<dataset>/psnr_input` (the
baseline), and `val/mean/psnr` over the sets."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from uniremoval.eval.metrics import METRICS
from uniremoval.stages.trainer import TrainContext
from uniremoval.tracking import VAL_MEAN, val_metric


def capped_size(urls: Iterable[str], cap: int) -> int:
    """How many samples a set capped at `cap` holds: its sample count when its shards (`urls`, the list
    its stream resolved: not listed again, which for a dataset URL is a fetch; local tars counted from
    their headers up to the cap) hold fewer, else `cap` (also when a shard cannot be counted)."""
    from uniremoval.data.shard_stream import count_samples

    n = 0
    for url in urls:
        count = count_samples(url)
        if count is None:
            return cap
        n += count
        if n >= cap:
            return cap
    return n


SSIM_MIN_SIDE = METRICS["ssim"].min_size  # its Gaussian window, filtered without padding


def val_progress(ctx: TrainContext, name: str, stream: Any, cap: int | None) -> Any:
    """The progress of one validation set, rank 0's (the largest share, named so: "3 img" of a set of
    6 on two processes read as images missed). A cap above the set's size is the set, counted in the
    stream's own shard list (listed again by rank 0 alone, a dataset URL's manifest was fetched again,
    and a failed fetch raised on rank 0 only, the others waiting)."""
    from uniremoval.progress import progress_bar

    urls = getattr(stream, "dataset", stream).shards
    share = -(-capped_size(urls, cap) // ctx.world_size) if cap and ctx.rank == 0 else None
    whose = f" (rank 0's share; {ctx.world_size} processes score theirs)" if ctx.world_size > 1 else ""
    return progress_bar(share, f"val {name}{whose}", "img", leave=False, disable=ctx.rank != 0)


def warn_left_out(src: Any, total: dict[str, float], example: dict[str, Any] | None) -> None:
    """Say how many samples of a val set were left out of its scores (`total["bad"]`; an undecodable
    one, a pair without target): unsaid, its means (and best.safetensors) quietly rest on fewer images."""
    if total["bad"]:
        eg = f", e.g. {example.get('key')}: {example['error']}" if example else ""
        warnings.warn(f"validation set {src.name} ({src.shards}): {int(total['bad'])} sample(s) left out of its "
                      f"scores{eg}; it is scored on the other {int(total['n'])}", RuntimeWarning, stacklevel=3)


def _psnr_ssim(restored01: Tensor, target01: Tensor) -> tuple[float, float]:
    from uniremoval.eval import metrics

    return float(metrics.psnr(restored01, target01)[0]), float(metrics.ssim(restored01, target01)[0])


def _input_psnr(x01: Tensor, target01: Tensor) -> float:
    from uniremoval.eval import metrics

    return float(metrics.psnr(x01, target01)[0])


def validate_paired(ctx: TrainContext, model: nn.Module, input_range: str, sources: Iterable[Any],
                    lockstep: bool) -> dict[str, float]:
    """PSNR/SSIM per paired val set; each rank scores its share, sums are combined over ranks.

    `lockstep` (ZeRO-3): every forward is a collective, so all ranks run the same number of
    forwards (ranks out of images repeat their last one, unscored; they agree image by image).
    Images are decoded as they are scored, never held all at once (a full GoPro test set is ~24 GB
    of float pairs); the main process shows a progress bar per set.
    """

    from uniremoval.data.pipelines import eval_samples
    from uniremoval.data.read_ahead import read_ahead
    from uniremoval.eval.restore import restore_tensor

    out: dict[str, float] = {}
    psnrs: list[float] = []
    for src in sources:
        # max_samples: the set's first N samples, the same images on any number of processes
        cap = src.max_samples
        skipped: list[dict[str, Any]] = []  # why samples were left out (an unpaired set: no target)
        stream = eval_samples(src.shards, ctx.rank, ctx.world_size, require=("target",), first=cap)
        items = iter(item for item in read_ahead(stream)  # the next image decodes while this one restores
                     if "error" not in item or skipped.append(item))  # append() is None: the item is left out
        sums = {"psnr": 0.0, "ssim": 0.0, "psnr_input": 0.0, "n": 0.0, "small": 0.0}
        small_key = None  # an image too small for SSIM's window, named in the warning
        bar = val_progress(ctx, src.name, stream, cap)  # (9 images under max_samples 100 showed 9/100)
        last = None
        while True:
            item = next(items, None)
            if lockstep:  # one more forward on every rank while any rank has an image left
                if ctx.all_sum({"left": float(item is not None)})["left"] == 0:
                    break
            elif item is None:
                break
            x = item if item is not None else last
            x01 = ((x["input"] + 1) * 0.5).unsqueeze(0) if x is not None else torch.zeros(1, 3, 64, 64)
            y01 = restore_tensor(model, x01.to(ctx.device), input_range)
            if item is None:
                continue
            last = item
            if min(item["input"].shape[-2:]) < SSIM_MIN_SIDE:
                # Left out of both scores (they average over the same images), not an error: an
                # exception here ended a training run at its first validation, hours in.
                sums["small"] += 1
                small_key = small_key or item.get("key")
                bar.update(1)
                continue
            t01 = ((item["target"] + 1) * 0.5).unsqueeze(0).to(y01.device)
            p, s = _psnr_ssim(y01, t01)
            sums["psnr"] += p
            sums["ssim"] += s
            sums["psnr_input"] += _input_psnr(x01.to(y01.device), t01)
            sums["n"] += 1
            bar.update(1)
        bar.close()
        sums["bad"] = float(len(skipped))
        total = ctx.all_sum(sums)
        if total["small"] and ctx.rank == 0:
            example = f", e.g. {small_key}" if small_key else ""
            warnings.warn(f"validation set {src.name} ({src.shards}): {int(total['small'])} image(s) smaller than "
                          f"{SSIM_MIN_SIDE}x{SSIM_MIN_SIDE} pixels (SSIM's window) left out of its PSNR and SSIM"
                          f"{example}; rebuild the set without them", RuntimeWarning, stacklevel=2)
        if total["n"] == 0:
            if total["small"]:  # said above
                continue
            why = (f"; {len(skipped)} sample(s) left out, e.g. {skipped[0].get('key')}: {skipped[0]['error']}"
                   if skipped else "")
            warnings.warn(f"validation set {src.name} ({src.shards}) gave no usable pairs{why}; validation needs "
                          f"paired shards (input + target), and without a score no best.safetensors is chosen by it",
                          RuntimeWarning, stacklevel=2)
            continue
        if ctx.rank == 0:
            warn_left_out(src, total, skipped[0] if skipped else None)
        for k in ("psnr", "ssim", "psnr_input"):
            out[val_metric(src.name, k)] = total[k] / total["n"]
        psnrs.append(out[val_metric(src.name, "psnr")])
    if psnrs:
        out[val_metric(VAL_MEAN, "psnr")] = sum(psnrs) / len(psnrs)
    return out
