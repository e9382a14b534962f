"""Training-free task-specific pruning (``tune-cmp prune``): score units on a task, remove the
lowest-scoring ones, write the smaller model.

- ``scores``: the baselines' per-unit scores (random, magnitude, Wanda); attribution is
  ``comparative_recipe.attribution``.
- ``scoring``: the data pass, as a method of the training loop's evaluation (ranks summed).
- ``select``: which units go (uniform or global ranking, grouped-query heads kept).
- ``structure``: cutting the units out of a torchtune decoder (removal = masking).
- ``settings`` / ``export``: the ``prune`` config section and the folder written.
"""
