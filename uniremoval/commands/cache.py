"""`uniremoval cache --config configs/cache.yaml [key=value ...] [--check]`.

Runs every frozen teacher over its degradation's synthetic shards and writes cache shards
(sample + teacher.png + feature.npy) under `cache.out/<source name>/`. Several processes:
`accelerate launch --config_file launch/multi_gpu.yaml -m uniremoval cache --config ...`.
Interrupted? Run the same command again: complete shards are kept.
"""

from __future__ import annotations

from uniremoval.commands import add_overrides, overrides


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "cache", help="run the frozen teachers once over the synthetic shards (teacher-output cache)",
        description="Build (or complete) the teacher-output cache that `train kt` reads.")
    p.add_argument("--config", required=True, help="cache stage config YAML (e.g. configs/cache.yaml)")
    add_overrides(p)
    p.add_argument("--check", action="store_true",
                   help="only verify an existing cache against the config's teachers and sources")
    p.set_defaults(func=_handler)


def _handler(args) -> int:
    from uniremoval.config import load_config
    from uniremoval.stages.preflight import check_inputs

    cfg = load_config(args.config, overrides(args), stage="cache")
    if cfg.tracking.enabled and not args.check:  # a wrong server address stops the cache before it computes
        from uniremoval.tracking import refuse_non_mlflow_server, resolve_uri

        refuse_non_mlflow_server(resolve_uri(cfg.tracking.uri))
    check_inputs(cfg)
    if args.check:
        from pathlib import Path

        from uniremoval.stages.cache import check_cache

        for src in cfg.data.train:
            folder = Path(cfg.cache.out) / src.name
            m = check_cache(folder, cfg.teachers.checkpoints, src.shards, cfg.data.feature_cell)
            built = m["cache"].get("precision")
            # KT reads a cache of either precision; a build under another one recomputes every shard
            other = (f"; built with train.mixed_precision={built}: `uniremoval cache` with "
                     f"{cfg.train.mixed_precision} would recompute every shard" if built and
                     built != cfg.train.mixed_precision else "")
            print(f"{folder}: ok ({m['counts']['total']} samples, teacher {m['cache']['teacher']['sha256'][:12]})"
                  f"{other}")
        return 0
    from uniremoval.stages import cache

    return cache.run(cfg, args)
