"""Reproducible experiments of the Iso-Diffusion paper, each one function behind an `isofast` subcommand.

:mod:`isofast.experiments.toy2d`: DDPM vs Iso-Diffusion on the four synthetic 2D datasets (PRDC table,
scatter grid, forward-process isotropy plots); run it with ``isofast toy2d``. Its tables and figures are
written by :mod:`isofast.experiments.toy2d_report`.

:mod:`isofast.experiments.digits_study`: the same comparison (lambda vs 0, paired over seeds, and the
temperature baseline) on scikit-learn's 8x8 digits with a small UNet, on a CPU; run it with
``python -m isofast.experiments.digits_study``.
"""
