"""Seeing neuron utility: ablation curves and attribution of a checkpoint (``ablation``,
``ablation_plots``), training curves from a run's metric logs (``logs``, ``training_plots``)
and one self-contained HTML report of a run (``report``).

The JSON outputs need nothing beyond the package; the PNG plots and the report need matplotlib
(``pip install 'comparative_recipe[plots]'``), imported only when a plot is drawn.
"""
