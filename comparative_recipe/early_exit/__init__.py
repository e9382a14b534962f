"""Early exit with a learned halting distribution (PonderNet's loss, PALBERT's Q-exit).

- ``ponder``: the exit distribution, the truncated geometric prior, the KL, the PonderNet loss
  and the whole-depth exit rules, as pure tensor functions.
- ``heads``: ``HaltingHeads``, one halting head per layer but the last, in one module.
- ``readout``: the task head every layer shares (the model's norm and output projection).
- ``inference``: ``early_exit_forward``, batched layer-by-layer inference with per-row exit.

The training method is ``comparative_recipe.methods.early_exit.EarlyExitMethod``.
"""
