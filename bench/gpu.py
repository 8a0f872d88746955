"""KT-step speed on one device: the naive baseline against our fast path, side by side in one run.

    python3 bench/gpu.py                              # one GPU: deblur MPRNet, batch 16, 128 px crops
    python3 bench/gpu.py --preset tiny --quick        # CPU smoke run (well under a minute)

Prints ONE JSON object on stdout (progress goes to stderr); `--out FILE` also writes it.

What is timed (each section is independent; a failing one records its error and the rest run):

* ``matmul_peak``: an n x n x n bf16 matmul (8192 on GPU): the ceiling used for the fractions.
* ``naive``: fp32 eager with the flags of MPRNet's official train.py (cuDNN TF32 convs, PyTorch's
  default; ``cudnn.benchmark = True``, which its first lines set), teachers ONLINE (each sample goes through its type's frozen teacher every step),
  student forward/backward, all KT losses (L1 + VGG-19 image-level + feature-level contrastive),
  Adam with PyTorch's default implementation.
* ``ours``: the same losses with cached teacher targets (tensors, as the cache loader yields
  them), bf16 autocast on the networks (the contrastive loss stays fp32), channels_last,
  cudnn.benchmark, fused Adam; ``student_fwd_bwd_ms`` times the network alone (the rest of the step
  is losses, VGG-19 and Adam). ``ours_compiled``: the same plus torch.compile of the student and
  VGG-19; its compile time is reported apart (``compile_s``) with the steps it takes to pay back.
  On a GPU a last child times ``reduce-overhead`` (CUDA graphs: no launch cost per kernel) as
  ``ours_compiled_reduce_overhead``, when the budget left exceeds what the first mode's child took;
  ``summary.ours_path`` names the fastest path. ``--inductor KEY=VALUE`` sets a torch._inductor.config
  option for every compile (``settings.inductor``; each compiled path's ``what`` names it).
  ``--cudnn-benchmark-limit N`` lets cudnn.benchmark try N algorithms per convolution shape on our
  paths (0: all of them; torch's default is 10); the naive baseline keeps the official default.
* ``ours_trainer_device_check`` / ``ours_trainer_host_check`` (GPU): the eager step with what the
  trainer does around it, with either of its non-finite checks (``summary.trainer_*_check_slowdown``).
  ``trainer``: the project's Trainer itself running the KT stage on the same batches, eager
  (``vs_ours_trainer_check``: its img/s over that written-out step; 1 means the timed steps are
  what training runs; on a GPU ``host_waits_per_step``: the host waits for the GPU that torch's
  sync debug mode reports in its timed steps, and ``host_waits_at`` where).
* ``flops``: FlopCounterMode over one step of each path (``flops_by_kind``: convolution, matmul);
  achieved TFLOP/s = flops / step time, and the fraction of the measured bf16 matmul peak
  (``limit_img_s``: the img/s that peak allows).
* ``profile`` (``--profile STEPS``, inside ``ours`` and each compiled path): the step under
  torch.profiler: device-busy ms per step against the timed step (well under it: the step waits on
  the host), ms per step by kernel kind (convolution, layout transpose, Triton, elementwise...),
  each kind's own TFLOP/s (``tflops_by_kind``) and the 30 kernels that take the most.
* ``summary``: the ratio and the goal, what the goal asks (``tflops_needed_for_goal``: the rate the
  whole step would have to sustain) and what the convolutions allow as the fastest path runs them
  (``conv_bound_img_s``, ``conv_bound_ratio``: the step were every other kernel free).
* ``cache_build``: teacher inference on 720p frames (1280x720): the official inference (fp32 eager,
  one frame per forward) vs the cache stage's (bf16, channels_last, ``--cache-batch`` 4 frames per
  forward as configs/cache.yaml's ``cache.batch_size``), plus how far the two outputs are apart in
  the cache's stored units (8-bit
  levels of the teacher image, relative error of the pooled feature).
* ``cache_compiled`` (with the compile; a child under the deadline, after the KT step's first
  mode): the cache's teacher inference with the teacher compiled (`uniremoval cache` under
  ``model.compile``), its ``compile_s`` apart and the frames that pay it back (``breakeven_frames``);
  ``summary.cache_build_path`` names the faster of the two.
* ``eval``: `uniremoval eval`'s two costs on 720p frames: the restore (fp32, as eval runs the
  model) and the no-reference score (PIQE through pyiqa on the same device): ``score_over_restore``
  above 1 means the metric never holds eval up.
* ``upsample``: MPRNet's bilinear x2 forward + backward at the shapes one student step runs it, ms
  per step for PyTorch's kernel and for the gather stencil the model runs under torch.compile, each
  eager and compiled (``compiled_native_over_stencil``: what the stencil saves the compiled step).
* ``ours_batch<N>`` (``--scale-batches``, default 2x and 4x ``--batch`` on a GPU): the eager fast
  step at a larger per-device batch, alone; ``summary.eager_batch_speedup`` is its img/s over the
  step's at ``--batch`` (the per-device batch is a setting of configs/, this says whether raising it pays);
  ``--only batches`` times ``ours`` too, as the baseline.
* ``loader``: the project's `kt_loader` over generated cache-format shards (input.png,
  teacher.png, feature.npy), with one worker per core: samples/s once the workers run.

Weights are random (no checkpoints needed); speed does not depend on them.

Stopped from outside: the JSON (with its summary so far, ``"complete": false``) is rewritten
after every section, and a SIGTERM (an outer ``timeout``) writes it once more, naming the
section it cut, and kills the compiled-step child (keeping what the child had written, e.g. its
compile time). ``--budget-s`` (400: the device command runs this under ``timeout 420``; counted
from the process start, imports included) cuts the compiled step's deadline to what is left of it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import shutil
import sys
import tarfile
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# --budget-s counts from here, before torch's import (seconds on a fresh machine's cold disk), as
# the outer `timeout` counts from the process start.
_T_IMPORT = time.perf_counter()

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from uniremoval.data.transforms import encode_png
from uniremoval.stages import fast

DEGS = ["haze", "rain", "blur"]
CELL = 16
A1 = 0.5
# What a SIGTERM (the device command's `timeout`) must know: the section running, the compiled-step
# child and the file it writes; and when the process started (taken by the first main()).
_STATE: dict[str, Any] = {"section": None, "child": None, "child_out": None, "child_key": None, "child_src": None,
                          "t_import": _T_IMPORT, "tmpdirs": []}


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[str]:
    """A temporary folder that is also removed when a SIGTERM ends the run inside it (the handler
    leaves through os._exit, which skips TemporaryDirectory's clean-up)."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        _STATE["tmpdirs"].append(tmp)
        try:
            yield tmp
        finally:
            _STATE["tmpdirs"].remove(tmp)


def log(msg: str) -> None:
    print(f"[gpu.py {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sig(x: float, digits: int = 4) -> float:
    """Round to `digits` significant digits (CPU smoke runs give tiny TFLOP/s values)."""
    return float(f"{x:.{digits}g}")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def time_calls(fn: Callable[[int], Any], n: int, device: torch.device, start: int = 0) -> float:
    """Seconds per call of fn(i) over n calls, synchronised at both ends only."""
    sync(device)
    t0 = time.perf_counter()
    for i in range(n):
        fn(start + i)
    sync(device)
    return (time.perf_counter() - t0) / max(1, n)


def section(results: dict[str, Any], name: str) -> contextlib.AbstractContextManager:
    """Run a section; record its wall time, or its error (and keep going)."""

    @contextlib.contextmanager
    def run():
        log(f"{name} ...")
        t0 = time.perf_counter()
        _STATE["section"] = name
        try:
            yield
        except Exception as exc:  # noqa: BLE001 (one broken section must not lose the others)
            results.setdefault(name, {})["error"] = f"{type(exc).__name__}: {exc}"[:800]
            log(f"{name} FAILED: {exc}\n{traceback.format_exc()}")
        finally:
            _STATE["section"] = None
            results.setdefault("section_s", {})[name] = round(time.perf_counter() - t0, 1)
            log(f"{name} done in {time.perf_counter() - t0:.1f} s")

    return run()


# ------------------------------------------------------------------------------------ models, data


def build_models(preset: str, device: torch.device) -> dict[str, Any]:
    from uniremoval.models.mprnet_arch import MPRNet
    from uniremoval.models.vgg_arch import VGGFeatures
    from uniremoval.stages.teachers import Teacher, freeze

    torch.manual_seed(0)
    student = MPRNet(preset)
    teachers = {d: Teacher(d, freeze(MPRNet(preset)).to(device), "minus_one_one", f"random-{d}") for d in DEGS}
    phi = VGGFeatures(weights="random")
    return {"student": student, "teachers": teachers, "phi": phi}


def make_batches(n: int, batch: int, crop: int, device: torch.device) -> list[dict[str, Any]]:
    """`n` distinct batches on the device; each holds every degradation type (as kt_loader's do)."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.rand(batch, 3, crop, crop, generator=gen) * 2 - 1
        labels = torch.arange(batch) % len(DEGS)
        out.append({"input": x.to(device), "degradation": labels.to(device)})
    return out


def add_cached_targets(batches: list[dict[str, Any]], teachers: dict[str, Any]) -> list[dict[str, Any]]:
    """The cache's targets for each batch (teacher image + pooled feature), computed once, untimed."""
    from uniremoval.stages.teachers import teacher_targets

    out = []
    for b in batches:
        t_img, t_feat = teacher_targets(teachers, DEGS, b["input"], b["degradation"], CELL)
        out.append({**b, "teacher": t_img, "feature": t_feat})
    return out


def kt_loss(phi: torch.nn.Module) -> torch.nn.Module:
    from uniremoval.losses.mgcl import KTLoss

    return KTLoss(phi)  # paper values: a2 = 0.1, tau = 1e-6, L1, both contrastive terms


# ------------------------------------------------------------------------------------ sections


def bench_matmul(device: torch.device, n: int, reps: int) -> dict[str, Any]:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    dt = time_calls(lambda i: a @ b, reps, device)
    return {"n": n, "dtype": "bf16", "tflops": sig(2 * n**3 / dt / 1e12)}


# What the shared trainer adds around a step (`trainer_check` of make_step): its non-finite check
# as a device flag that the fused Adam reads and the host reads a step later, or as a host read of
# every term before the backward (the trainer's way for other optimisers); and the running sums.
TRAINER_CHECKS = ("device", "host")


def make_step(student, loss_fn, opt, batches, teachers, dtype, trainer_check: str | None = None,
              cudagraphs: bool = False) -> Callable[[int], Any]:
    """One KT training step. `trainer_check` ("device" or "host", see TRAINER_CHECKS) adds what
    Trainer.optimize and Trainer._accumulate_terms do per step around it. `cudagraphs` (compile
    modes reduce-overhead and max-autotune): each step starts a new CUDA-graph iteration, as torch's
    CUDA-graph trees ask of a training loop that calls compiled modules several times per step."""
    from uniremoval.stages.kt import kt_terms

    sums: dict[str, Any] = {}
    pending: list[fast.HostCopy] = []
    if trainer_check == "device" and not fast.skips_on_device(opt):
        raise SystemExit("the device check needs the fused Adam (--cpu-fused on CPU)")

    def step(i: int):
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        batch = batches[i % len(batches)]
        with fast.autocast(batch["input"].device, dtype):
            terms, _, _ = kt_terms(student, loss_fn, batch, A1, CELL, teachers=teachers,
                                   degradations=DEGS if teachers else None)
        values = torch.stack([v.detach().float().sum() for v in terms.values()]) if trainer_check else None
        if trainer_check == "host":  # as Trainer._nonfinite_terms: the host waits for the forward
            values.tolist()
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        if trainer_check == "device":  # as Trainer._optimize_on_device_check
            flags = (~torch.isfinite(values)).any().float()
            opt.found_inf = torch.stack([flags, torch.zeros_like(flags)])[0]
        opt.step()
        opt.found_inf = None
        if trainer_check == "device":  # the last step's flags are read once this one is queued
            while pending:
                pending.pop().get().tolist()
            pending.append(fast.HostCopy(torch.cat([flags.reshape(1), values])))
        if trainer_check:  # as Trainer._accumulate_terms
            for k, v in terms.items():
                v = v.detach().double().sum()
                sums[k] = sums.get(k, 0.0) + torch.where(torch.isfinite(v), v, torch.zeros_like(v))
        return terms

    return step


def count_flops(step: Callable[[int], Any]) -> tuple[float, dict[str, float], Any]:
    """FLOPs of one step (matmuls and convolutions, forward and backward), the same split by kind
    ("convolution", "matmul": the profile's kernel kinds, so that a kind's TFLOP/s can be read off
    its device time) and the step's terms."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        terms = step(0)
    by_kind: dict[str, float] = {}
    for op, flops in counter.get_flop_counts().get("Global", {}).items():
        kind = "convolution" if "conv" in str(op) else "matmul"  # aten.convolution(_backward) | mm, addmm, bmm...
        by_kind[kind] = by_kind.get(kind, 0.0) + float(flops)
    return float(counter.get_total_flops()), by_kind, terms


# Kernel kinds, by the first fragment found in a kernel's lower-cased name (the order matters:
# cuDNN's layout transposes and Triton's fused kernels before the convolutions they surround).
KERNEL_KINDS = (
    ("layout transpose", ("nchwtonhwc", "nhwctonchw", "transpose")),
    ("triton (fused)", ("triton",)),
    ("optimizer", ("adam", "multi_tensor")),
    # cuDNN names its convolutions sm90_xmma_fprop_implicit_gemm... (not "conv": "convert" would match)
    ("convolution", ("fprop", "dgrad", "wgrad", "implicit", "conv2d", "convolution", "cudnn")),
    ("matmul", ("gemm", "cutlass", "cublas")),
    ("upsample", ("upsample",)),
    ("reduction", ("reduce",)),
    ("elementwise", ("elementwise", "vectorized", "unrolled")),
    ("copy", ("copy", "memcpy", "memset", "catarray")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, frags in KERNEL_KINDS if any(f in low for f in frags)), "other")


def profile_calls(step: Callable[[int], Any], n: int, device: torch.device, step_s: float) -> dict[str, Any]:
    """Where `n` steps spend their device time (CPU ops on CPU): busy ms per step against the timed
    step, by kernel kind, and the kernels that take the most. A step whose busy time is well under
    its wall time waits on the host (launches, syncs); one that is busy throughout is kernel-bound."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    with profile(activities=acts) as prof:
        for i in range(n):
            step(i)
        sync(device)
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU

    def self_us(e: Any) -> float:
        if cuda:
            return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0))
        return float(e.self_cpu_time_total)

    rows = [e for e in prof.key_averages() if e.device_type == kind and self_us(e) > 0]
    rows.sort(key=self_us, reverse=True)
    busy_ms = sum(self_us(e) for e in rows) / 1e3 / n
    kinds: dict[str, float] = {}
    for e in rows:
        k = kernel_kind(e.key)
        kinds[k] = kinds.get(k, 0.0) + self_us(e) / 1e3 / n
    return {
        "steps": n, "step_ms": round(step_s * 1e3, 2), "busy_ms_per_step": round(busy_ms, 2),
        "busy_frac": round(busy_ms / (step_s * 1e3), 3), "launches_per_step": sum(e.count for e in rows) // n,
        "by_kind_ms": {k: round(v, 2) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "top": [{"name": e.key[:110], "kind": kernel_kind(e.key), "ms_per_step": round(self_us(e) / 1e3 / n, 3),
                 "calls_per_step": e.count // n} for e in rows[:30]],
    }


def bench_naive(models, args, device, results) -> None:
    import copy

    student = copy.deepcopy(models["student"]).to(device).train()
    phi = copy.deepcopy(models["phi"]).to(device)
    opt = torch.optim.Adam(student.parameters(), lr=2e-5)  # PyTorch's default implementation
    batches = make_batches(2, args.batch, args.crop, device)
    step = make_step(student, kt_loss(phi), opt, batches, models["teachers"], None)
    reset_peak(device)
    # MPRNet's official train.py sets cudnn.benchmark = True; TF32 convolutions are PyTorch's default.
    with fast.math_flags(cudnn_tf32=True, cudnn_benchmark=True):
        # The first step (allocator, cuDNN's algorithm search) is timed apart; it also counts the FLOPs.
        sync(device)
        t0 = time.perf_counter()
        flops, flops_by_kind, terms = count_flops(step) if args.flops else (None, None, step(0))
        sync(device)
        t_first = time.perf_counter() - t0
        time_calls(step, args.warmup, device, start=1)
        dt = time_calls(step, args.steps, device, start=1 + args.warmup)
    terms = {k: float(v.detach()) for k, v in terms.items()}
    results["naive"] = {
        "what": "fp32 eager, the official train.py's flags (cuDNN TF32 convs, cudnn.benchmark), teachers online, "
                "default Adam",
        "img_s": sig(args.batch / dt), "step_ms": round(dt * 1e3, 2), "first_step_s": round(t_first, 2),
        "peak_mem_gib": peak_gib(device), "flops_per_step": flops, "flops_by_kind": flops_by_kind,
        "loss_terms": terms,
    }
    del student, phi, opt, batches
    reset_peak(device)


def bench_ours(models, args, device, results, compiled: bool, trainer_check: str | None = None,
               flush: Callable[[], Any] | None = None, profile_steps: int = 0, batch: int | None = None) -> None:
    """Our KT step. Compiled, it is timed with what the trainer does around it (its own non-finite
    check), so `ours_compiled` is the trainer's step; eager, bare (`ours`) and with either check.
    `batch` (eager and bare only): the step at another per-device batch, as `ours_batch<N>`, timed
    alone (no FLOP count, no student-only timing, no profile)."""
    import copy

    key = "ours_compiled" if compiled else (f"ours_trainer_{trainer_check}_check" if trainer_check else "ours")
    scaling = batch is not None and batch != args.batch
    if scaling:
        assert not compiled and not trainer_check and not profile_steps
        key = batch_key(batch)
    batch = args.batch if batch is None else batch
    mode_name = args.compile_mode[0]  # the compiled-step child runs one mode
    dtype = fast.autocast_dtype(args.precision, device)
    student = fast.to_channels_last(copy.deepcopy(models["student"]).to(device)).train()
    phi = fast.to_channels_last(copy.deepcopy(models["phi"]).to(device))
    opt = fast.make_adam(student.parameters(), 2e-5, device, fused=None if not args.cpu_fused else True)
    batches = add_cached_targets(make_batches(2, batch, args.crop, device), models["teachers"])
    batches = [fast.to_device(b, device, channels_last=True) for b in batches]
    run_student, run_phi = student, phi
    adam = "fused" if "fused" in fast.adam_impl(device, True if args.cpu_fused else None) else "foreach"
    if compiled:  # the check the trainer would pick for this optimiser
        trainer_check = "device" if fast.skips_on_device(opt) else "host"
    out: dict[str, Any] = {
        "trainer_check": trainer_check,  # summarise() sets a compiled step beside the eager one with the same check
        "what": f"{args.precision} autocast (networks; contrastive loss fp32), channels_last, "
                f"{benchmark_what(args)}, {adam} Adam, cached teacher targets"
                + (f", torch.compile backend={args.compile_backend} mode={mode_name}" if compiled else "")
                + (inductor_what(results) if compiled else "")
                + (f", the trainer's {trainer_check}-side non-finite check and running sums" if trainer_check else ""),
    }
    if compiled:
        cache = fast.set_compile_cache(args.compile_cache)  # before the artifacts are loaded into it
        out["compile_cache"] = str(cache)
        if args.compile_artifacts:
            out["artifacts_loaded"] = fast.load_compile_artifacts(args.compile_artifacts)
        mode = None if mode_name == "default" else mode_name
        run_student = fast.compile_module(student, cache, mode=mode, backend=args.compile_backend)
        run_phi = fast.compile_module(phi, cache, mode=mode, backend=args.compile_backend)
    cudagraphs = compiled and args.compile_backend == "inductor" and mode_name in fast.CUDA_GRAPH_MODES
    step = make_step(run_student, kt_loss(run_phi), opt, batches, None, dtype, trainer_check, cudagraphs)
    reset_peak(device)
    # The first steps compile (the second one too: the first backward compiles lazily) and let
    # cudnn.benchmark pick its algorithms: timed apart.
    # Eager: the first step also counts the FLOPs (the counter cannot see inside compiled code).
    n_first = 2 if compiled else 1
    with ours_flags(args):
        sync(device)
        t0 = time.perf_counter()
        if args.flops and not compiled and not trainer_check and not scaling:
            out["flops_per_step"], out["flops_by_kind"], terms = count_flops(step)
        else:
            terms = step(0)
        for i in range(1, n_first):
            step(i)
        sync(device)
        t_first = time.perf_counter() - t0
        if flush is not None:  # the compiled child: what it has if the deadline stops it while timing
            results[key] = {**out, f"first_{n_first}_steps_s": round(t_first, 2), "peak_mem_gib": peak_gib(device)}
            flush()
        steps = max(1, args.steps // 2) if scaling else args.steps  # the budget: 2-4x the images a step
        time_calls(step, args.warmup, device, start=n_first)
        dt = time_calls(step, steps, device, start=n_first + args.warmup)
        if not compiled and not trainer_check and not scaling:
            # The network alone (forward + backward of the student, no KT loss, no VGG-19, no update):
            # what the step costs beyond it is the losses' and the optimiser's.
            def student_only(i: int, batches=batches, student=student) -> None:  # bound: deleted below
                x = batches[i % len(batches)]["input"]
                with fast.autocast(x.device, dtype):
                    images, feature = student(x, return_feature=True)
                    loss = images[0].float().mean() + feature.float().mean()
                loss.backward()

            time_calls(student_only, 1, device)
            out["student_fwd_bwd_ms"] = round(time_calls(student_only, args.steps, device) * 1e3, 2)
            del student_only
            opt.zero_grad(set_to_none=True)
        if profile_steps:
            try:  # the profiler (CUPTI) may be refused on a machine: the timing above still counts
                out["profile"] = profile_calls(step, profile_steps, device, dt)
            except Exception as exc:  # noqa: BLE001
                out["profile"] = {"error": f"{type(exc).__name__}: {exc}"[:800]}
                log(f"profile FAILED: {exc}")
    out.update({"batch": batch, "img_s": sig(batch / dt), "step_ms": round(dt * 1e3, 2),
                "peak_mem_gib": peak_gib(device), f"first_{n_first}_steps_s": round(t_first, 2),
                "loss_terms": {k: float(v.detach()) for k, v in terms.items()}})
    if compiled:
        out["compile_s"] = round(max(0.0, t_first - n_first * dt), 1)
        if args.compile_artifacts:
            out["artifacts_saved_bytes"] = fast.save_compile_artifacts(args.compile_artifacts)
    results[key] = out
    del student, phi, opt, batches, run_student, run_phi, step
    if compiled:
        torch.compiler.reset()
    reset_peak(device)


BATCH_KEY = "ours_batch"  # + the per-device batch: the eager step timed at it


def batch_key(batch: int) -> str:
    return f"{BATCH_KEY}{batch}"


def bench_batch_scaling(models, args, device, results) -> None:
    """The eager fast step at larger per-device batches (`--scale-batches`): whether a GPU does more
    images a second with more of them per step (small convolutions fill it better; memory grows)."""
    for b in args.scale_batches:
        with section(results, batch_key(b)):
            bench_ours(models, args, device, results, compiled=False, batch=b)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def cache_setup(models, args, device) -> Any:
    """What the cache sections share: the blur teacher as the official inference runs it (fp32,
    NCHW, cuDNN TF32 convolutions), a channels-last copy with the cache's settings (configs/cache.yaml:
    bf16), and two distinct batches of --cache-batch frames; ``run(t, speed, n)`` is the call i that
    feeds `t` the n frames from (i * n) mod 2nb (each call other data than the last)."""
    import copy
    import dataclasses
    from types import SimpleNamespace

    from uniremoval.stages.cache import run_teacher

    w, h = args.cache_size
    nb = args.cache_batch
    gen = torch.Generator().manual_seed(3)
    frames = (torch.rand(2 * nb, 3, h, w, generator=gen) * 2 - 1).to(device)
    teacher = models["teachers"][DEGS[-1]]
    fast_teacher = copy.copy(teacher)
    fast_teacher.model = fast.to_channels_last(copy.deepcopy(teacher.model))
    fp32 = fast.Speed(device=device)
    ours = dataclasses.replace(fp32, dtype=fast.autocast_dtype(args.precision, device), channels_last=True)

    def run(t, speed, n):
        return lambda i: run_teacher(t, frames[(i * n) % (2 * nb):][:n], CELL, speed)

    return SimpleNamespace(teacher=teacher, fast_teacher=fast_teacher, fp32=fp32, ours=ours, nb=nb, run=run,
                           frame=f"{w}x{h}")


def bench_cache_build(models, args, device, results) -> None:
    """Teacher inference on full frames, through the function `uniremoval cache` runs per batch:
    official inference (fp32, one frame per forward) against the cache's settings (configs/cache.yaml:
    bf16, channels_last, `cache.batch_size` frames of one size per forward: --cache-batch)."""
    c = cache_setup(models, args, device)
    out: dict[str, Any] = {"frame": c.frame, "frames_timed": args.cache_frames, "ours_batch": c.nb}
    reset_peak(device)
    with fast.math_flags(cudnn_tf32=True, cudnn_benchmark=False):
        call = c.run(c.teacher, c.fp32, 1)
        ref_img, ref_feat = call(0)
        dt = time_calls(call, args.cache_frames, device)
    out["fp32_eager"] = {"frames_s": sig(1 / dt), "peak_mem_gib": peak_gib(device), "batch": 1}

    # configs/cache.yaml's settings (one size of frame here, so cache.cudnn_benchmark: true).
    reset_peak(device)
    with ours_flags(args):
        call = c.run(c.fast_teacher, c.ours, c.nb)
        img, feat = call(0)
        calls = max(1, math.ceil(args.cache_frames / c.nb))
        dt2 = time_calls(call, calls, device) / c.nb
    out["ours"] = {"frames_s": sig(1 / dt2), "peak_mem_gib": peak_gib(device), "batch": c.nb,
                   "what": f"{args.precision} autocast, channels_last, {benchmark_what(args)}, {c.nb} frames per forward"}
    out["ratio"] = round(dt / dt2, 2)
    out.update(stored_diff(img[:1], feat[:1], ref_img, ref_feat))
    results["cache_build"] = out
    if args.cache_stage_frames:
        out["stage"] = bench_cache_stage(c.fast_teacher, c.ours, args)


def bench_upsample(models, args, device, results, compile_paths: bool = True) -> None:
    """MPRNet's bilinear x2 (UpSample) forward + backward at the shapes the student runs it in one
    step, summed per step: PyTorch's kernel eager, the op compiled (inductor's decomposition, whose
    backward scatters with atomic adds), and the gather stencil compiled (what the model runs under
    torch.compile: `mprnet_arch.upsample2x`) and eager. bf16, channels_last, as the fast step."""
    import copy
    from collections import Counter

    import torch.nn.functional as F

    from uniremoval.models.mprnet_arch import UpSample, upsample2x_stencil

    dtype = fast.autocast_dtype(args.precision, device)
    student = fast.to_channels_last(copy.deepcopy(models["student"]).to(device))
    shapes: Counter = Counter()
    hooks = [m.register_forward_hook(lambda mod, inp, out: shapes.update([tuple(out.shape[:2]) + tuple(inp[0].shape[2:])]))
             for m in student.modules() if isinstance(m, UpSample)]
    x = make_batches(1, args.batch, args.crop, device)[0]["input"].contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), fast.autocast(device, dtype):
        student(x)
    for h in hooks:
        h.remove()
    del student

    def native(t):
        return F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False)

    paths = {"eager_native": (native, False), "eager_stencil": (upsample2x_stencil, False)}
    if args.compile and compile_paths:
        paths.update({"compiled_native": (native, True), "compiled_stencil": (upsample2x_stencil, True)})
    out: dict[str, Any] = {"calls_per_forward": sum(shapes.values()),
                           "shapes": {"x".join(map(str, k)): v for k, v in sorted(shapes.items())}}
    if args.compile and not compile_paths:
        out["compiled_paths"] = f"not run: under {UPSAMPLE_COMPILE_RESERVE_S} s of --budget-s left for the compiled steps"
    gen = torch.Generator().manual_seed(4)
    for name, (fn, compiled) in paths.items():
        total = 0.0
        for (n, c, h, w), count in shapes.items():
            t = torch.randn(n, c, h, w, generator=gen).to(device, dtype).contiguous(memory_format=torch.channels_last)
            t.requires_grad_(True)
            g = torch.randn(n, c, 2 * h, 2 * w, generator=gen).to(device, dtype).contiguous(memory_format=torch.channels_last)
            f = torch.compile(fn, dynamic=False, backend=args.compile_backend) if compiled else fn
            call = lambda i, f=f, t=t, g=g: torch.autograd.grad(f(t), t, g)
            time_calls(call, 2, device)  # compile, cuDNN/allocator warm-up
            total += time_calls(call, max(3, args.steps), device) * count
        out[f"{name}_ms_per_step"] = round(total * 1e3, 3)
        if compiled:
            torch.compiler.reset()
    if "compiled_stencil_ms_per_step" in out:
        out["compiled_native_over_stencil"] = round(out["compiled_native_ms_per_step"]
                                                    / max(out["compiled_stencil_ms_per_step"], 1e-9), 2)
    results["upsample"] = out


# The up-sampling's compiles run in this process, outside the compiled steps' deadlines: only while
# the budget still holds this much for those (the compiled KT step took 121 s on the H200).
UPSAMPLE_COMPILE_RESERVE_S = 240


def stored_diff(img, feat, ref_img, ref_feat) -> dict[str, Any]:
    """How far two teacher outputs are apart in what the cache stores: 8-bit PNG levels of the image
    and the relative error of the (float16-stored) pooled feature."""
    levels = lambda t: ((t.float().clamp(-1, 1) + 1) * 127.5).round()
    diff = (levels(img) - levels(ref_img)).abs()
    return {"stored_image_max_level_diff": int(diff.max()),
            "stored_image_frac_levels_differ": round(float((diff > 0).float().mean()), 5),
            "feature_rel_err": float((feat.float() - ref_feat).norm() / ref_feat.norm().clamp_min(1e-30))}


def bench_cache_compiled(models, args, device, results, flush: Callable[[], Any]) -> None:
    """The cache's teacher inference (as ``cache_build``'s ``ours``: same frames, batch, precision)
    with the teacher compiled, as `uniremoval cache` does under ``model.compile``. Run in a child
    process under a deadline (the compile takes minutes); ``compile_s`` is reported apart."""
    c = cache_setup(models, args, device)
    mode_name = args.compile_mode[0]
    with fast.math_flags(cudnn_tf32=True, cudnn_benchmark=False):
        ref_img, ref_feat = c.run(c.teacher, c.fp32, 1)(0)  # what the stored values are compared to
    cache = fast.set_compile_cache(args.compile_cache)
    fast.compile_module(c.fast_teacher.model, cache, mode=None if mode_name == "default" else mode_name,
                        backend=args.compile_backend)
    call = c.run(c.fast_teacher, c.ours, c.nb)
    out: dict[str, Any] = {"frame": c.frame, "batch": c.nb, "compile_cache": str(cache),
                           "what": f"as cache_build.ours, the teacher compiled (backend={args.compile_backend} "
                                   f"mode={mode_name}{inductor_what(results)})"}
    reset_peak(device)
    with ours_flags(args):
        sync(device)
        t0 = time.perf_counter()
        img, feat = call(0)
        sync(device)
        t_first = time.perf_counter() - t0
        results["cache_compiled"] = {**out, "first_call_s": round(t_first, 2)}
        flush()  # kept if the deadline stops the timing
        calls = max(1, math.ceil(args.cache_frames / c.nb))
        time_calls(call, 1, device, start=1)
        dt = time_calls(call, calls, device, start=2) / c.nb
    out.update({"frames_s": sig(1 / dt), "peak_mem_gib": peak_gib(device), "first_call_s": round(t_first, 2),
                "compile_s": round(max(0.0, t_first - c.nb * dt), 1),
                **stored_diff(img[:1], feat[:1], ref_img, ref_feat)})
    results["cache_compiled"] = out


def bench_eval(models, args, device, results) -> None:
    """`uniremoval eval` on real-image sized frames: the restore (fp32, as eval runs the model) against
    the no-reference score (PIQE through pyiqa, on the same device; BRISQUE needs a parameter file
    that cannot be fetched here). `score_over_restore` > 1: the metric never holds eval up."""
    import copy

    from uniremoval.eval.metrics import Scorer
    from uniremoval.eval.restore import restore_tensor

    w, h = args.cache_size
    n = args.eval_frames
    model = copy.deepcopy(models["student"]).to(device).eval()
    x = torch.stack([torch.from_numpy(f).permute(2, 0, 1).float() / 255
                     for f in photo_like_frames(n, w, h, seed=9)]).to(device)
    out: dict[str, Any] = {"frame": f"{w}x{h}", "frames": n, "batch": args.eval_batch, "metric": "piqe"}
    b = args.eval_batch
    with fast.math_flags(cudnn_tf32=True, cudnn_benchmark=False):  # eval's settings: fp32, shapes vary
        restore_tensor(model, x[:b], "minus_one_one", batch_size=b)  # warm-up (allocator, cuDNN set-up)
        sync(device)
        t0 = time.perf_counter()
        restored = restore_tensor(model, x, "minus_one_one", batch_size=b)
        sync(device)
        dt = time.perf_counter() - t0
    out["restore_frames_s"] = sig(n / dt)
    scorer = Scorer(["piqe"], device=str(device))
    scorer.score(restored[:b])  # warm-up
    t_score = time_calls(lambda i: [scorer.score(r) for r in torch.split(restored, b)], 1, device)
    out["score_images_s"] = sig(n / t_score)
    out["score_over_restore"] = round(out["score_images_s"] / out["restore_frames_s"], 2)
    results["eval"] = out


def bench_cache_stage(teacher, speed, args) -> dict[str, Any]:
    """`uniremoval cache` end to end on one source shard of photo-like frames: decode, teacher, PNG
    encode, tar write. Serial (cache.workers 0) against encoder threads beside the teacher
    (configs/cache.yaml), which must write the same bytes. Each side first runs untimed on a short
    shard (the teacher's batch shapes, the thread pool, the codecs warm up), then the two sides
    alternate `CACHE_STAGE_REPEATS` times and the medians count."""
    import statistics

    from uniremoval.stages.cache import _want, cache_shard

    w, h = args.cache_size
    n = args.cache_stage_frames
    with scratch_dir("gpu_bench_cache_") as tmp:
        frames = [encode_png(f) for f in photo_like_frames(min(n, 4), w, h)]  # a few, repeated: encoding is slow

        def source(name: str, count: int) -> Path:
            path = Path(tmp) / name
            with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
                for i in range(count):
                    for ext, data in (("input.png", frames[i % len(frames)]),
                                      ("json", json.dumps({"degradation": "blur", "split": "train"}).encode())):
                        info = tarfile.TarInfo(f"f{i:05d}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
            return path

        src, warm = source("src.tar", n), source("warm.tar", min(n, 2 * args.cache_batch))
        sides = (("serial", 0), ("threads", args.cache_stage_workers))
        res: dict[str, Any] = {"frames": n, "batch": args.cache_batch, "repeats": CACHE_STAGE_REPEATS}
        rates: dict[str, list[float]] = {label: [] for label, _ in sides}
        shas: dict[str, set[str]] = {label: set() for label, _ in sides}
        with ours_flags(args):
            for run in range(1 + CACHE_STAGE_REPEATS):
                for label, workers in sides:
                    shard = warm if run == 0 else src
                    d = Path(tmp) / f"{label}{run}"
                    d.mkdir()
                    want = _want({"url": str(shard), "source_sha256": "0" * 64}, teacher, CELL, args.precision)
                    sync(args.device)
                    t0 = time.perf_counter()
                    rec = cache_shard(str(shard), d, "c.tar", teacher, CELL, speed, want,
                                      batch_size=args.cache_batch, workers=workers)
                    dt = time.perf_counter() - t0  # cache_shard has written (and so synchronised) every output
                    if run:
                        rates[label].append(rec["samples"] / dt)
                        shas[label].add(rec["sha256"])
        for label, _ in sides:
            res[f"{label}_frames_s"] = sig(statistics.median(rates[label]))
        res["workers"] = args.cache_stage_workers
        res["same_bytes"] = len(shas["serial"] | shas["threads"]) == 1
        res["ratio"] = round(res["threads_frames_s"] / res["serial_frames_s"], 2)
    return res


CACHE_STAGE_REPEATS = 2  # timed runs per side of bench_cache_stage, alternating


def photo_like_frames(k: int, w: int, h: int, seed: int = 5) -> list:
    """`k` smooth colour images with noise (uint8 HxWx3): PNG sizes and decode times of photos."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    out = []
    for _ in range(k):
        f = rng.uniform(1, 6, size=(3, 2))
        img = np.stack([np.sin(f[c, 0] * xx * 6.28) * np.cos(f[c, 1] * yy * 6.28) for c in range(3)], -1)
        out.append((img * 90 + 128 + rng.normal(0, 4, img.shape)).clip(0, 255).astype(np.uint8))
    return out


def write_cache_shards(root: Path, per_type: int, size: tuple[int, int], feat_channels: int, per_shard: int,
                       distinct: int = 4) -> dict:
    """Cache-format shards (input.png, teacher.png, feature.npy float16, json) of photo-like images.

    Only `distinct` samples per type are encoded (PNG encoding is slow) and written again under
    new keys: decoding costs the same, and the shuffle buffer never sees the repeats side by side.
    """
    import numpy as np

    w, h = size
    rng = np.random.default_rng(0)
    dirs = {}
    for t, deg in enumerate(DEGS):
        encoded = []
        for clean in photo_like_frames(min(distinct, per_type), w, h, seed=t):
            degraded = (clean * 0.6 + 90 + rng.normal(0, 3, clean.shape)).clip(0, 255).astype(np.uint8)
            feat = rng.standard_normal((feat_channels, h // CELL, w // CELL)).astype(np.float16)
            buf = io.BytesIO()
            np.save(buf, feat, allow_pickle=False)
            meta = {"degradation": deg, "domain": "synthetic", "source": "bench", "split": "train",
                    "height": h, "width": w}
            encoded.append({"input.png": encode_png(degraded), "teacher.png": encode_png(clean),
                            "feature.npy": buf.getvalue(),
                            "json": json.dumps(meta).encode()})
        d = root / deg
        d.mkdir(parents=True)
        for s in range(math.ceil(per_type / per_shard)):
            with tarfile.open(d / f"{deg}-{s:06d}.tar", "w", format=tarfile.GNU_FORMAT) as tar:
                for i in range(s * per_shard, min(per_type, (s + 1) * per_shard)):
                    for ext, data in encoded[i % len(encoded)].items():
                        info = tarfile.TarInfo(f"{deg}-{i:05d}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
        dirs[deg] = str(d)
    return dirs


def bench_loader(args, device, results, feat_channels: int) -> None:
    from uniremoval.data.pipelines import kt_loader

    workers = args.loader_workers if args.loader_workers is not None else usable_cores()
    with scratch_dir("gpu_bench_shards_") as tmp:
        t0 = time.perf_counter()
        dirs = write_cache_shards(Path(tmp), args.loader_per_type, args.loader_size, feat_channels, per_shard=16)
        gen_s = time.perf_counter() - t0
        steps = args.loader_batches
        loader = kt_loader([(d, [p], d, 1.0) for d, p in dirs.items()], DEGS, args.batch, args.crop, steps,
                           workers, 0, 0, 1, cell=CELL, require=("teacher", "feature"), augment=True,
                           shuffle_buffer=64, pin_memory=device.type == "cuda")
        it = iter(loader)
        t0 = time.perf_counter()
        first = next(it)
        t_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        n = 0
        for batch in it:
            if device.type == "cuda":  # what the step does with it: a copy to the device
                fast.to_device(batch, device, channels_last=True)
            n += 1
            if time.perf_counter() - t0 > args.loader_max_s:  # slower than expected: enough to measure
                break
        sync(device)
        dt = time.perf_counter() - t0
        with contextlib.suppress(Exception):
            it.close()  # stops the workers now (a loop cut short leaves the generator open)
    results["loader"] = {
        "workers": workers, "batch": args.batch, "crop": args.crop, "image": "x".join(map(str, args.loader_size)),
        "fields": sorted(k for k in first if hasattr(first[k], "shape")),
        "samples_s": sig(n * args.batch / dt) if n else None, "first_batch_s": round(t_first, 2),
        "batches_timed": n, "batches_asked": args.loader_batches, "shard_generation_s": round(gen_s, 1),
        "pin_memory": device.type == "cuda",
    }


def bench_trainer(models, args, device, results) -> None:
    """The project's Trainer running the KT stage's own training_step, eager, with configs/kt.yaml's
    settings for speed (bf16, channels_last, fused Adam on CUDA): accelerate, `optimize` and its
    non-finite check, the running sums, the progress bar, each batch's copy from pinned host memory.
    Fed the batches `ours` uses instead of the loader (timed on its own in `loader`), no validation or
    MLflow. `vs_ours_trainer_check`, its img/s over the same work written out in make_step, says
    whether that step (and so each compiled path, timed that way) is what training runs."""
    import copy

    from uniremoval.config import load_config
    from uniremoval.stages import trainer as trainer_mod
    from uniremoval.stages.kt import KnowledgeTransfer

    first = 1 + args.warmup  # the first step (cudnn.benchmark's search) is left out too
    steps = first + args.steps + 1  # the window: from the start of step `first` to that of the last
    marks: list[float] = []
    host_batches = [{k: v.cpu().pin_memory() if device.type == "cuda" else v.cpu() for k, v in b.items()}
                    for b in add_cached_targets(make_batches(2, args.batch, args.crop, device), models["teachers"])]

    class BenchKT(KnowledgeTransfer):
        def preflight(self):
            pass  # the config's cache folders are not read here (nor are its shards: check_inputs below)

        def build_models(self):
            student, phi = copy.deepcopy(models["student"]), copy.deepcopy(models["phi"])
            self.loss_fn = kt_loss(phi)  # the bench's KT loss (paper values), on the phi the trainer moves
            return {"student": student, "phi": phi}

        def train_batches(self, epoch, start, rank, world_size):
            return (host_batches[i % len(host_batches)] for i in range(start, steps))

        def training_step(self, batch, ctx):
            cuda = device.type == "cuda"
            if ctx.step == steps - 1 and cuda:
                torch.cuda.set_sync_debug_mode(0)  # the window's closing sync is the bench's, not counted
            if ctx.step in (first, steps - 1):  # the timed window: whole steps between two syncs
                sync(device)
                marks.append(time.perf_counter())
            if ctx.step == first and cuda:
                torch.cuda.set_sync_debug_mode("warn")  # each host wait for the GPU in the window warns
            return super().training_step(batch, ctx)

    with scratch_dir("gpu_bench_trainer_") as tmp:
        cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "kt.yaml", [
            f"output_dir={tmp}", "tracking.enabled=false", "model.compile=false", f"model.preset={args.preset}",
            f"train.mixed_precision={args.precision}", f"train.max_steps={steps}", f"data.batch_size={args.batch}",
            f"data.crop_size={args.crop}", f"data.feature_cell={CELL}", "data.val=[]", f"train.cpu={device.type != 'cuda'}",
            f"optim.fused={'null' if not args.cpu_fused else 'true'}"])
        real_check, benchmark = trainer_mod.check_inputs, torch.backends.cudnn.benchmark
        trainer_mod.check_inputs = lambda cfg: None  # the config's shard folders are not read here
        try:
            # stdout is the JSON's: the trainer's lines go to stderr with the progress
            with ours_flags(args), contextlib.redirect_stdout(sys.stderr), \
                    warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                trainer = trainer_mod.Trainer(cfg, BenchKT(cfg), handle_signals=False)
                fit = trainer.fit()
        finally:  # the trainer turns cudnn.benchmark on for good: the later baselines keep theirs
            trainer_mod.check_inputs, torch.backends.cudnn.benchmark = real_check, benchmark
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)
    waits = [w for w in caught if "synchronizing" in str(w.message)]
    for w in caught:
        if w not in waits:  # the trainer's own warnings, shown as they would be
            log(f"trainer warning: {w.message}")
    dt = (marks[1] - marks[0]) / args.steps
    check = "device" if trainer._defer_check else "host"
    out = {"what": f"uniremoval's Trainer on the KT stage (configs/kt.yaml, eager), {check}-side non-finite check",
           "img_s": sig(args.batch / dt), "step_ms": round(dt * 1e3, 2), "steps": fit.step,
           "steps_timed": args.steps, "peak_mem_gib": peak_gib(device)}
    if device.type == "cuda":  # torch's sync debug mode over the window (a log step's read included)
        out["host_waits_per_step"] = round(len(waits) / args.steps, 3)
        out["host_waits_at"] = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in waits})[:10]
    mimic = results.get(f"ours_trainer_{check}_check", {}).get("img_s")
    if mimic:
        out["vs_ours_trainer_check"] = round(out["img_s"] / mimic, 3)
    results["trainer"] = out
    del trainer


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ------------------------------------------------------------------------------------ main


def parse_modes(s: str) -> list[str]:
    modes = [m.strip() for m in s.split(",") if m.strip()]
    bad = [m for m in modes if m not in fast.COMPILE_MODES]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"unknown compile mode(s) {bad or s!r}; "
                                         f"choose from {', '.join(fast.COMPILE_MODES)}")
    return list(dict.fromkeys(modes))


def compiled_key(mode: str) -> str:
    """The JSON key of a compile mode's step: ours_compiled for default, ours_compiled_<mode> else."""
    return "ours_compiled" if mode == "default" else "ours_compiled_" + mode.replace("-", "_")


def parse_inductor_option(s: str) -> tuple[str, Any]:
    """``KEY=VALUE`` for torch._inductor.config (VALUE a Python literal, else a string)."""
    import ast

    import torch._inductor.config as inductor_config

    key, sep, raw = s.partition("=")
    key = key.strip()
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--inductor takes KEY=VALUE (e.g. conv_1x1_as_mm=True), got {s!r}")
    if not hasattr(inductor_config, key):
        raise argparse.ArgumentTypeError(f"--inductor {key}: torch._inductor.config has no option {key!r} "
                                         f"(torch {torch.__version__})")
    try:
        value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        value = raw.strip()
    return key, value


def apply_inductor_options(options: list[tuple[str, Any]]) -> dict[str, Any]:
    """Set the --inductor options in this process (a compiled child parses the same argv) and return
    them as inductor reads them back."""
    import torch._inductor.config as inductor_config

    for key, value in options:
        setattr(inductor_config, key, value)
    return {key: getattr(inductor_config, key) for key, _ in options}


def inductor_what(results: dict[str, Any]) -> str:
    """The --inductor options as this process's inductor holds them, for a compiled path's "what"."""
    return "".join(f", inductor {k}={v!r}" for k, v in results.get("settings", {}).get("inductor", {}).items())


@contextlib.contextmanager
def ours_flags(args: argparse.Namespace) -> Iterator[None]:
    """Our paths' convolution flags (cuDNN TF32, cudnn.benchmark) and, with --cudnn-benchmark-limit,
    how many algorithms the benchmark tries per shape; the previous limit is restored after."""
    old = torch.backends.cudnn.benchmark_limit
    if args.cudnn_benchmark_limit is not None:
        torch.backends.cudnn.benchmark_limit = args.cudnn_benchmark_limit
    try:
        with fast.math_flags(cudnn_tf32=True, cudnn_benchmark=True):
            yield
    finally:
        torch.backends.cudnn.benchmark_limit = old


def benchmark_what(args: argparse.Namespace) -> str:
    """cudnn.benchmark as our paths run it, for their "what"."""
    n = args.cudnn_benchmark_limit
    return "cudnn.benchmark" + ("" if n is None else f" (benchmark_limit={n}{': all algorithms' if n == 0 else ''})")


def non_negative_int(s: str) -> int:
    n = int(s)
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s}")
    return n


def parse_batches(s: str) -> list[int]:
    if s.strip().lower() == "none":
        return []
    try:
        out = [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive batch sizes like 32,64 (or none), got {s!r}")
    return out


def parse_size(s: str) -> tuple[int, int]:
    w, h = (int(v) for v in s.lower().split("x"))
    return w, h


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="deblur", help="MPRNet preset (deblur: the paper's; tiny: CPU smoke)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--scale-batches", type=parse_batches, default=None, metavar="N,N",
                   help="per-device batches the eager fast step is also timed at (default 2x and 4x --batch "
                        "on a GPU, 2x elsewhere; 'none': skip)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per path (default 20 GPU, 3 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps after the first two")
    p.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    p.add_argument("--compile", dest="compile", action="store_true", default=None)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--compile-mode", type=parse_modes, default=None,
                   help=f"comma list of torch.compile modes, each timed in its own child ({', '.join(fast.COMPILE_MODES)}; "
                        "default: default,reduce-overhead with inductor on a GPU, else default). The first one's "
                        "key is ours_compiled (ours_compiled_<mode> when it is not default), the others "
                        "ours_compiled_<mode>")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend (aot_eager: checks tracing on CPU without generating code)")
    p.add_argument("--compile-cache", default=os.path.join(tempfile.gettempdir(), "uniremoval_inductor"),
                   help="inductor cache folder (kept between runs on one machine)")
    p.add_argument("--compile-artifacts", default=None,
                   help="file of portable compile artifacts: loaded before compiling when present, saved after")
    p.add_argument("--inductor", type=parse_inductor_option, action="append", default=[], metavar="KEY=VALUE",
                   help="set a torch._inductor.config option for every compile of the run (repeatable), e.g. "
                        "conv_1x1_as_mm=True or coordinate_descent_tuning=True; recorded under settings.inductor")
    p.add_argument("--cudnn-benchmark-limit", type=non_negative_int, default=None, metavar="N",
                   help="algorithms cudnn.benchmark tries per convolution shape on our paths (0: every one; "
                        "default: torch's, 10); the naive baseline keeps torch's default, as the official code")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--cpu-fused", action="store_true", help="fused Adam on CPU too (default: foreach)")
    p.add_argument("--no-flops", dest="flops", action="store_false", help="skip the FLOP counter")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="profile this many steps of ours and of each compiled path after timing them "
                        "(JSON key profile inside each path's entry)")
    p.add_argument("--cache-size", type=parse_size, default=None, help="WxH frame for the cache build (1280x720)")
    p.add_argument("--cache-frames", type=int, default=None, help="frames timed per path (default 8 GPU)")
    p.add_argument("--cache-batch", type=int, default=4,
                   help="frames per forward in the cache path (configs/cache.yaml cache.batch_size)")
    p.add_argument("--cache-stage-frames", type=int, default=None,
                   help="frames for the end-to-end cache stage timing (cache_build.stage; 0 skips it)")
    p.add_argument("--eval-frames", type=int, default=None, help="frames restored and scored (eval section)")
    p.add_argument("--eval-batch", type=int, default=4, help="eval's --batch-size")
    p.add_argument("--cache-stage-workers", type=int, default=2,
                   help="encoder threads of the threaded cache stage (configs/cache.yaml cache.workers)")
    p.add_argument("--loader-workers", type=int, default=None, help="default: one per usable core")
    p.add_argument("--loader-size", type=parse_size, default=None, help="WxH of the generated shard images")
    p.add_argument("--loader-per-type", type=int, default=None)
    p.add_argument("--loader-batches", type=int, default=None)
    p.add_argument("--skip", default="", help="comma list of sections to skip: "
                   "matmul,naive,ours,syncs,trainer,cache,eval,upsample,loader,batches,compiled,cache_compiled")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 with --quick on CPU, where shared cores make "
                        "OpenMP threads wait on each other for seconds per step)")
    p.add_argument("--compile-timeout", type=int, default=240,
                   help="seconds for the compiled step (compile included), run in a child process")
    p.add_argument("--budget-s", type=float, default=400,
                   help="seconds this whole run may take (0: no limit); the compiled step's deadline is cut to "
                        "what is left of it, so the JSON is complete before an outer `timeout 420` stops the run")
    p.add_argument("--loader-max-s", type=float, default=60, help="stop timing the loader after this long")
    p.add_argument("--only", default=None, choices=["matmul", "naive", "ours", "syncs", "trainer", "cache", "eval", "loader", "compiled",
                                                   "cache_compiled", "upsample", "batches"],
                   help="run one section only")
    p.add_argument("--quick", action="store_true", help="small sizes everywhere (CPU smoke test)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # handed on to the compiled-step child
    cuda = torch.cuda.is_available()
    args.device = torch.device(args.device or ("cuda" if cuda else "cpu"))
    if args.device.type == "cuda" and args.device.index is None:
        # torch.cuda.set_device (and a few other calls) refuse a CUDA device without an index.
        args.device = torch.device("cuda", torch.cuda.current_device())
    q, gpu = args.quick, args.device.type == "cuda"
    defaults = {
        "steps": 1 if q else (20 if gpu else 3), "warmup": 0 if q else (3 if gpu else 1),
        "compile": gpu and not q, "cache_size": (1280, 720) if not q else (128, 72),
        "cache_frames": 1 if q else (8 if gpu else 2), "cache_stage_frames": 6 if q else (32 if gpu else 8),
        "eval_frames": 4 if q else (16 if gpu else 4), "loader_size": (480, 320) if not q else (160, 128),
        "loader_per_type": 8 if q else 64, "loader_batches": 4 if q else (200 if gpu else 10),
    }
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.compile_mode is None:  # CUDA graphs need a GPU and inductor; elsewhere one mode is enough
        args.compile_mode = ["default", "reduce-overhead"] if gpu and args.compile_backend == "inductor" else ["default"]
    if q and not gpu and args.batch == 16 and args.crop == 128:
        args.batch, args.crop = 3, 32  # one sample per degradation type; 32 px = 2x2 feature cells
    if args.scale_batches is None:
        args.scale_batches = [2 * args.batch, 4 * args.batch] if gpu else [2 * args.batch]
    args.scale_batches = [b for b in dict.fromkeys(args.scale_batches) if b != args.batch]
    if q and not gpu:
        if args.threads is None:
            args.threads = 1
        if args.only is None:
            args.skip = args.skip + ",syncs"  # host syncs cost nothing where the host does the work
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    return args


def main(argv: list[str] | None = None) -> int:
    import signal

    args = parse_args(argv)
    device = args.device
    # The first main() of the process counts its imports too; a later one (in-process use) starts now.
    t_start = _STATE.pop("t_import", None) or time.perf_counter()
    inductor = apply_inductor_options(args.inductor)  # before any compile, here and in each child
    naive_limit = torch.backends.cudnn.benchmark_limit
    with ours_flags(args):
        ours_limit = torch.backends.cudnn.benchmark_limit
    results: dict[str, Any] = {
        "env": {
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "cores": usable_cores(), "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
            "dev_shm_free_gib": shm_free_gib(),
        },
        "settings": {"preset": args.preset, "batch": args.batch, "crop": args.crop, "steps": args.steps,
                     "warmup": args.warmup, "compile": args.compile, "compile_mode": args.compile_mode,
                     "precision": args.precision, "degradations": DEGS, "tau": 1e-6, "vgg": "relu1_1..relu5_1",
                     "budget_s": args.budget_s or None, "inductor": inductor,
                     "scale_batches": args.scale_batches,
                     "cudnn_benchmark_limit": {"ours": ours_limit, "naive": naive_limit}},
        "complete": False,
    }

    def elapsed() -> float:
        return time.perf_counter() - t_start

    def remaining() -> float:
        return args.budget_s - elapsed() if args.budget_s else math.inf

    def write(final: bool = False) -> str:
        """The JSON as it stands, with its summary; written to --out after every section (atomically:
        a kill mid-write leaves the previous version), so a run stopped from outside keeps its numbers."""
        summarise(results, args)
        results["total_s"] = round(elapsed(), 1)
        results["complete"] = final
        text = json.dumps(results, indent=1, default=str)
        if args.out:
            tmp = Path(f"{args.out}.{os.getpid()}.tmp")
            tmp.write_text(text + "\n")
            os.replace(tmp, args.out)
        return text

    main_pid = os.getpid()

    def on_term(signum: int, _frame: Any) -> None:
        if os.getpid() != main_pid:  # a forked loader worker inherits this handler: it only stops
            os._exit(128 + signum)
        child_out = _STATE["child_out"] if _STATE["child"] is not None else None
        child_key = _STATE.get("child_key") or "ours_compiled"
        stop_child()
        results["interrupted"] = (f"{signal.Signals(signum).name} after {elapsed():.0f} s, in section "
                                  f"{_STATE['section']!r}; sections not in section_s did not run")
        log(results["interrupted"])
        if child_out is not None:  # the compiled step was running: keep what its child had written
            with contextlib.suppress(Exception):
                results[child_key] = child_results(child_out, f"stopped by {signal.Signals(signum).name}",
                                                   _STATE.get("child_src") or "ours_compiled")
        with contextlib.suppress(Exception):
            print(write(), flush=True)
        for tmp in _STATE["tmpdirs"]:
            shutil.rmtree(tmp, ignore_errors=True)
        os._exit(128 + signum)  # not sys.exit: no clean-up that could hang (loader workers, CUDA)

    signal.signal(signal.SIGTERM, on_term)

    if args.threads:
        torch.set_num_threads(args.threads)
    results["env"]["torch_threads"] = torch.get_num_threads()
    if device.type == "cuda":
        torch.cuda.set_device(device)
        results["env"]["gpu_mem_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    models = build_models(args.preset, device)
    results["settings"]["student_params"] = sum(p.numel() for p in models["student"].parameters())
    write()

    def want(name: str) -> bool:
        return name not in args.skip and (args.only is None or args.only == name)

    if want("matmul"):
        with section(results, "matmul_peak"):
            n, reps = (8192, 20) if device.type == "cuda" else (512, 3)
            results["matmul_peak"] = bench_matmul(device, n, reps)
        write()
    if want("naive"):
        with section(results, "naive"):
            bench_naive(models, args, device, results)
        write()
    if want("ours") or (args.only == "batches" and "ours" not in args.skip):  # (the batches' baseline)
        with section(results, "ours"):
            bench_ours(models, args, device, results, compiled=False, profile_steps=args.profile)
        write()
    if want("syncs"):  # the trainer's two ways to check a step's losses, eager
        for check in TRAINER_CHECKS:
            if check == "device" and "fused" not in fast.adam_impl(device, True if args.cpu_fused else None):
                continue
            with section(results, f"ours_trainer_{check}_check"):
                bench_ours(models, args, device, results, compiled=False, trainer_check=check)
            write()
    if want("trainer"):
        with section(results, "trainer"):
            bench_trainer(models, args, device, results)
        write()
    if want("cache"):
        with section(results, "cache_build"):
            bench_cache_build(models, args, device, results)
        write()
    if want("eval"):
        with section(results, "eval"):
            bench_eval(models, args, device, results)
        write()
    if want("upsample"):
        with section(results, "upsample"):
            bench_upsample(models, args, device, results, compile_paths=remaining() > UPSAMPLE_COMPILE_RESERVE_S)
        write()
    if want("loader"):
        with section(results, "loader"):
            args.loader_max_s = max(5.0, min(args.loader_max_s, remaining() - 120))
            bench_loader(args, device, results, models["student"].feature_channels)
        write()
    if want("batches") and args.scale_batches:
        # Before the compiles: the eager steps at 2x/4x the batch take ~30 s on an H200 (the
        # compiled children take what is left of the budget, the last mode skipped if it cannot fit).
        bench_batch_scaling(models, args, device, results)
        write()
    if args.only == "compiled":
        with section(results, "ours_compiled"):
            bench_ours(models, args, device, results, compiled=True, flush=write, profile_steps=args.profile)
    elif args.only == "cache_compiled":
        with section(results, "cache_compiled"):
            bench_cache_compiled(models, args, device, results, flush=write)
    elif args.compile:
        del models
        if device.type == "cuda":
            torch.cuda.empty_cache()
        # Each compile in a child process under a deadline, the most telling first: the KT step in
        # the first mode, then the cache's teacher, then the KT step's other modes.
        jobs = [("compiled", m) for m in args.compile_mode[:1] if want("compiled")]
        jobs += [("cache_compiled", args.compile_mode[0])] if want("cache") and want("cache_compiled") else []
        jobs += [("compiled", m) for m in args.compile_mode[1:] if want("compiled")]
        for only, mode in jobs:
            key = compiled_key(mode) if only == "compiled" else only
            with section(results, key):
                # The deadline leaves ~15 s of the budget for stopping the child and the last write.
                left = remaining() - 15
                first = compiled_key(args.compile_mode[0])
                took = results.get(first, {}).get("process_s") if only == "compiled" and key != first else None
                why_not = skip_reason(left, args.budget_s, took, args.compile_mode[0])
                if why_not:
                    results[key] = {"error": why_not}
                else:
                    results[key] = compiled_in_subprocess(args, int(min(args.compile_timeout, left)), mode, only)
            write()

    text = write(final=True)
    print(text, flush=True)
    return 0


def shm_free_gib() -> float | None:
    """Free space of /dev/shm, where DataLoader workers hand their batches over (a small one fails them)."""
    try:
        return round(shutil.disk_usage("/dev/shm").free / 2**30, 2)
    except OSError:
        return None


def stop_child() -> None:
    """Kill the compiled-step child and its compile workers (its own process group), if one runs."""
    import signal

    proc = _STATE.get("child")
    if proc is not None:  # the group, even when the child itself has exited: its compile workers may not have
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def skip_reason(left: float, budget_s: float, took: float | None, first_mode: str) -> str | None:
    """Why a compile child is not started with `left` seconds of the budget to go (None: start it).
    `took`: what the first mode's child of the same step took (another mode compiles as long)."""
    if left < 60:  # too little for any compile: the time goes to the final write
        return f"not run: {left + 15:.0f} s left of --budget-s {budget_s}"
    if took and left < took:
        return f"not run: {left:.0f} s left of --budget-s {budget_s}, the {first_mode} mode's child took {took:.0f} s"
    return None


def compiled_in_subprocess(args: argparse.Namespace, limit: int, mode: str, only: str = "compiled") -> dict[str, Any]:
    """A compiled section (`only`: the KT step "compiled" or the cache's teacher "cache_compiled") in
    a child process with a deadline: a compile that runs long is stopped and reported, and every
    other number of this run is kept.

    A new interpreter (subprocess, i.e. fork + exec), not multiprocessing's fork: this process has
    already initialised CUDA, which a forked child could not use.
    """
    import subprocess

    with scratch_dir("gpu_bench_compiled_") as tmp:
        out = Path(tmp) / "compiled.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *args.argv, "--only", only, "--compile-mode", mode,
               "--out", str(out)]
        key = compiled_key(mode) if only == "compiled" else only
        # Own process group (not a new session): the child and its compile workers are stopped
        # together, on the deadline or when this process is told to stop (its SIGTERM handler).
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, process_group=0)
        _STATE["child"], _STATE["child_out"], _STATE["child_key"] = proc, out, key
        _STATE["child_src"] = CHILD_KEYS[only]
        log(f"{key}: child process {proc.pid}, deadline {limit} s")
        error = None
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            error = f"compile + timing did not finish within {limit} s (--compile-timeout {args.compile_timeout}"
            error += ", cut to what --budget-s left)" if limit < args.compile_timeout else ")"
        finally:
            stop_child()  # on the deadline; else compile workers left behind by a finished child
            proc.wait()
            _STATE["child"] = _STATE["child_out"] = _STATE["child_key"] = _STATE["child_src"] = None
        if error is None and proc.returncode != 0:
            error = f"the compiled-step process exited with status {proc.returncode} (see its log above)"
        res = child_results(out, error, CHILD_KEYS[only])
    res["timeout_s"] = limit
    return res


# The key under which a child (--only X) writes its section in its own JSON.
CHILD_KEYS = {"compiled": "ours_compiled", "cache_compiled": "cache_compiled"}


def child_results(out: Path, error: str | None, src_key: str = "ours_compiled") -> dict[str, Any]:
    """A compiled section's entry (`src_key`) from the child's JSON file; on an `error` (deadline,
    crash, SIGTERM) what the child had written when it stopped (e.g. the compile time, without the
    timing) is kept."""
    child: dict[str, Any] = {}
    if out.is_file():
        with contextlib.suppress(ValueError, OSError):
            child = json.loads(out.read_text())
    res = dict(child.get(src_key) or {})
    if error:
        res["error"] = res.get("error") or error
    elif not res:
        res = {"error": "the compiled-step process wrote no results (see its log above)"}
    res["process_s"] = child.get("section_s", {}).get(src_key)
    return res


def summarise(results: dict[str, Any], args: argparse.Namespace) -> None:
    """The headline numbers: ratio to the naive step, TFLOP/s and the fraction of the matmul peak."""
    s: dict[str, Any] = {}
    naive = results.get("naive", {})
    peak = results.get("matmul_peak", {}).get("tflops")
    flops_ours = results.get("ours", {}).get("flops_per_step")
    flops_by_kind_ours = results.get("ours", {}).get("flops_by_kind")
    compiled = sorted(k for k in results if k.startswith("ours_compiled"))
    for key in ("naive", "ours", *(f"ours_trainer_{c}_check" for c in TRAINER_CHECKS), *compiled):
        r = results.get(key, {})
        if "img_s" not in r:
            continue
        flops = r.get("flops_per_step") or (flops_ours if key != "naive" else None)
        if flops:
            tflops = flops / (r["step_ms"] / 1e3) / 1e12
            r["achieved_tflops"] = sig(tflops)
            if peak:
                r["frac_of_bf16_matmul_peak"] = sig(tflops / peak, 3)
                r["limit_img_s"] = sig(peak * 1e12 / (flops / args.batch))
        if key != "naive" and naive.get("img_s"):
            r["ratio_vs_naive"] = round(r["img_s"] / naive["img_s"], 2)
        by_flops = r.get("flops_by_kind") or (flops_by_kind_ours if key != "naive" else None)
        by_ms = r.get("profile", {}).get("by_kind_ms", {})
        if by_flops and by_ms:
            # each kind's own rate: its FLOPs over its kernels' device time (the whole step's rate
            # above also pays for every memory-bound kernel and every gap)
            r["profile"]["tflops_by_kind"] = {k: sig(by_flops[k] / (by_ms[k] / 1e3) / 1e12)
                                              for k in by_flops if by_ms.get(k)}
        if key != "naive" and naive.get("loss_terms") and r.get("loss_terms"):
            # Same first batch, same initial weights, same teacher targets: the terms must agree
            # within the bf16 tolerance of tests/test_fast_equivalence.py (3e-2).
            r["loss_rel_diff_vs_naive"] = {
                k: sig(abs(v - naive["loss_terms"][k]) / max(abs(naive["loss_terms"][k]), 1e-30), 3)
                for k, v in r["loss_terms"].items() if k in naive["loss_terms"]}
    for comp in (results[k] for k in compiled):
        # What the compile saves a step: against the eager step doing the same per-step work (the
        # compiled step carries the trainer's non-finite check and running sums; bare `ours` does not).
        ref_key = f"ours_trainer_{comp['trainer_check']}_check" if comp.get("trainer_check") else "ours"
        if not results.get(ref_key, {}).get("img_s"):
            ref_key = "ours"
        eager = results.get(ref_key, {})
        if comp.get("img_s") and eager.get("img_s") and comp.get("compile_s") is not None:
            saved = eager["step_ms"] - comp["step_ms"]
            comp["breakeven_steps"] = math.ceil(comp["compile_s"] * 1e3 / saved) if saved > 0 else None
            comp["breakeven_vs"] = ref_key
    best_key = max(("ours", *compiled), key=lambda k: results.get(k, {}).get("img_s") or 0)
    best = results.get(best_key, {})
    if best.get("img_s") and naive.get("img_s"):
        s["naive_img_s"] = naive["img_s"]
        s["ours_img_s"] = best["img_s"]
        s["ours_path"] = best_key
        s["ratio"] = round(best["img_s"] / naive["img_s"], 2)
        s["goal_ratio"] = 5.0
        s["frac_of_bf16_matmul_peak"] = best.get("frac_of_bf16_matmul_peak")
        if flops_ours:
            # What reaching the goal asks: the rate the whole step would have to sustain, and the
            # bound the convolutions set as they run now (the step's img/s were every other kernel free).
            per_img = flops_ours / args.batch
            s["tflops_needed_for_goal"] = sig(s["goal_ratio"] * naive["img_s"] * per_img / 1e12)
            if peak:
                s["needed_frac_of_bf16_matmul_peak"] = sig(s["tflops_needed_for_goal"] / peak, 3)
            conv_tflops = best.get("profile", {}).get("tflops_by_kind", {}).get("convolution")
            conv_flops = (flops_by_kind_ours or {}).get("convolution")
            if conv_tflops and conv_flops:
                s["conv_tflops"] = conv_tflops
                s["conv_bound_img_s"] = sig(conv_tflops * 1e12 / (conv_flops / args.batch))
                s["conv_bound_ratio"] = round(s["conv_bound_img_s"] / naive["img_s"], 2)
    cb, cc = results.get("cache_build", {}), results.get("cache_compiled", {})
    if "ratio" in cb:
        s["cache_build_ratio"] = cb["ratio"]
        s["cache_build_path"] = "cache_build.ours"
        s["goal_cache_build_ratio"] = 2.0
        fp32, eager = cb.get("fp32_eager", {}).get("frames_s"), cb.get("ours", {}).get("frames_s")
        if cc.get("frames_s") and fp32 and eager:
            cc["ratio_vs_fp32"] = round(cc["frames_s"] / fp32, 2)
            saved = 1 / eager - 1 / cc["frames_s"]  # seconds per frame
            if cc.get("compile_s") is not None:
                cc["breakeven_frames"] = math.ceil(round(cc["compile_s"] / saved, 6)) if saved > 0 else None
            if cc["frames_s"] > eager:
                s["cache_build_ratio"], s["cache_build_path"] = cc["ratio_vs_fp32"], "cache_compiled"
    eager = results.get("ours", {})
    if eager.get("student_fwd_bwd_ms") and eager.get("step_ms"):
        # the eager step's share spent in the student network itself (the rest: losses, VGG-19, Adam)
        s["student_share_of_step"] = round(eager["student_fwd_bwd_ms"] / eager["step_ms"], 2)
    stage = results.get("cache_build", {}).get("stage", {})
    if stage.get("threads_frames_s") and results["cache_build"].get("ours", {}).get("frames_s"):
        # ~1: the cache stage runs at its teacher's speed (decode and encode hidden beside it)
        s["cache_stage_over_teacher"] = round(stage["threads_frames_s"] / results["cache_build"]["ours"]["frames_s"], 2)
    if results.get("eval", {}).get("score_over_restore"):
        s["eval_score_over_restore"] = results["eval"]["score_over_restore"]
    bare = results.get("ours", {}).get("img_s")
    for check in TRAINER_CHECKS:  # what the trainer's bookkeeping costs the eager step (1.0: nothing)
        with_check = results.get(f"ours_trainer_{check}_check", {}).get("img_s")
        if bare and with_check:
            s[f"trainer_{check}_check_slowdown"] = round(bare / with_check, 3)
    scaled = dict(sorted((r["batch"], r) for k, r in results.items() if k.startswith(BATCH_KEY) and r.get("img_s")))
    if scaled and eager.get("img_s"):
        # img/s at each per-device batch over the eager step's at --batch (above 1: a larger batch pays);
        # against the naive step at --batch, the eager step's ratio were the batch that large.
        s["eager_img_s_by_batch"] = {str(args.batch): eager["img_s"], **{str(b): r["img_s"] for b, r in scaled.items()}}
        s["eager_batch_speedup"] = {str(b): round(r["img_s"] / eager["img_s"], 2) for b, r in scaled.items()}
        if naive.get("img_s"):
            s["eager_ratio_vs_naive_by_batch"] = {str(b): round(r["img_s"] / naive["img_s"], 2)
                                                  for b, r in {args.batch: eager, **scaled}.items()}
    if results.get("loader", {}).get("samples_s") and best.get("img_s"):
        s["loader_over_step"] = round(results["loader"]["samples_s"] / best["img_s"], 2)
    results["summary"] = s


if __name__ == "__main__":
    raise SystemExit(main())
