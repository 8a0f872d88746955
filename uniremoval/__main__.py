from uniremoval.cli import entry

entry()
