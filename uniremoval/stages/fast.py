"""Speed settings for training and inference steps, each one keeping the numbers (tests/test_fast_equivalence.py).

One small module so that the trainer, the cache stage and bench/gpu.py switch the same things on
the same way:

* ``autocast_dtype`` / ``autocast``: bf16 autocast (fp16 only on CUDA). The contrastive loss turns
  autocast off inside itself (at tau = 1e-6 a bf16 cosine would move its logits by thousands), so
  only the networks (student, teachers, VGG-19) run in bf16.
* ``to_channels_last``: NHWC weights and inputs; cuDNN's fastest bf16 convolutions are NHWC, and
  without it every conv pays a layout transpose. Numbers: same maths, another summation order.
* ``math_flags``: TF32 for cuDNN *convolutions* only (PyTorch's default), never for fp32 matmuls:
  the contrastive loss computes its cosines with matmuls in fp32, and TF32's 10-bit mantissa
  (~1e-3 relative) would move logits cos/tau by ~1e3 at tau = 1e-6. cudnn.benchmark picks the
  fastest conv algorithm for fixed crop shapes.
* ``make_adam``: the fused (one kernel for all parameters) Adam/AdamW on CUDA, the multi-tensor
  ``foreach`` one elsewhere; both are the same update as the per-parameter loop. The fused one can
  also leave an update out on a device flag (``skips_on_device``), which with ``HostCopy`` lets the
  trainer check a step's losses for inf/NaN without making the host wait for the GPU every step.
* ``compile_module``: ``torch.compile`` with the inductor cache in a chosen folder (kept across
  runs on one machine), plus ``save_compile_artifacts`` / ``load_compile_artifacts`` to carry the
  compiled kernels to a fresh machine (torch's portable "mega-cache"), so the minutes of compile
  time are paid once per (model, shape, torch version), not once per run.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from uniremoval.config import CUDA_GRAPH_COMPILE_MODES
from uniremoval.errors import ConfigError

# ------------------------------------------------------------------------------------ precision


def autocast_dtype(mixed_precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for a config's ``train.mixed_precision`` on `device` (None: fp32)."""
    dev = torch.device(device)
    if mixed_precision == "no":
        return None
    if mixed_precision == "bf16":
        if dev.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("train.mixed_precision=bf16: this GPU has no bf16 support; use fp16 or no")
        return torch.bfloat16
    if mixed_precision == "fp16":
        if dev.type != "cuda":
            raise ConfigError("train.mixed_precision=fp16 needs a GPU; on CPU use bf16 or no")
        return torch.float16
    raise ConfigError(f"unknown mixed_precision {mixed_precision!r}; use 'no', 'bf16' or 'fp16'")


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for `dtype`, or a no-op context for None (full precision)."""
    dev = torch.device(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=dev.type, dtype=dtype)


@contextlib.contextmanager
def math_flags(cudnn_tf32: bool = True, cudnn_benchmark: bool = True) -> Iterator[None]:
    """Set the convolution flags for a block and restore the previous ones after it.

    fp32 matmuls stay full precision whatever is asked (see the module docstring): this context
    also asserts ``torch.backends.cuda.matmul.allow_tf32`` is off while it runs.
    """
    old = (torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = cudnn_tf32
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        (torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
         torch.backends.cuda.matmul.allow_tf32) = old


# ------------------------------------------------------------------------------------ memory layout


def to_channels_last(module: nn.Module) -> nn.Module:
    """Convert a module's 4-D parameters and buffers to channels_last in place; returns it."""
    return module.to(memory_format=torch.channels_last)


def channels_last_input(x: Tensor) -> Tensor:
    """A 4-D batch in channels_last layout (other ranks are returned unchanged)."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


IMAGE_KEYS = ("input", "target", "teacher")  # feature grids only enter the loss: left as they are


def to_device(obj: Any, device: torch.device | str, channels_last: bool = False, key: str | None = None) -> Any:
    """Move a (nested) loader batch's tensors to `device` (non-blocking from pinned memory); with
    channels_last the image tensors go NHWC on the way. DA batches nest {"degraded": ..., "clear": ...}."""
    if isinstance(obj, Tensor):
        obj = obj.to(device, non_blocking=True)
        return channels_last_input(obj) if channels_last and key in IMAGE_KEYS else obj
    if isinstance(obj, dict):
        return {k: to_device(v, device, channels_last, k) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and obj and isinstance(obj[0], Tensor):
        return type(obj)(to_device(v, device, channels_last, key) for v in obj)
    return obj


# ------------------------------------------------------------------------------------ optimiser


def adam_impl(device: torch.device | str, fused: bool | None = None) -> dict[str, bool]:
    """The Adam implementation flag for `device`: ``{'fused': True}`` on CUDA (or when asked and
    supported), else ``{'foreach': True}``. ``fused=False`` forces foreach."""
    dev = torch.device(device)
    if fused is None:
        fused = dev.type == "cuda"
    if fused and dev.type in ("cuda", "cpu"):
        return {"fused": True}
    return {"foreach": True}


def make_adam(
    params: Iterable[nn.Parameter],
    lr: float,
    device: torch.device | str,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled: bool = False,
    fused: bool | None = None,
) -> torch.optim.Optimizer:
    """Adam (or AdamW with ``decoupled``) with the fastest implementation for the device."""
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    return cls(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **adam_impl(device, fused))


def skips_on_device(optimizer: Any) -> bool:
    """Whether `optimizer` (or the one accelerate wraps) can leave an update out on a device flag:
    torch's fused Adam/AdamW read their ``found_inf`` tensor inside the kernel, and at 1.0 keep the
    weights, both moments and the step count as they were (GradScaler's mechanism)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return isinstance(inner, torch.optim.Adam | torch.optim.AdamW) and bool(inner.defaults.get("fused"))


class HostCopy:
    """A copy of a device tensor to the host, started now and read later. On CUDA it goes to pinned
    memory behind an event, so reading it waits for the work queued before the copy only, not for
    what the host has queued since (``.item()`` would wait for all of it)."""

    def __init__(self, tensor: Tensor) -> None:
        tensor = tensor.detach()
        self._event: Any = None
        if tensor.is_cuda:
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = tensor.clone()

    def get(self) -> Tensor:
        if self._event is not None:
            self._event.synchronize()
        return self._host


# ------------------------------------------------------------------------------------ compile


def set_compile_cache(cache_dir: str | os.PathLike) -> Path:
    """Point inductor's on-disk caches (FX graphs, AOTAutograd, Triton kernels) at `cache_dir`.

    Inductor reads ``TORCHINDUCTOR_CACHE_DIR`` each time it needs the cache, but fills it with its
    default (``/tmp/torchinductor_<user>``) the first time it looks, so an existing value does not
    mean the user chose it: this always sets it. Call it before the first compiled call (and
    before `load_compile_artifacts`). `Speed.from_config` keeps a value the user exported.
    """
    path = Path(cache_dir).resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path


# torch.compile's modes (model.compile_mode lists the same), and those whose code replays CUDA graphs.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
CUDA_GRAPH_MODES = CUDA_GRAPH_COMPILE_MODES


def compile_module(
    module: nn.Module,
    cache_dir: str | os.PathLike | None = None,
    mode: str | None = None,
    dynamic: bool = False,
    backend: str = "inductor",
) -> nn.Module:
    """Compile `module` in place (``nn.Module.compile``) with the inductor cache in `cache_dir`.

    In place, not ``torch.compile(module)``: the module keeps its class and its state_dict keys
    (no ``_orig_mod.`` prefix), so checkpoints, DDP/accelerate wrapping and ``unwrap_model`` see the
    plain network. ``dynamic=False``: training crops have one shape, so one static graph;
    validation and restore on other image sizes should run under `eager()` rather than recompile
    per size. Compilation happens at the first call. Returns `module` itself.
    """
    if cache_dir is not None:
        set_compile_cache(cache_dir)
    if backend != "inductor":  # e.g. "aot_eager": traces and splits forward/backward, generates no code
        module.compile(backend=backend, dynamic=dynamic)
    else:
        module.compile(mode=mode, dynamic=dynamic)
    return module


def require_compile_support() -> None:
    """Refuse ``model.compile`` before training on a torch without ``torch.compiler.set_stance`` (2.6+):
    validation runs compiled models eagerly with it, and would otherwise fail at the first validation."""
    if not hasattr(getattr(torch, "compiler", None), "set_stance"):
        raise ConfigError(f"model.compile=true needs torch>=2.6 (torch.compiler.set_stance); this is torch "
                          f"{torch.__version__}: upgrade torch or set model.compile=false")


def eager() -> contextlib.AbstractContextManager:
    """Run compiled modules eagerly inside this block (validation, restore: shapes that vary)."""
    return torch.compiler.set_stance("force_eager")


def save_compile_artifacts(path: str | os.PathLike) -> int:
    """Write the compiled artifacts of this process (portable across machines with the same torch
    and GPU) to `path`; returns the byte size (0 when there is nothing to save)."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return 0
    data, _info = saved
    from uniremoval.io import atomic_write_bytes

    atomic_write_bytes(path, data)
    return len(data)


def load_compile_artifacts(path: str | os.PathLike) -> bool:
    """Pre-load artifacts saved by `save_compile_artifacts`; later compiles of the same graphs are
    cache hits. A missing file is not an error (False): the first run compiles and saves."""
    p = Path(path)
    if not p.is_file():
        return False
    torch.compiler.load_cache_artifacts(p.read_bytes())
    return True


# ------------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class Speed:
    """The speed settings of one run, read from a stage config (see `from_config`)."""

    device: torch.device
    dtype: torch.dtype | None = None
    channels_last: bool = False
    compile: bool = False
    compile_cache: str | None = None
    compile_mode: str = "default"

    @classmethod
    def from_config(cls, cfg: Any, device: torch.device | str) -> Speed:
        """From ``model.channels_last``, ``model.compile`` and ``train.mixed_precision``."""
        dev = torch.device(device)
        if cfg.model.compile:
            require_compile_support()
        run_dir = getattr(cfg, "run_dir", None)
        cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or (str(Path(run_dir) / "compile_cache") if run_dir else None)
        return cls(
            device=dev,
            dtype=autocast_dtype(cfg.train.mixed_precision, dev),
            channels_last=bool(cfg.model.channels_last),
            compile=bool(cfg.model.compile),
            compile_cache=cache,
            compile_mode=cfg.model.compile_mode,
        )

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.dtype)

    def compile_model(self, module: nn.Module) -> nn.Module:
        """`compile_module` with this run's cache folder and mode."""
        mode = None if self.compile_mode == "default" else self.compile_mode
        return compile_module(module, self.compile_cache, mode=mode)

    @property
    def cuda_graphs(self) -> bool:
        """Compiled modules replay CUDA graphs: a training loop marks each iteration's start
        (`torch.compiler.cudagraph_mark_step_begin`) so that outputs of the last one may be reused."""
        return self.compile and self.compile_mode in CUDA_GRAPH_MODES
