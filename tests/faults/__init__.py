"""Fault-injection suite (issue 12): kills, preemption, corrupt data, unsafe checkpoints, full disks,
bad configs, non-finite losses, an MLflow server that goes away. Every stage runs through the real
CLI (`python -m uniremoval ...`) in a subprocess, on tiny data (tiny MPRNet, 32-48 px)."""
