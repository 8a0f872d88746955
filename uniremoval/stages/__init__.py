"""Training stages on one shared trainer (`trainer.py`): teacher, cache, kt, da.

Each stage reads like an algorithm box: data in, losses, `ctx.optimize`, log, checkpoint. See
`uniremoval.stages.trainer` for the contract a stage fulfils.
"""
