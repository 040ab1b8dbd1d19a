"""Reproducible experiments of the Iso-Diffusion paper, each one function behind an `isofast` subcommand.

:mod:`isofast.experiments.toy2d`: DDPM vs Iso-Diffusion on the four synthetic 2D datasets (PRDC table,
scatter grid, forward-process isotropy plots); run it with ``isofast toy2d``. Its tables and figures are
written by :mod:`isofast.experiments.toy2d_report`.
"""
