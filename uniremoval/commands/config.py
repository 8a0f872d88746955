"""`uniremoval config show|hash FILE [key=value ...]`: print the fully resolved configuration."""

from __future__ import annotations

from uniremoval.commands import add_overrides, overrides


def register(subparsers) -> None:
    p = subparsers.add_parser("config", help="show a stage configuration, resolved, or its hash",
                              description="Resolve a config file (extends + overrides) and print it.")
    sub = p.add_subparsers(dest="config_command", metavar="ACTION")
    sub.required = True
    show = sub.add_parser("show", help="print the resolved config as YAML")
    show.add_argument("file", help="a YAML config under configs/")
    add_overrides(show, "dotted overrides, e.g. optim.lr=1e-4 data.batch_size=8")
    show.set_defaults(func=_show)
    h = sub.add_parser("hash", help="print the config hash that tags MLflow runs")
    h.add_argument("file", help="a YAML config under configs/")
    add_overrides(h, "dotted overrides, as for show")
    h.set_defaults(func=_hash)


def _show(args) -> int:
    from uniremoval.config import config_hash, config_to_yaml, load_config

    cfg = load_config(args.file, overrides(args))
    print(f"# resolved from {args.file}; config hash {config_hash(cfg)}")
    print(config_to_yaml(cfg), end="")
    return 0


def _hash(args) -> int:
    from uniremoval.config import config_hash, load_config

    print(config_hash(load_config(args.file, overrides(args))))
    return 0
