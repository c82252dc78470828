"""What the tests that start fastdit in other processes share."""
import os


def torch_path_environment(**variables: str) -> dict[str, str]:
    """This process's environment without TRITON_INTERPRET, plus ``variables``: a fastdit started with it runs
    the fused ops' plain torch path. The tests that start processes test processes, files, signals and
    collectives, not the kernels (those are checked in-process, in tests/kernels and tests/models), and a whole
    interpreted run would take minutes on CI's two cores."""
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    environment.update(variables)
    return environment
