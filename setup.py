from setuptools import setup

setup(
    name="fastdit",
    version="0.1.0",
    description="Fast, checked DiT (Peebles & Xie, 2023) on fused Triton kernels",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ lives at the top of the repository but installs as fastdit.kernels: a
    # top-level `kernels` module would shadow the PyPI package of that name.
    packages=["fastdit", "fastdit.bench", "fastdit.cli", "fastdit.diffusion", "fastdit.models", "fastdit.train",
              "fastdit.integrations", "fastdit.parallel", "fastdit.tools", "fastdit.evaluation", "fastdit.kernels"],
    package_dir={"fastdit": "fastdit", "fastdit.kernels": "kernels"},
    package_data={"fastdit": ["assets/digits/*.json", "assets/digits/*.safetensors"]},
    # triton>=3.6: 3.6 is what the GPU machines carry (torch 2.11). 3.6 to 3.9 compile every default launch
    # without spilling registers, 3.6 with defaults of its own for two attention launchers
    # (kernels/launch.py, TRITON_3_6_DEFAULTS; docs/kernels.md, "Triton versions").
    install_requires=["torch>=2.5", "triton>=3.6", "numpy", "scipy", "safetensors>=0.4", "pillow", "tqdm", "scikit-learn"],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4", "pytest-xdist>=3", "matplotlib>=3.7"],
        "bench": ["pytest-benchmark>=4", "matplotlib>=3.7"],
        "vae": ["diffusers>=0.27"],
        # Reading and writing diffusers' DiT folders, DiTPipeline, the local Hugging Face cache (no downloads).
        "diffusers": ["diffusers>=0.30", "huggingface_hub"],
        "flash-attn": ["flash-attn>=2.5"],
        "xformers": ["xformers"],
        "native": ["cmake>=3.18", "ninja"],  # builds the C++ runner fastdit-run (CMakeLists.txt)
        # fastdit evaluate's Inception (FID, sFID, IS, precision/recall); not in "test": it pulls PyPI's torchvision,
        # which does not import beside a CPU torch (docs/evaluation.md). --digits needs nothing more.
        "eval": ["torch-fidelity>=0.3"],
    },
    entry_points={"console_scripts": ["fastdit=fastdit.cli:main"]},
)
