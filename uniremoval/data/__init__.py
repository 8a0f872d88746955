"""Data: dataset readers, synthesis, shard writing and manifests, webdataset pipelines.

Kept import-light on purpose (no torch, no numpy here): `uniremoval --help` and the shard tools
import submodules directly, e.g. `from uniremoval.data.manifest import load_manifest`.
"""
