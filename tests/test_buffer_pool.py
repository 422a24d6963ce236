"""The CPU buffer pool of the compiled ops (csrc/buffer_pool.h, ``sta.backends.cpu.memory_stats``).

The ops take their buffers of 1 MiB and more from it: a freed block is handed out again instead of
fresh pages. Checked here: reuse, the results are the same bits with the pool off, the limit holds,
every block comes back when its tensors die (no leak), the profiler sees the pool's tensors, and
bad limits are refused with the argument named.
"""
import os
import subprocess
import sys

import pytest
import torch

import sta
from sta import _extension
from sta.backends import cpu as cpu_backend

pytestmark = pytest.mark.usefixtures("one_thread")

MIB = 2 ** 20


@pytest.fixture
def pool():
    """The extension loaded, the pool emptied before and restored to its limit after the test."""
    assert _extension.load() is not None, f"the C++ extension must build here: {_extension.error()}"
    limit = cpu_backend.memory_stats()["limit"]
    cpu_backend.empty_cache()
    yield cpu_backend
    cpu_backend.set_cache_limit(limit)
    cpu_backend.empty_cache()


def _weights(K=4, D=256, H=256, dtype=torch.float32):
    """W1 (K, H, D), W2 (K, D, H): a (K, D, H) float32 divergence matrix of 1 MiB at the defaults."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(K, H, D, generator=gen, dtype=dtype), torch.randn(K, D, H, generator=gen, dtype=dtype)


def test_a_freed_block_is_handed_out_again(pool):
    W1, W2 = _weights()
    P = torch.ops.sta.divergence_matrix(W1, W2)
    assert pool.memory_stats()["in_use"] == MIB
    first = P.data_ptr()
    del P
    stats = pool.memory_stats()
    assert stats["in_use"] == 0 and stats["cached"] == MIB
    P = torch.ops.sta.divergence_matrix(W1, W2)
    assert P.data_ptr() == first and pool.memory_stats()["cached"] == 0
    assert torch.equal(P, W2 * W1.transpose(1, 2))
    grad_W1, grad_W2 = torch.ops.sta.divergence_matrix_bwd(P, W1, W2)  # both outputs pooled too
    assert pool.memory_stats()["in_use"] == 3 * MIB
    assert torch.equal(grad_W2, P * W1.transpose(1, 2)) and torch.equal(grad_W1, (P * W2).transpose(1, 2))


def test_small_buffers_and_other_sizes_do_not_take_a_block(pool):
    W1, W2 = _weights()
    P = torch.ops.sta.divergence_matrix(W1, W2)
    del P
    small = torch.ops.sta.divergence_matrix(*_weights(K=1, D=64, H=64))  # 16 KiB: malloc's
    assert pool.memory_stats()["cached"] == MIB and pool.memory_stats()["in_use"] == 0
    big = torch.ops.sta.divergence_matrix(*_weights(K=8))  # 2 MiB: the 1 MiB block is too small
    stats = pool.memory_stats()
    assert stats["cached"] == MIB and stats["in_use"] == 2 * MIB
    assert torch.equal(small, _weights(K=1, D=64, H=64)[1] * _weights(K=1, D=64, H=64)[0].transpose(1, 2))
    del big


def test_a_block_serves_a_request_at_most_an_eighth_smaller(pool):
    """Per-pair buffers change size from call to call (P active pairs): a block is reused for a
    request between 7/8 of it and its size, never for a much smaller one."""
    W1, W2 = _weights(K=8)  # 2 MiB
    P = torch.ops.sta.divergence_matrix(W1, W2)
    block = P.data_ptr()
    del P
    P = torch.ops.sta.divergence_matrix(W1[:7], W2[:7])  # 1.75 MiB: reuses the 2 MiB block
    assert P.data_ptr() == block and pool.memory_stats()["in_use"] == 2 * MIB
    del P
    P = torch.ops.sta.divergence_matrix(W1[:4], W2[:4])  # 1 MiB: a block of its own
    assert P.data_ptr() != block and pool.memory_stats()["in_use"] == MIB
    del P
    assert pool.memory_stats() == {"cached": 3 * MIB, "in_use": 0, "limit": pool.memory_stats()["limit"]}


def test_the_limit_bounds_the_free_blocks_and_zero_turns_the_pool_off(pool):
    W1, W2 = _weights()
    outs = [torch.ops.sta.divergence_matrix(W1, W2) for _ in range(3)]
    del outs
    assert pool.memory_stats()["cached"] == 3 * MIB
    pool.set_cache_limit(2 * MIB)
    assert pool.memory_stats()["cached"] == 2 * MIB
    assert pool.empty_cache() == 2 * MIB and pool.memory_stats()["cached"] == 0
    pool.set_cache_limit(0)
    P = torch.ops.sta.divergence_matrix(W1, W2)
    assert pool.memory_stats() == {"cached": 0, "in_use": 0, "limit": 0}
    assert torch.equal(P, W2 * W1.transpose(1, 2))


def _train_step(backend="cpu"):
    """One flow_step forward + backward at sizes whose weight gradients and per-pair buffers are
    pool blocks (K = 4, H = 256, D = 255: (K, H, D) float32 ~1 MiB), and an Adam step."""
    torch.manual_seed(0)
    fields = sta.FieldBank(255, 2, 2, 256, rotational="mlp")
    opt = torch.optim.Adam(fields.parameters(), lr=1e-3)
    z = torch.randn(1100, 255)
    g_pot = torch.rand(1100, 2) * (torch.rand(1100, 2) < 0.7)
    g_rot = torch.rand(1100, 2) * (torch.rand(1100, 2) < 0.7)
    out = sta.flow_step(z, 0.3, g_pot, g_rot, fields, 0.1, ("z", "div"), backend=backend)
    (out.z.square().sum() + out.div.sum()).backward()
    grads = [p.grad.clone() for p in fields.parameters()]
    opt.step()
    return out.z.detach().clone(), out.div.detach().clone(), grads, [p.detach().clone() for p in fields.parameters()]


def test_training_step_is_the_same_bits_with_the_pool_off_and_leaks_nothing(pool):
    with_pool = _train_step()
    assert pool.memory_stats()["in_use"] == 0  # every block back once its tensors died
    assert pool.memory_stats()["cached"] >= MIB  # ... and kept for the next call
    pool.set_cache_limit(0)
    without = _train_step()
    for a, b in zip(with_pool[:2], without[:2]):
        assert torch.equal(a, b)
    for group_a, group_b in zip(with_pool[2:], without[2:]):
        for a, b in zip(group_a, group_b):
            assert torch.equal(a, b)


def test_the_profiler_counts_the_pool_tensors(pool):
    from torch.profiler import ProfilerActivity, profile
    W1, W2 = _weights()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        P = torch.ops.sta.divergence_matrix(W1, W2)
        del P
    sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    assert MIB in sizes and -MIB in sizes


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_set_cache_limit_refuses_bad_values(pool, bad):
    with pytest.raises(ValueError, match="limit_bytes must be an int >= 0"):
        pool.set_cache_limit(bad)


def _limit_in_fresh_process(value):
    code = "from sta.backends import cpu\nprint(cpu.memory_stats()['limit'])"
    env = dict(os.environ, STA_CPU_POOL_MB=value)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_the_limit_comes_from_the_environment(pool):
    done = _limit_in_fresh_process("3")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == str(3 * MIB)
    done = _limit_in_fresh_process("lots")
    assert done.returncode != 0 and "STA_CPU_POOL_MB must be a whole number of megabytes >= 0, got 'lots'" in done.stderr


def test_a_bad_limit_in_the_environment_raises_at_every_call_not_only_the_first():
    code = ("from sta.backends import cpu\nfor _ in range(2):\n    try:\n        cpu.memory_stats()\n"
            "        print('no error')\n    except RuntimeError as err:\n        print('raised')")
    env = dict(os.environ, STA_CPU_POOL_MB="-5")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["raised", "raised"]
