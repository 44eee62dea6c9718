"""The experiments layer (above ``jaxrlhf.train``): the oracle demo and the studies, their evaluation,
statistics (intervals, paired tests, over-optimisation), Gao et al. fits, reports and plots.

``pipeline`` is the whole RLHF pipeline as one pure function of a key (``make_train(config) ->
train(key)``, vmappable over seeds and hyper-parameters); ``studies`` runs the comparisons on it.

Modules are imported where they are used (nothing is imported eagerly here), so importing one experiment
does not load the others.
"""
