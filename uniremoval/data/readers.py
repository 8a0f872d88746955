"""One reader per dataset layout, exactly as each dataset is downloaded.

A reader lists (degraded input, clean target) file pairs under `--root` without opening any image:
decoding and size checks happen later, in the shard writers' worker processes. Every path a reader
returns is relative to the root and has been checked to stay inside it (no `..`, no absolute path
elsewhere, no symlink escaping). Problems found while listing (a hazy image whose clear image is
missing, a list-file entry outside the root) come back as `Issue`s, not exceptions, so one bad file
does not stop a 300k-image build; `--strict` turns the first one into an error.

The expected layouts are documented with trees in shards/README.md.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from uniremoval.errors import ConfigError, DataError

# .jfif/.jpe are JPEG files (what Windows and browsers save many web JPEGs as); .pgm/.pbm the grey and
# 1-bit members of the Netpbm family of .ppm.
IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".jfif", ".jpe", ".bmp", ".tif", ".tiff", ".webp", ".ppm",
                        ".pgm", ".pbm"})
DOMAINS = ("synthetic", "real")  # a sample's json `domain`: the report files sets by it (config.Domain too)


@dataclass
class Item:
    """One sample to be: input (and target) paths relative to the reader's root."""

    input: str
    target: str | None
    degradation: str
    domain: str
    source: str
    split: str
    extra: dict = field(default_factory=dict)
    key: str = ""


@dataclass
class Issue:
    """A bad input found while listing or building; goes to the report file."""

    kind: str  # missing_partner | unreadable | truncated | size_mismatch | orientation_mismatch | outside_root
    #            | duplicate | unsupported_format
    path: str
    reason: str
    partner: str | None = None

    def message(self) -> str:
        partner = f" (partner {self.partner})" if self.partner else ""
        return f"{self.kind}: {self.path}{partner}: {self.reason}"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "path": self.path, "partner": self.partner, "reason": self.reason}


@dataclass
class ReaderOptions:
    split: str | None = None
    degradation: str | None = None
    domain: str | None = None
    subset: str | None = None  # reside-sots: indoor|outdoor; realblur: J|R
    blur_dir: str = "blur"  # gopro: blur|blur_gamma


@dataclass
class ReadResult:
    items: list[Item]
    issues: list[Issue]


@dataclass(frozen=True)
class ReaderSpec:
    name: str
    read: Callable[[Path, ReaderOptions], ReadResult]
    layout: str  # one line: what the root must contain (used in error messages)


# ---------------------------------------------------------------------------------------------
# paths


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


class RealPaths:
    """Where files under `root` really are (links followed), for the hundreds of thousands of files
    of one dataset: each folder is resolved once and a file itself only when it is a link. A
    `Path.resolve()` per file costs a system call per path component and made listing SPA-Data's
    638k list entries take minutes before the first progress bar."""

    def __init__(self, root: Path) -> None:
        self.root_real = os.path.realpath(root)
        self._prefix = self.root_real.rstrip("/") + "/"
        self._dirs: dict[str, str] = {}

    def real(self, path: str | os.PathLike) -> str:
        head, tail = os.path.split(os.fspath(path))
        if tail in ("", ".", ".."):
            return os.path.realpath(path)
        folder = self._dirs.get(head)
        if folder is None:
            folder = self._dirs[head] = os.path.realpath(head or ".")
        full = os.path.join(folder, tail)
        return os.path.realpath(full) if os.path.islink(full) else full

    def inside(self, real: str) -> bool:
        return real == self.root_real or real.startswith(self._prefix)

    def relative(self, real: str) -> str:
        """A path `inside` the root, relative to it (posix)."""
        return PurePosixPath(os.path.relpath(real, self.root_real)).as_posix()


def resolve_entry(
    root: Path, entry: str, base: Path | None = None, paths: RealPaths | None = None
) -> tuple[str | None, str]:
    """Map a path written in a list file to a root-relative posix path, or (None, why not).

    Relative entries are taken from `base` (the list file's folder, default the root). A leading
    `/` is accepted when the absolute path lies inside the root, or when stripping it names a file
    under `base` (SPA-Data's lists write `/real_test_1000/...` meaning dataset-relative). `..`
    components are always refused: a dataset never needs them and they are how paths escape.
    `paths`: the root's `RealPaths`, shared by the entries of a list.
    """
    base = base or root
    paths = paths or RealPaths(root)
    text = entry.strip().replace("\\", "/")
    parts = PurePosixPath(text).parts
    if ".." in parts:
        return None, f"list entry {entry!r} contains '..'; paths must stay inside --root {root}"
    if text.startswith("/"):
        absolute = paths.real(text)
        if paths.inside(absolute) and os.path.exists(absolute):
            real = absolute
        else:
            real = paths.real(os.path.join(base, text.lstrip("/")))
            if not os.path.exists(real) and os.path.exists(text):
                return None, f"list entry {entry!r} is an absolute path outside --root {root}"
            # Neither exists: a dataset-relative entry naming a missing file, which the caller
            # reports as missing_partner (every SPA line starts with '/').
    else:
        real = paths.real(os.path.join(base, text.removeprefix("./")))
    if not paths.inside(real):
        return None, f"list entry {entry!r} resolves outside --root {root}"
    return paths.relative(real), ""


def hidden(name: str) -> bool:
    """A dot-file or dot-folder, never data: .DS_Store, the `._<name>` AppleDouble files macOS
    leaves beside every file on a FAT/exFAT/network drive or in a zip (they carry the image's
    extension but hold no image), .git, .thumbnails, .ipynb_checkpoints."""
    return name.startswith(".")


# Image formats people have that no reader here decodes: a folder of them is named in a note, not
# skipped in silence (an iPhone's HEIC photos, a camera's raw files).
OTHER_IMAGE_EXTS = frozenset({".heic", ".heif", ".avif", ".gif", ".jxl", ".jp2", ".dng", ".cr2", ".cr3",
                              ".nef", ".arw", ".raf", ".orf", ".rw2", ".tga", ".psd", ".exr", ".hdr"})


def walk_images(folder: Path, skip: tuple[Path, ...] = (), others: list[Path] | None = None) -> list[Path]:
    """Every file with an image extension (`IMAGE_EXTS`, any case) under `folder`: recursive, sorted,
    hidden files and folders skipped (`hidden`), folders in `skip` left out. Files in another image
    format (`OTHER_IMAGE_EXTS`) go to `others` when it is given. The one listing of a folder of
    images: `shards build`/`synth` (`scan_images`), `restore` and `eval --data FOLDER`."""
    found: list[Path] = []
    # Linked folders are followed (their files are then checked like any link, `scan_images`);
    # a folder reached twice (a link to an ancestor or to a sibling) is listed once.
    seen = {Path(folder).resolve()}

    def first_visit(path: Path) -> bool:
        real = path.resolve()
        if real in seen:
            return False
        seen.add(real)
        return True

    def unreadable(err: OSError) -> None:
        # os.walk would drop the folder and go on: a test set scored, or a dataset packed, without
        # the images in it, and nothing said.
        where = err.filename or folder
        raise DataError(f"folder {where} cannot be read ({err.strerror or err}), so the images in it would be left "
                        "out; give the user running this read access to it, or move it out of "
                        f"{folder}") from None

    for dirpath, dirnames, filenames in os.walk(folder, onerror=unreadable, followlinks=True):
        base = Path(dirpath)
        dirnames[:] = sorted(
            d for d in dirnames if not hidden(d) and base / d not in skip and first_visit(base / d)
        )
        for name in filenames:
            if hidden(name):
                continue
            suffix = Path(name).suffix.lower()
            if suffix in IMAGE_EXTS:
                found.append(base / name)
            elif others is not None and suffix in OTHER_IMAGE_EXTS:
                others.append(base / name)
    if others is not None:
        others.sort()
    return sorted(found)


def scan_images(root: Path, folder: Path, issues: list[Issue]) -> list[Path]:
    """All image files under `folder` (`walk_images`: recursive, sorted, hidden files skipped), links
    checked. A file in a format no reader decodes (HEIC, GIF, raw) is an `unsupported_format` issue."""
    paths = RealPaths(root)
    found: list[Path] = []
    others: list[Path] = []
    images = walk_images(folder, others=others)
    for path in others:
        issues.append(Issue("unsupported_format", _rel(root, path),
                            f"{path.suffix.lower()} is not read here; convert it to PNG or JPEG"))
    for path in images:
        if not paths.inside(paths.real(path)):
            issues.append(Issue("outside_root", _rel(root, path), f"links outside --root {root}"))
            continue
        if not path.exists():  # a dangling link: os.walk lists it, but it cannot be read
            issues.append(Issue("unreadable", _rel(root, path), f"broken link to {os.readlink(path)}"))
            continue
        found.append(path)
    return found


def child_folder(parent: Path, names: tuple[str, ...]) -> Path | None:
    """The first existing sub-folder of `parent` among `names` (case-insensitive)."""
    if not parent.is_dir():
        return None
    children = {p.name.lower(): p for p in parent.iterdir() if p.is_dir()}
    for name in names:
        if name.lower() in children:
            return children[name.lower()]
    return None


def _layout_error(reader: str, root: Path, layout: str, found: str = "") -> DataError:
    extra = f" ({found})" if found else ""
    return DataError(
        f"--root {root} does not look like a {reader} dataset{extra}. Expected layout: {layout}. "
        f"See shards/README.md for the full tree, or use --format paired-folder/folder."
    )


def _require_root(root: Path, reader: str, layout: str) -> None:
    if not root.is_dir():
        raise DataError(f"--root {root} is not a folder; the {reader} reader expects: {layout}")


def _split_name(name: str) -> str:
    low = name.lower()
    if low in ("training", "train", "trainset"):
        return "train"
    if low in ("testing", "test", "testset"):
        return "test"
    if low in ("validation", "valid", "val"):
        return "val"
    return low


# ---------------------------------------------------------------------------------------------
# helpers shared by several layouts


def _id_pairs(
    root: Path,
    degraded_dir: Path,
    clean_dir: Path,
    *,
    id_of: Callable[[str], tuple[str, list[str]]],
    make: Callable[[str, str, list[str]], Item],
    issues: list[Issue],
) -> list[Item]:
    """Pair every degraded file with the clean file named by its id (RESIDE, DDN style).

    As `_stem_pairs`, nothing is guessed: a degraded file whose id names several clean files
    (`clear/2.png` and `clear/2.jpg`), or two degraded files differing only in extension
    (`hazy/1_1_0.9.png` and `.jpg`), are reported as `duplicate` and left out."""
    clean: dict[str, list[Path]] = {}
    for path in scan_images(root, clean_dir, issues):
        clean.setdefault(path.stem, []).append(path)
    degraded = scan_images(root, degraded_dir, issues)
    # string keys, each made once: Path.with_suffix three times per file doubled the pairing of OTS (300k files)
    names = [os.path.splitext(os.fspath(p))[0] for p in degraded]
    same_name: dict[str, list[Path]] = {}
    for name, path in zip(names, degraded):
        same_name.setdefault(name, []).append(path)
    items = []
    for name, path in zip(names, degraded):
        if len(same_name[name]) > 1:
            others = ", ".join(_rel(root, o) for o in same_name[name] if o != path)
            issues.append(Issue("duplicate", _rel(root, path),
                                f"same name as {others} but another extension; rename or remove one"))
            continue
        ident, fields = id_of(path.stem)
        partners = clean.get(ident, [])
        if not partners:
            issues.append(
                Issue(
                    "missing_partner",
                    _rel(root, path),
                    f"no clean image '{ident}.*' in {_rel(root, clean_dir)}/",
                )
            )
            continue
        if len(partners) > 1:
            names = ", ".join(_rel(root, c) for c in partners)
            issues.append(Issue("duplicate", _rel(root, path),
                                f"several clean images could be its partner ({names}); keep one of them"))
            continue
        items.append(make(_rel(root, path), _rel(root, partners[0]), fields))
    return items


def _split_id(stem: str) -> tuple[str, list[str]]:
    ident, *fields = stem.split("_")
    return ident, fields


def _haze_extra(fields: list[str], outdoor: bool | None = None) -> dict:
    """RESIDE hazy names carry the synthesis parameters after the id.

    `outdoor`: True for OTS / SOTS-outdoor names, False for ITS / SOTS-indoor, None when the layout
    does not say (then a dotted first field means an airlight).
    """
    extra: dict = {"name_fields": fields}
    try:
        numbers = [float(f) for f in fields]
    except ValueError:
        return extra
    # OTS / SOTS-outdoor: <id>_<A>_<beta>. ITS: <id>_<k>_<value>, k = which of the 10 versions;
    # the RESIDE pages do not name the last field, so it stays only in name_fields. The name alone
    # cannot tell them apart: OTS writes A = 1 as "1" (0005_1_0.2.jpg), like an ITS k.
    if outdoor is None:
        outdoor = "." in fields[0] if fields else False
    if outdoor and len(numbers) == 2:
        extra.update(airlight=numbers[0], beta=numbers[1])
    elif not outdoor and numbers and numbers[0].is_integer():
        extra.update(variant=int(numbers[0]))
    return extra


def _check_domain(opts: ReaderOptions, default: str) -> str:
    domain = opts.domain or default
    if domain not in DOMAINS:
        raise ConfigError(f"--domain {domain!r} is not one of {', '.join(DOMAINS)}")
    return domain


# ---------------------------------------------------------------------------------------------
# RESIDE

HAZY_NAMES = ("hazy", "haze")
CLEAR_NAMES = ("clear", "gt", "GT", "clear_images")


def _reside_paired(root: Path, opts: ReaderOptions, reader: str, default_split: str) -> ReadResult:
    spec = READERS[reader]
    _require_root(root, reader, spec.layout)
    hazy, clear = child_folder(root, HAZY_NAMES), child_folder(root, CLEAR_NAMES)
    if hazy is None or clear is None:
        raise _layout_error(reader, root, spec.layout, "no hazy/ and clear/ folders")
    issues: list[Issue] = []
    split = opts.split or default_split
    degradation = opts.degradation or "haze"
    domain = _check_domain(opts, "synthetic")

    def make(inp: str, tgt: str, fields: list[str]) -> Item:
        extra = _haze_extra(fields, outdoor=reader == "reside-ots")
        return Item(inp, tgt, degradation, domain, reader, split, extra)

    items = _id_pairs(root, hazy, clear, id_of=_split_id, make=make, issues=issues)
    if not items and not issues:
        raise _layout_error(reader, root, spec.layout, "no images found")
    return ReadResult(items, issues)


def read_reside_its(root: Path, opts: ReaderOptions) -> ReadResult:
    return _reside_paired(root, opts, "reside-its", "train")


def read_reside_ots(root: Path, opts: ReaderOptions) -> ReadResult:
    return _reside_paired(root, opts, "reside-ots", "train")


def read_reside_sots(root: Path, opts: ReaderOptions) -> ReadResult:
    reader = "reside-sots"
    spec = READERS[reader]
    _require_root(root, reader, spec.layout)
    if child_folder(root, HAZY_NAMES) is not None:  # root is one subset folder itself
        subsets = {root.name.lower(): root}
    else:
        subsets = {name: p for name in ("indoor", "outdoor") if (p := child_folder(root, (name,))) is not None}
    if opts.subset:
        if opts.subset not in ("indoor", "outdoor"):
            raise ConfigError(f"--subset {opts.subset!r}: reside-sots has subsets indoor and outdoor")
        if opts.subset not in subsets:
            found = (f"found only {', '.join(f'{n}/' for n in sorted(subsets))}" if subsets
                     else "no indoor/ or outdoor/ folder")
            raise _layout_error(reader, root, spec.layout, f"no {opts.subset}/ subset; {found}")
        subsets = {opts.subset: subsets[opts.subset]}
    if not subsets:
        raise _layout_error(reader, root, spec.layout, "no indoor/ or outdoor/ folder")
    items: list[Item] = []
    issues: list[Issue] = []
    degradation = opts.degradation or "haze"
    domain = _check_domain(opts, "synthetic")
    split = opts.split or "test"
    for subset, folder in sorted(subsets.items()):
        hazy, clear = child_folder(folder, HAZY_NAMES), child_folder(folder, CLEAR_NAMES)
        if hazy is None or clear is None:
            raise _layout_error(reader, root, spec.layout, f"{_rel(root, folder) or '.'} lacks hazy/ or gt/")

        def make(inp: str, tgt: str, fields: list[str], subset: str = subset) -> Item:
            outdoor = {"outdoor": True, "indoor": False}.get(subset)
            extra = {"subset": subset, **_haze_extra(fields, outdoor)}
            return Item(inp, tgt, degradation, domain, reader, split, extra)

        items += _id_pairs(root, hazy, clear, id_of=_split_id, make=make, issues=issues)
    if not items and not issues:
        raise _layout_error(reader, root, spec.layout, "no images found")
    return ReadResult(items, issues)


def read_reside_unpaired(root: Path, opts: ReaderOptions) -> ReadResult:
    """URHI (a flat folder) and RTTS (JPEGImages/ + Annotations/): real hazy, no ground truth."""
    reader = "reside-unpaired"
    spec = READERS[reader]
    _require_root(root, reader, spec.layout)
    folder = child_folder(root, ("JPEGImages",)) or root
    issues: list[Issue] = []
    files = scan_images(root, folder, issues)
    if not files:
        raise _layout_error(reader, root, spec.layout, "no images found")
    degradation = opts.degradation or "haze"
    domain = _check_domain(opts, "real")
    split = opts.split or "train"
    # RTTS image ids are the file stems (they match Annotations/<id>.xml): keep them in the json.
    items = [
        Item(_rel(root, p), None, degradation, domain, reader, split, {"image_id": p.stem}) for p in files
    ]
    return ReadResult(items, issues)


# ---------------------------------------------------------------------------------------------
# Rain1400 (DDN)


def _split_folders(root: Path, has_layout: Callable[[Path], bool], opts: ReaderOptions) -> dict[str, Path]:
    """Either the root itself holds the layout (one split, named by --split), or split folders do:
    every sub-folder holding it is a split (training/ -> train, testing/ -> test, val/, ...), so
    none is dropped unseen: a root holding the layout and split folders too, or two folders naming
    one split (val/ and validation/), is refused rather than read in part."""
    subs = [p for p in sorted(root.iterdir()) if p.is_dir() and not hidden(p.name) and has_layout(p)]
    if has_layout(root):
        if subs:
            raise DataError(f"--root {root} holds the layout itself and in sub-folders "
                            f"({', '.join(f'{p.name}/' for p in subs)}): which is the dataset is unclear; "
                            f"point --root at one of them, or move the root's own folders into a split folder")
        # Rain1400/testing given as the root is the test split (it was labelled train unless --split)
        named = _split_name(root.resolve().name)
        return {opts.split or (named if named in ("train", "test", "val") else "train"): root}
    found: dict[str, Path] = {}
    for folder in subs:
        split = _split_name(folder.name)
        if split in found:
            raise DataError(f"--root {root}: {found[split].name}/ and {folder.name}/ are both the {split} split; "
                            f"merge them into one folder or move one out of --root")
        found[split] = folder
    return _only_split(found, opts, root)


def _only_split(splits: dict[str, Path], opts: ReaderOptions, where: Path) -> dict[str, Path]:
    """`splits` (split name -> folder under `where`) cut to --split when given; a --split that names
    none of them is refused, listing the ones there are."""
    if not opts.split:
        return splits
    if splits and opts.split not in splits:
        raise DataError(
            f"--split {opts.split}: {where} has no such split folder; its splits are {', '.join(sorted(splits))}"
        )
    return {k: v for k, v in splits.items() if k == opts.split}


def read_rain1400(root: Path, opts: ReaderOptions) -> ReadResult:
    reader = "rain1400"
    spec = READERS[reader]
    _require_root(root, reader, spec.layout)

    def has_layout(p: Path) -> bool:
        return child_folder(p, ("rainy_image",)) is not None and child_folder(p, ("ground_truth",)) is not None

    splits = _split_folders(root, has_layout, opts)
    if not splits:
        raise _layout_error(reader, root, spec.layout, "no rainy_image/ and ground_truth/ folders")
    degradation = opts.degradation or "rain"
    domain = _check_domain(opts, "synthetic")
    items: list[Item] = []
    issues: list[Issue] = []
    for split, folder in sorted(splits.items()):

        def make(inp: str, tgt: str, fields: list[str], split: str = split) -> Item:
            extra = (
                {"rain_index": int(fields[0])} if fields and fields[0].isdigit() else {"name_fields": fields}
            )
            return Item(inp, tgt, degradation, domain, reader, split, extra)

        items += _id_pairs(
            root,
            child_folder(folder, ("rainy_image",)),
            child_folder(folder, ("ground_truth",)),
            id_of=lambda stem: (stem.rsplit("_", 1)[0], stem.rsplit("_", 1)[1:]),
            make=make,
            issues=issues,
        )
    if not items and not issues:
        raise _layout_error(reader, root, spec.layout, "no images found")
    return ReadResult(items, issues)


# ---------------------------------------------------------------------------------------------
# GoPro


def _stem_pairs(
    root: Path,
    degraded_dir: Path,
    clean_dir: Path | None,
    issues: list[Issue],
    partner_stems: Callable[[str], list[str]] = lambda s: [s],
) -> list[tuple[str, str | None]]:
    """Pair files of two folders by path without extension: `input/a/001.png` with `target/a/001.*`.

    A clean file directly in the clean folder (`target/001.png`) also pairs by stem with an input in
    a sub-folder, when it is the only one with that stem; a clean file in another sub-folder never
    does (`input/A/001` without `target/A/001` is a missing partner, not `target/B/001`'s). Several
    candidates (`001.png` and `001.jpg`) are never guessed between: the input is reported as a
    `duplicate`. So are
    degraded files with the same path and another extension (`a.png`, `a.jpg`).
    """
    degraded = scan_images(root, degraded_dir, issues)
    if clean_dir is None:
        return [(_rel(root, path), None) for path in degraded]
    by_path: dict[str, list[Path]] = {}
    by_stem: dict[str, list[Path]] = {}
    for path in scan_images(root, clean_dir, issues):
        by_path.setdefault(path.relative_to(clean_dir).with_suffix("").as_posix(), []).append(path)
        if path.parent == clean_dir:  # only a flat clean folder pairs by stem alone
            by_stem.setdefault(path.stem, []).append(path)
    pairs: list[tuple[str, str | None]] = []
    same_name: dict[str, list[Path]] = {}
    for path in degraded:
        same_name.setdefault(path.relative_to(degraded_dir).with_suffix("").as_posix(), []).append(path)
    for path in degraded:
        sub = path.parent.relative_to(degraded_dir)
        own = (sub / path.stem).as_posix()
        if len(same_name[own]) > 1:
            others = ", ".join(_rel(root, o) for o in same_name[own] if o != path)
            issues.append(Issue("duplicate", _rel(root, path),
                                f"same name as {others} but another extension; rename or remove one"))
            continue
        stems = partner_stems(path.stem)
        candidates = next((by_path[k] for s in stems if (k := (sub / s).as_posix()) in by_path), None)
        if candidates is None:
            candidates = next((by_stem[s] for s in stems if s in by_stem), [])
        if not candidates:
            issues.append(
                Issue("missing_partner", _rel(root, path), f"no '{own}.*' in {_rel(root, clean_dir)}/")
            )
            continue
        if len(candidates) > 1:
            names = ", ".join(_rel(root, c) for c in candidates)
            issues.append(Issue("duplicate", _rel(root, path),
                                f"several clean images could be its partner ({names}); keep one of them"))
            continue
        pairs.append((_rel(root, path), _rel(root, candidates[0])))
    return pairs


def read_gopro(root: Path, opts: ReaderOptions) -> ReadResult:
    reader = "gopro"
    spec = READERS[reader]
    _require_root(root, reader, spec.layout)
    if opts.blur_dir not in ("blur", "blur_gamma"):
        raise ConfigError(f"--blur-dir {opts.blur_dir!r}: use blur or blur_gamma")
    base = child_folder(root, ("GOPRO_Large",)) or root
    splits = {
        _split_name(p.name): p
        for p in sorted(base.iterdir())
        if p.is_dir() and _split_name(p.name) in ("train", "test")
    }
    splits = _only_split(splits, opts, base)
    if not splits:
        raise _layout_error(reader, root, spec.layout, "no train/ or test/ folder")
    degradation = opts.degradation or "blur"
    domain = _check_domain(opts, "synthetic")
    items: list[Item] = []
    issues: list[Issue] = []
    for split, folder in sorted(splits.items()):
        for seq in sorted(p for p in folder.iterdir() if p.is_dir() and not hidden(p.name)):
            blur, sharp = child_folder(seq, (opts.blur_dir,)), child_folder(seq, ("sharp",))
            if blur is None:
                issues.append(Issue("missing_partner", _rel(root, seq), f"sequence has no {opts.blur_dir}/"))
                continue
            if sharp is None:
                issues.append(Issue("missing_partner", _rel(root, seq), "sequence has no sharp/"))
                continue
            for inp, tgt in _stem_pairs(root, blur, sharp, issues):
                extra = {"sequence": seq.name, "frame": PurePosixPath(inp).stem, "blur_dir": opts.blur_dir}
                items.append(Item(inp, tgt, degradation, domain, reader, split, extra))
    if not items and not issues:
        raise _layout_error(reader, root, spec.layout, "no sequences found")
    return ReadResult(items, issues)


# ---------------------------------------------------------------------------------------------
# list files (SPA-Data, RealBlur)


def _read_pair_list(
    root: Path, list_file: Path, issues: list[Issue], columns: tuple[int, int | None], line_format: str
) -> list[tuple[str, str | None, str]]:
    """`input target` (or one column) per line, paths relative to the list file's folder, each with its
    `list:line` (for `_listed_once`); `line_format` names the columns in messages."""
    pairs: list[tuple[str, str | None, str]] = []
    real_paths = RealPaths(root)
    # utf-8-sig: a list saved by a Windows editor starts with a BOM, which would glue to its first path
    text = list_file.read_text(encoding="utf-8-sig", errors="replace")
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{_rel(root, list_file)}:{lineno}"
        inp_col, tgt_col = columns
        needed = max(c for c in columns if c is not None) + 1
        if len(fields) < needed:  # a cut line: never an unpaired sample, nor dropped unseen
            issues.append(Issue("missing_partner", where, f"the line holds {len(fields)} path(s) where {needed} are "
                                f"expected ({line_format}); fix or remove it (is the list file cut short?)"))
            continue
        paths = []
        for col in (inp_col, tgt_col):
            if col is None or col >= len(fields):
                paths.append(None)
                continue
            rel, why = resolve_entry(root, fields[col], list_file.parent, real_paths)
            if rel is None:
                issues.append(Issue("outside_root", where, why))
                break
            paths.append(rel)
        else:
            inp, tgt = paths
            if inp is None:
                continue
            missing = [p for p in (inp, tgt) if p is not None and not os.path.isfile(os.path.join(root, p))]
            if missing:
                issues.append(
                    Issue(
                        "missing_partner",
                        inp,
                        f"listed in {where} but {missing[0]} does not exist",
                        partner=tgt,
                    )
                )
                continue
            pairs.append((inp, tgt, where))
    return pairs


def _listed_once(listed: list[tuple[Item, str]], issues: list[Issue]) -> list[Item]:
    """The items of a dataset's list files (with each one's `list:line`), each input once. A line
    repeating an earlier one (same pair, same split) is left out and reported; an input listed with
    other partners or in other splits is never guessed: none of its lines is used, and it is reported."""
    lines: dict[str, list[tuple[Item, str]]] = {}
    for item, where in listed:
        lines.setdefault(item.input, []).append((item, where))
    items = []
    for item, where in listed:
        same_input = lines[item.input]
        first, first_where = same_input[0]
        if len(same_input) == 1 or (item is first and all(
                (i.target, i.split) == (first.target, first.split) for i, _ in same_input)):
            items.append(item)
        elif all((i.target, i.split) == (first.target, first.split) for i, _ in same_input):
            issues.append(Issue("duplicate", item.input, f"{where} repeats {first_where} (the same pair): "
                                "written once", partner=item.target))
        elif item is first:
            each = "; ".join(f"{w}: {i.target or 'no target'} ({i.split})" for i, w in same_input)
            issues.append(Issue("duplicate", item.input, f"listed {len(same_input)} times with other partners "
                                f"or splits ({each}); never guessed, so left out: keep one of those lines"))
    return items


SPA_LISTS = {"real_test_1000.txt": "test", "real_world.txt": "train"}
SPA_RAIN = ("rain", "rainy", "input")
SPA_GT = ("gt", "norain", "target")


def _spa_partner_stems(stem: str) -> list[str]:
    # real_test_1000: rain/<n>.png + gt/<n>gt.png; repackaged copies use rain-<n> / norain-<n>.
    return [stem, f"{stem}gt", f"{stem}_gt", re.sub(r"^rain", "norain", stem)]


def read_spa(root: Path, opts: ReaderOptions) -> ReadResult:
    reader = "spa"
    spec = READERS[reader]
    _require_root(root, reader, spec.layout)
    degradation = opts.degradation or "rain"
    domain = _check_domain(opts, "real")
    issues: list[Issue] = []
    items: list[Item] = []
    # 1. The official list files, wherever they sit within two levels (Testing/, Training/real_world/).
    lists = sorted(
        p for depth in ("*", "*/*", "*/*/*") for p in root.glob(depth) if p.name in SPA_LISTS and p.is_file()
    )
    listed: list[tuple[Item, str]] = []
    for list_file in lists:
        split = SPA_LISTS[list_file.name]
        if opts.split and opts.split != split:
            continue
        for inp, tgt, where in _read_pair_list(root, list_file, issues, (0, 1), "`rainy gt`"):
            listed.append((Item(inp, tgt, degradation, domain, reader, split, {"list": _rel(root, list_file)}), where))
    items += _listed_once(listed, issues)
    # 2. Without lists: <dir>/rain (+ <dir>/gt) folders, e.g. real_test_1000/rain + real_test_1000/gt.
    if not lists:
        rain_dirs = sorted(
            p
            for depth in ("*", "*/*", "*/*/*")
            for p in root.glob(depth)
            if p.is_dir() and p.name.lower() in SPA_RAIN
        )
        for rain in rain_dirs:
            split = "test" if "test" in _rel(root, rain).lower() else "train"
            if opts.split and opts.split != split:
                continue
            gt = child_folder(rain.parent, SPA_GT)
            for inp, tgt in _stem_pairs(root, rain, gt, issues, _spa_partner_stems):
                items.append(Item(inp, tgt, degradation, domain, reader, split, {}))
        if not rain_dirs:
            raise _layout_error(
                reader, root, spec.layout, "no real_test_1000.txt/real_world.txt and no rain/"
            )
    if not items and not issues:
        raise _layout_error(reader, root, spec.layout, f"no images for split {opts.split}")
    return ReadResult(items, issues)


def read_realblur(root: Path, opts: ReaderOptions) -> ReadResult:
    reader = "realblur"
    spec = READERS[reader]
    _require_root(root, reader, spec.layout)
    subsets = [opts.subset] if opts.subset else ["J"]
    if any(s not in ("J", "R") for s in subsets):
        raise ConfigError(f"--subset {opts.subset!r}: realblur has subsets J and R")
    splits = [opts.split] if opts.split else ["train", "test"]
    degradation = opts.degradation or "blur"
    domain = _check_domain(opts, "real")
    issues: list[Issue] = []
    items: list[Item] = []
    found = []
    listed: list[tuple[Item, str]] = []
    for subset in subsets:
        for split in splits:
            list_file = root / f"RealBlur_{subset}_{split}_list.txt"
            if not list_file.is_file():
                continue
            found.append(list_file)
            # Lines are `gt_path blur_path`: the input (blurred) is the second column.
            for inp, tgt, where in _read_pair_list(root, list_file, issues, (1, 0), "`gt_path blur_path`"):
                listed.append((Item(inp, tgt, degradation, domain, reader, split, {"subset": subset}), where))
    items += _listed_once(listed, issues)
    if not found:
        wanted = " or ".join(f"RealBlur_{subsets[0]}_{split}_list.txt" for split in splits)
        raise _layout_error(reader, root, spec.layout, f"no {wanted}")
    if not items and not issues:
        raise _layout_error(reader, root, spec.layout, "the list files are empty")
    return ReadResult(items, issues)


# ---------------------------------------------------------------------------------------------
# generic folders

INPUT_NAMES = ("input", "inputs", "lq")
TARGET_NAMES = ("target", "targets", "gt")


def _need_degradation(opts: ReaderOptions, reader: str) -> str:
    if not opts.degradation:
        raise ConfigError(
            f"--format {reader} needs --degradation (the name of the degradation in these images, "
            f"e.g. haze, rain, blur, or clear for clean images)"
        )
    return opts.degradation


def read_paired_folder(root: Path, opts: ReaderOptions) -> ReadResult:
    reader = "paired-folder"
    spec = READERS[reader]
    _require_root(root, reader, spec.layout)
    degradation = _need_degradation(opts, reader)
    domain = _check_domain(opts, "synthetic")

    def has_layout(p: Path) -> bool:
        return child_folder(p, INPUT_NAMES) is not None and child_folder(p, TARGET_NAMES) is not None

    splits = _split_folders(root, has_layout, opts)
    if not splits:
        raise _layout_error(reader, root, spec.layout, "no input/ and target/ folders")
    issues: list[Issue] = []
    items = []
    for split, folder in sorted(splits.items()):
        for inp, tgt in _stem_pairs(root, child_folder(folder, INPUT_NAMES), child_folder(folder, TARGET_NAMES), issues):
            items.append(Item(inp, tgt, degradation, domain, reader, split, {}))
    if not items and not issues:
        raise _layout_error(reader, root, spec.layout, "no images found")
    return ReadResult(items, issues)


def read_folder(root: Path, opts: ReaderOptions) -> ReadResult:
    reader = "folder"
    spec = READERS[reader]
    _require_root(root, reader, spec.layout)
    degradation = _need_degradation(opts, reader)
    domain = _check_domain(opts, "real")
    issues: list[Issue] = []
    files = scan_images(root, root, issues)
    if not files:
        raise _layout_error(reader, root, spec.layout, "no images found")
    split = opts.split or "train"
    return ReadResult([Item(_rel(root, p), None, degradation, domain, reader, split) for p in files], issues)


READERS: dict[str, ReaderSpec] = {
    spec.name: spec
    for spec in (
        ReaderSpec("reside-its", read_reside_its, "hazy/<id>_<k>_<x>.png + clear/<id>.png"),
        ReaderSpec("reside-ots", read_reside_ots, "hazy/<id>_<A>_<beta>.jpg + clear/<id>.jpg"),
        ReaderSpec(
            "reside-sots",
            read_reside_sots,
            "indoor/{hazy,gt}/ and/or outdoor/{hazy,gt}/ (hazy <id>_*.*, gt <id>.*)",
        ),
        ReaderSpec("reside-unpaired", read_reside_unpaired, "images (URHI), or JPEGImages/*.png (RTTS)"),
        ReaderSpec(
            "rain1400", read_rain1400, "[training|testing/]rainy_image/<id>_<k>.jpg + ground_truth/<id>.jpg"
        ),
        ReaderSpec(
            "gopro", read_gopro, "[GOPRO_Large/]{train,test}/<sequence>/{blur,blur_gamma,sharp}/<frame>.png"
        ),
        ReaderSpec(
            "spa",
            read_spa,
            "real_test_1000.txt / real_world.txt lists of `rain gt` paths, or <dir>/rain + <dir>/gt",
        ),
        ReaderSpec(
            "realblur", read_realblur, "RealBlur_{J,R}_{train,test}_list.txt with `gt_path blur_path` lines"
        ),
        ReaderSpec(
            "paired-folder", read_paired_folder, "[<split>/]input/<name>.* + [<split>/]target/<name>.*"
        ),
        ReaderSpec("folder", read_folder, "any images, recursively (one degradation, or clear)"),
    )
}


# ---------------------------------------------------------------------------------------------
# keys

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def _sanitize(text: str) -> str:
    return _UNSAFE.sub("_", text).strip("_") or "x"


def assign_keys(items: list[Item]) -> list[Item]:
    """Give every item a `__key__` unique in the dataset, with no dots (webdataset splits there).

    Keys are file stems when those are unique (RTTS keeps its image ids, ITS its hazy names),
    otherwise the input path without extension, folders joined by `__` (GoPro frames repeat per
    sequence). Items are sorted by input path first so keys, and therefore shards, are
    deterministic across runs and array jobs.
    """
    items = sorted(items, key=lambda it: (it.split, it.input))
    stems = [PurePosixPath(it.input).stem for it in items]
    use_stems = len(set(stems)) == len(stems)
    seen: set[str] = set()
    for item, stem in zip(items, stems):
        if use_stems:
            base = _sanitize(stem)
        else:
            path = PurePosixPath(item.input)
            base = "__".join(_sanitize(p) for p in (*path.parent.parts, path.stem))
        key, n = base, 1
        while key in seen:
            n += 1
            key = f"{base}_{n}"
        seen.add(key)
        item.key = key
    return items


def read_dataset(fmt: str, root: str | os.PathLike, opts: ReaderOptions) -> ReadResult:
    """Run the reader for layout `fmt` on `root`; items come back keyed and sorted."""
    if fmt not in READERS:
        raise ConfigError(f"--format {fmt!r} is not a known layout; choose one of: {', '.join(READERS)}")
    result = READERS[fmt].read(Path(root), opts)
    return ReadResult(assign_keys(result.items), result.issues)
