"""Training: the trainer and its presets (``trainer``), datasets (``data``), torchrun process groups
(``distributed``), the VAE and its latent cache (``vae``, ``encode``), image grids (``images``) and the
digits classifier that scores samples (``digits``)."""
