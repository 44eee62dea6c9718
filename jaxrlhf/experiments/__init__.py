"""The experiments layer (above ``jaxrlhf.train``): the oracle demo and the studies, their evaluation,
statistics (intervals, paired tests, over-optimisation), Gao et al. fits, reports and plots.

Modules are imported where they are used (nothing is imported eagerly here), so importing one experiment
does not load the others.
"""
