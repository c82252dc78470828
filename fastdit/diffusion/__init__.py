"""Diffusion: the Gaussian process and its losses (``gaussian``), the solvers (``samplers``), the
guided sample loop (``sampling``), and the step-by-step oracle they are tested against (``reference``)."""
