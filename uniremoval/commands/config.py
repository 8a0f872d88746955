"""`uniremoval config show|hash FILE|--config FILE [key=value ...]`: print the fully resolved configuration."""

from __future__ import annotations

from uniremoval.commands import add_overrides, overrides


def register(subparsers) -> None:
    p = subparsers.add_parser("config", help="show a stage configuration, resolved, or its hash",
                              description="Resolve a config file (extends + overrides) and print it.")
    sub = p.add_subparsers(dest="config_command", metavar="ACTION")
    sub.required = True
    show = sub.add_parser("show", help="print the resolved config as YAML")
    _config_file(show)
    add_overrides(show, "dotted overrides, e.g. optim.lr=1e-4 data.batch_size=8")
    show.set_defaults(func=_show)
    h = sub.add_parser("hash", help="print the config hash that tags MLflow runs")
    _config_file(h)
    add_overrides(h, "dotted overrides, as for show")
    h.set_defaults(func=_hash)


def _config_file(p) -> None:
    p.add_argument("file", nargs="?", help="a YAML config under configs/")
    p.add_argument("--config", help="the same, spelt as train, cache and eval take it")


def _file(args) -> str:
    """FILE or --config FILE (every other command takes --config: it was refused here). With --config, a
    key=value in FILE's place is the first override."""
    from uniremoval.errors import UniremovalError

    if args.config is None:
        if args.file is None or "=" in args.file:  # (`config hash optim.lr=1e-3`: an override, not a file)
            raise UniremovalError(f"config {args.config_command} needs a config file: FILE or --config FILE")
        return args.file
    if args.file is not None:
        if "=" not in args.file:
            raise UniremovalError(f"two config files given ({args.file} and --config {args.config}); give one")
        args.overrides.insert(0, args.file)
    return args.config


def _show(args) -> int:
    from uniremoval.config import config_hash, config_to_yaml, load_config

    file = _file(args)
    cfg = load_config(file, overrides(args))
    print(f"# resolved from {file}; config hash {config_hash(cfg)}")
    print(config_to_yaml(cfg), end="")
    return 0


def _hash(args) -> int:
    from uniremoval.config import config_hash, load_config

    print(config_hash(load_config(_file(args), overrides(args))))
    return 0
