"""sta.memory.reuse_freed_memory and `sta train --reuse-memory`."""
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = (64 << 20) // 4096  # of the 64 MB block below


def _faults_per_round(apply: bool) -> list:
    """In a child process (the test process keeps its allocator): page faults of 40 rounds of
    allocating, writing and freeing one 64 MB tensor."""
    code = textwrap.dedent(f"""
        import resource, sta.memory, torch
        assert {apply} is False or sta.memory.reuse_freed_memory()

        def faults_of_a_written_block():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            x = torch.empty(16 << 20)  # 64 MB of float32
            x.fill_(1.0)
            del x
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

        print(" ".join(str(faults_of_a_written_block()) for _ in range(40)))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    return [int(x) for x in out.stdout.split()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_reuse_freed_memory_ends_the_page_faults_of_a_reallocated_block():
    """By default every round maps the block afresh and faults in each page. Once freed memory
    is kept, the heap grows until a freed block fits the next request (a few rounds: glibc's
    aligned allocations fragment it; 2-8 rounds measured), then rounds reuse it without faults."""
    default = _faults_per_round(False)
    assert min(default[-5:]) > PAGES // 2, default
    reused = _faults_per_round(True)
    assert sum(reused[-5:]) < PAGES, reused


def test_sta_train_reuses_memory_when_asked(tmp_path, monkeypatch, reuse_memory_calls):
    import torch

    from sta.cli import main

    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    try:
        assert main(["train", "--preset", "tiny", "--steps", "1", "--out", "a", "--quiet"]) == 0
        assert reuse_memory_calls == []
        assert main(["train", "--preset", "tiny", "--steps", "1", "--out", "b", "--quiet", "--reuse-memory"]) == 0
        assert reuse_memory_calls == [True]
    finally:
        torch.set_num_threads(threads)
