"""fastdit with other libraries' formats and runtimes.

- ``diffusers_convert``: diffusers' DiTTransformer2DModel state dict and config <-> the release's;
- ``diffusers_folders``: read diffusers pipeline roots and transformer folders, write transformer folders;
- ``hub``: a Hugging Face repo id -> its snapshot in the local cache (never a download);
- ``diffusers``: a fastdit DiT as a diffusers transformer for DiTPipeline (imports diffusers).

All but ``diffusers`` work without diffusers installed.
"""
