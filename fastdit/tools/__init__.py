"""Tools that drive a real model through the kernels: the ahead-of-time compile check (``python -m
fastdit.tools.aot``, its report in aot_report.py) and the launch-configuration sweep (``python -m
fastdit.tools.tune``). They stand above models/, which they build; kernels/ imports nothing from fastdit."""
