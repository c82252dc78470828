"""Training: the trainer and its presets (``trainer``), datasets (``data``), the latent shards and their cache
(``shards``, ``encode``), the release's crop (``preprocess``) and run folders (``run_folder``). What sampling
shares with it is below both: ``fastdit.distributed``, ``fastdit.images``, ``fastdit.digits``,
``fastdit.models.vae``."""
