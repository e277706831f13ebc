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


HEAP_CHECK = """
import numpy as np, minipeft.allocator as a
def in_heap(array):
    address = array.__array_interface__["data"][0]
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            start, end = (int(part, 16) for part in line.split()[0].split("-"))
            if start <= address < end:
                return True
    return False
before = in_heap(np.empty(64 << 18, np.float32))  # 64 MiB: above any mmap threshold glibc accepts
a.keep_freed_memory()
print(before, in_heap(np.empty(64 << 18, np.float32)))
"""


@pytest.mark.skipif(not glibc(), reason="mallopt is glibc's: not this platform's C library")
def test_large_arrays_come_from_the_heap_after_it():
    # A 64 MiB array (a large vocabulary's logits chunk) is mapped afresh by default; with the
    # settings it comes from the heap, whose freed memory the next step reuses.
    import os  # noqa: PLC0415

    env = {k: v for k, v in os.environ.items() if k != "MINIPEFT_MALLOC" and not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", HEAP_CHECK], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "True"]
