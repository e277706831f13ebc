"""minipeft/allocator.py: glibc's malloc settings are applied once, and never against the user's choice."""
import subprocess
import sys

import pytest

CHECK = "import minipeft.allocator as a; print(a.keep_freed_memory(), a.keep_freed_memory())"


def run(env_extra):
    import os  # noqa: PLC0415

    env = {k: v for k, v in os.environ.items() if k != "MINIPEFT_MALLOC" and not k.startswith("MALLOC_")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, check=True).stdout.split()


def glibc() -> bool:
    import platform  # noqa: PLC0415

    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not glibc(), reason="mallopt is glibc's: not this platform's C library")
def test_applied_once_on_glibc():
    assert run({}) == ["True", "True"]


@pytest.mark.parametrize("env", [{"MINIPEFT_MALLOC": "default"}, {"MALLOC_MMAP_THRESHOLD_": "131072"},
                                 {"MALLOC_ARENA_MAX": "2"}])
def test_the_users_choice_is_left_alone(env):
    assert run(env) == ["False", "False"]
