"""`uniremoval restore`: restore one image or a folder of images with a checkpoint.

Accepts our checkpoints (.safetensors + .json) and official MPRNet .pth files. Writes one 8-bit RGB
PNG per input with the same stem (sub-folders mirrored), the size of the input as it is displayed
(EXIF orientation applied: see `eval.restore.read_image_oriented`). Hidden files (.DS_Store, macOS's
._<name>) are not inputs. Nothing but restore's own earlier outputs is ever overwritten (they carry
a PNG text chunk, `eval.restore.WRITTEN_BY`). Unreadable inputs are reported by name and skipped; the exit status is 1
when any failed, after all others are written.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "restore",
        help="restore images with a checkpoint (ours or an official MPRNet .pth)",
        description="Restore a PNG/JPEG/BMP/TIFF/WebP/PPM/PGM/PBM image or every such image under a folder (hidden "
        "files skipped); writes 8-bit RGB PNGs with the same stem into --output, upright (EXIF orientation "
        "applied) and the input's size. Official MPRNet .pth files work on [0, 1] images, ours on [-1, 1]: "
        "the checkpoint's metadata decides.",
    )
    p.add_argument(
        "--checkpoint", required=True, help="our .safetensors (JSON beside it), an official .pth, or the weights "
        "a training run logged to MLflow: runs:/<run id>/weights/last (store: --tracking-uri)"
    )
    p.add_argument("--tracking-uri", help="MLflow URI of a runs:/ --checkpoint (default: $MLFLOW_TRACKING_URI, "
                   "else sqlite:///./mlflow.db)")
    p.add_argument(
        "--arch", default=None, help="architecture (default: from the checkpoint; official: mprnet)"
    )
    p.add_argument(
        "--preset",
        default=None,
        help="the architecture's preset, e.g. MPRNet's deblur/derain/denoise/tiny (default: from the checkpoint's "
             "JSON, or inferred from an official .pth's shapes)",
    )
    p.add_argument("--input", required=True, help="an image file or a folder (searched recursively)")
    p.add_argument("--output", required=True, help="folder for the restored PNGs")
    p.add_argument("--tile", type=int, default=None, help="tile size in px for large images (default: none)")
    p.add_argument("--tile-overlap", type=int, default=None,
                   help="overlap between tiles in px (default 32; less than --tile)")
    p.add_argument("--batch-size", type=int, default=4,
                   help="images of one size, or windows of one image with --tile, per forward pass (default 4; on the "
                   "CPU at most 128x128x4 pixels a pass)")
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available, else cpu"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys
    import time
    from contextlib import closing

    import torch
    from tqdm import tqdm

    from uniremoval.data.read_ahead import read_ahead
    from uniremoval.errors import DataError
    from uniremoval.eval.restore import (
        available_memory,
        images_per_pass,
        png_bytes,
        read_image,
        restore_tensor,
        rgb_icc_profile,
        same_size_batches,
        untiled_shortfall,
    )
    from uniremoval.io import WriteBehind
    from uniremoval.models.checkpoint import load_checkpoint
    from uniremoval.progress import progress_bar
    from uniremoval.tracking import fetch_run_checkpoint, is_run_artifact

    overlap, device = _check_options(args)
    in_root = Path(args.input)
    out_root = Path(args.output)
    plan = _plan_outputs(_inputs(in_root, out_root), in_root, out_root)

    # What a restore killed mid-write (kill -9) left beside an output it was writing: each requeue would
    # add an image-sized hidden file (a SIGTERM removes its own).
    from uniremoval.io import leftover_temporaries

    for _src, dst in plan:
        for tmp in leftover_temporaries(dst):
            tmp.unlink(missing_ok=True)

    if is_run_artifact(args.checkpoint):  # the weights a run logged: fetched, or the copy checked against it
        fetch_run_checkpoint(args.checkpoint, args.tracking_uri)
    model, meta = load_checkpoint(args.checkpoint, arch=args.arch, preset=args.preset, map_location=device,
                                  restorer=True)
    from uniremoval.models.ranges import recorded_range

    input_range = recorded_range(meta)

    failed: list[str] = []
    free = available_memory() if device == "cpu" else None
    tiles_bar: list = []  # the bar over the current image's tiles, once it has more than one batch
    # On a terminal the tiles get a bar of their own; in a log (a batch job) a nested bar writes cursor
    # movements, so a plain line is printed at each tenth of the tiles instead.
    tiles_shown = {"name": "", "tenth": 0}
    on_terminal = sys.stderr.isatty()
    # Pixels of the smallest batch of images that ran out of memory: batches as large go image by image.
    too_many_pixels = [float("inf")]

    def on_tiles(done: int, total: int) -> None:
        if total <= args.batch_size:
            return
        if not on_terminal:
            if (tenth := done * 10 // total) > tiles_shown["tenth"]:
                tiles_shown["tenth"] = tenth
                tqdm.write(f"  tiles: {done}/{total} ({tiles_shown['name']})", file=sys.stderr)
            return
        if not tiles_bar:
            tiles_bar.append(tqdm(total=total, desc="  tiles", unit="tile", file=sys.stderr, leave=False))
        tiles_bar[0].update(done - tiles_bar[0].n)

    def decoded():
        """(src, dst, image or None, the reading's error or None), read ahead in a thread (read_ahead):
        an image that fails to read is skipped below like one that fails to restore."""
        for src, dst in plan:
            try:
                yield src, dst, read_image(src), None
            except Exception as exc:  # noqa: BLE001 - raised again in restore_one, where it is handled
                yield src, dst, None, exc

    def batch_key(item):
        """Images of one size restore as one batch; one that fails to read or is cut in tiles goes alone."""
        x, read_error = item[2], item[3]
        if read_error is not None:
            return None
        h, w = x.shape[-2:]
        if args.tile is not None and (h > args.tile or w > args.tile):
            return None
        # an image that goes through the model alone anyway (CPU_PASS_PIXELS) does not wait for partners
        return None if images_per_pass(args.batch_size, h, w, device) == 1 else (h, w)

    def write(src: Path, dst: Path, y: torch.Tensor) -> None:
        writer.submit(dst, png_bytes, y.cpu(), icc_profile=rgb_icc_profile(src))

    def restore_batch(group: list) -> bool:
        """Restore same-size images in one pass; False when they do not fit together (then one by one)."""
        x = torch.stack([item[2] for item in group])
        pixels = x.numel() // 3
        per_pass = images_per_pass(len(group), *x.shape[-2:], device)
        if pixels >= too_many_pixels[0] or untiled_shortfall(model, *x.shape[-2:], per_pass, args.tile, free):
            return False
        try:
            y = restore_tensor(model, x, input_range, tile=args.tile, tile_overlap=overlap,
                               batch_size=len(group))
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
        except (MemoryError, RuntimeError) as exc:
            if not isinstance(exc, MemoryError) and not _cpu_out_of_memory(exc):
                raise
        else:
            for (src, dst, _, _), yi in zip(group, y):
                write(src, dst, yi)
            return True
        too_many_pixels[0] = pixels
        return False

    def restore_one(src: Path, dst: Path, x: torch.Tensor | None, read_error: Exception | None) -> None:
        try:
            if read_error is not None:
                raise read_error
            h, w = x.shape[-2:]
            tiles_shown.update(name=src.name, tenth=0)
            short = untiled_shortfall(model, h, w, 1, args.tile, free)
            if short:
                # On the CPU the kernel kills a process that runs out (no error to catch, and this
                # summary is lost): an image that surely does not fit is skipped, saying what it needs.
                failed.append(str(src))
                tqdm.write(f"skipped: {src}: {short}; rerun with --tile 512 (or smaller)", file=sys.stderr)
                return
            y = restore_tensor(model, x.unsqueeze(0), input_range, tile=args.tile, tile_overlap=overlap,
                               batch_size=args.batch_size, on_tiles=on_tiles)
            write(src, dst, y[0])
        except DataError as exc:
            failed.append(str(src))
            tqdm.write(f"skipped: {exc}", file=sys.stderr)
        except torch.cuda.OutOfMemoryError:
            failed.append(str(src))
            torch.cuda.empty_cache()
            tqdm.write(f"skipped: {src}: out of GPU memory; try --tile 512 (or smaller)", file=sys.stderr)
        except (MemoryError, RuntimeError) as exc:
            # On CPU an allocation that does not fit is a RuntimeError from torch's allocator.
            if not isinstance(exc, MemoryError) and not _cpu_out_of_memory(exc):
                raise
            failed.append(str(src))
            tqdm.write(f"skipped: {src}: out of memory; try --tile 512 (or smaller)", file=sys.stderr)
        finally:
            if tiles_bar:
                tiles_bar.pop().close()

    # Decoding the next images and encoding the last outputs (2 threads) overlap the restore: at 720p a
    # PNG takes ~330 ms to encode, longer than a GPU takes to restore it. Up to two batches' worth of
    # decoded images wait for same-size partners.
    # `with` for the bar too: a stop (Ctrl-C, SIGTERM) closes it before cli.main prints its one line, which
    # was otherwise glued to the bar's last drawing
    started = time.time()
    try:
        # (`closing`: a stop stops the reading thread at once, not when the generator is collected)
        with WriteBehind(workers=2, pending=2 * args.batch_size) as writer, \
                closing(read_ahead(decoded(), depth=max(2, args.batch_size))) as images, \
                progress_bar(len(plan), "restore", "img") as bar:
            for group in same_size_batches(images, batch_key, args.batch_size, max_buffered=2 * args.batch_size):
                if len(group) == 1 or not restore_batch(group):
                    for item in group:
                        restore_one(*item)
                bar.update(len(group))
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM as cli.main raises it: say what is there, then stop
        written = sum(1 for _, dst in plan if dst.is_file() and dst.stat().st_mtime >= started)
        print(f"restore: stopped; {written} of {len(plan)} image(s) written into {out_root} by this run (a rerun "
              f"restores every image again, replacing restore's own outputs)", file=sys.stderr)
        raise
    done = len(plan) - len(failed)
    print(f"restored {done} of {len(plan)} image(s) into {out_root}", file=sys.stderr)
    if failed:
        print(f"failed ({len(failed)}): " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


def _check_options(args: argparse.Namespace) -> tuple[int, str]:
    """The tile overlap and the device, the options checked before any work (restore_tensor would
    refuse a bad tiling only at the first image)."""
    import torch

    from uniremoval.errors import UniremovalError
    from uniremoval.eval.restore import TILE_OVERLAP, tiling_problem

    if args.tile_overlap is not None and args.tile is None:
        raise UniremovalError(f"--tile-overlap {args.tile_overlap} without --tile: images are restored whole; "
                              "give --tile too (e.g. --tile 512), or drop --tile-overlap")
    overlap = TILE_OVERLAP if args.tile_overlap is None else args.tile_overlap
    if problem := tiling_problem(args.tile, overlap):
        default = " (the default)" if args.tile_overlap is None else ""
        raise UniremovalError(f"--tile {args.tile} with --tile-overlap {overlap}{default}: {problem}; "
                              f"e.g. --tile 512, or a smaller --tile-overlap")
    if args.batch_size < 1:
        raise UniremovalError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UniremovalError("--device cuda: no CUDA device is available here; use --device cpu")
    return overlap, device


def _inputs(in_root: Path, out_root: Path) -> list[Path]:
    """The images to restore under `in_root` (or the one file), once --output is known to be a folder
    that can be written: never restore's own earlier outputs, even in an --output inside --input."""
    import sys

    from uniremoval.data.readers import IMAGE_EXTS
    from uniremoval.errors import DataError, UniremovalError
    from uniremoval.eval.restore import list_images, other_formats_note, written_by_restore
    from uniremoval.io import check_output

    if out_root.exists() and not out_root.is_dir():
        raise UniremovalError(
            f"--output {out_root} is a file, not a folder; give a folder (the restored images are "
            f"written into it as <name>.png)"
        )
    if not out_root.exists() and out_root.suffix.lower() in IMAGE_EXTS:
        raise UniremovalError(
            f"--output {out_root} names an image file, but it is the folder the restored images are "
            f"written into (as <name>.png): give a folder, e.g. --output {out_root.parent / 'restored'}"
        )
    check_output(out_root, "--output", folder=True)
    others: list[Path] = []
    files = list_images(in_root, others, skip=out_root)  # a rerun does not restore its own outputs
    own: set[Path] = set()
    if in_root.is_dir():
        # --output the --input folder itself (restored PNGs beside the photos): a PNG an earlier run
        # wrote there would be its own output; it is that run's output, to be replaced, not an input.
        own = {f for f in files if f.suffix.lower() == ".png" and
               (out_root / f.relative_to(in_root)).resolve() == f.resolve() and written_by_restore(f)}
        files = [f for f in files if f not in own]
    if others:
        print(other_formats_note(others, "restore"), file=sys.stderr)
    if own:
        print(f"note: restore left out {len(own)} PNG(s) in --output that an earlier restore wrote (e.g. "
              f"{min(own)}): they are its outputs, replaced by this run, not inputs", file=sys.stderr)
    if not files:
        earlier = f" (its {len(own)} PNG(s) written by an earlier restore are not inputs)" if own else ""
        raise DataError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) under {in_root}{earlier}")
    return files


def _plan_outputs(files: list[Path], in_root: Path, out_root: Path) -> list[tuple[Path, Path]]:
    """(input, output PNG) per image, every name planned before any work: refused when an output
    would overwrite an input, a file restore did not write, or when two inputs share one output."""
    from uniremoval.errors import UniremovalError
    from uniremoval.eval.restore import written_by_restore

    plan: list[tuple[Path, Path]] = []
    seen: dict[Path, Path] = {}
    inputs = {src.resolve(): src for src in files}
    foreign: list[Path] = []
    clashes: list[str] = []
    for src in files:
        rel = src.relative_to(in_root).with_suffix(".png") if in_root.is_dir() else Path(src.stem + ".png")
        dst = out_root / rel
        if dst.resolve() in inputs:
            raise UniremovalError(
                f"--output {out_root} would overwrite the input {inputs[dst.resolve()]} (with the restored "
                f"{src}); choose a folder outside --input"
            )
        if dst in seen:  # photo.jpg and photo.tif: every such pair is named at once, not one per run
            clashes.append(f"{seen[dst]} and {src} -> {dst}")
            continue
        if dst.exists() and not written_by_restore(dst):
            foreign.append(dst)
        seen[dst] = src
        plan.append((src, dst))
    # A folder named like an image (weird.png/a.jpg beside weird.jpg): one output is the other's folder.
    folder_of = {parent: src for dst, src in seen.items() for parent in dst.parents if parent != out_root}
    clashes += [f"{src} -> {dst}, the folder of {folder_of[dst]}'s output" for dst, src in seen.items()
                if dst in folder_of]
    if clashes:
        more = f" and {len(clashes) - 3} more" if len(clashes) > 3 else ""
        raise UniremovalError(
            f"{len(clashes)} pair(s) of inputs would be written to one output (restore writes <name>.png): "
            f"{'; '.join(clashes[:3])}{more}; rename one of each pair")
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise UniremovalError(
            f"--output {out_root} already holds {len(foreign)} file(s) that restore did not write and would "
            f"replace: {', '.join(map(str, foreign[:3]))}{more}; choose another --output or move them "
            f"(restore's own outputs from an earlier run are replaced without asking)"
        )
    return plan


def _cpu_out_of_memory(exc: RuntimeError) -> bool:
    """torch's CPU allocator failing: "can't allocate memory" (Linux, macOS), "not enough memory" (Windows)."""
    return any(text in str(exc) for text in ("can't allocate memory", "not enough memory"))
