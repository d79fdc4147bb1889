"""The CPU output cache: large outputs reuse freed buffers, stay correct, and
can be emptied or turned off (BNFAST_CPU_CACHE_MB=0)."""

import os
import subprocess
import sys

import torch

import bnfast

SHAPE = (16, 8, 64, 64)  # 2 MiB of float32: above the 256 KiB threshold


def test_large_outputs_reuse_freed_buffers():
    bnfast.empty_cache()
    x = torch.randn(SHAPE)
    y = torch.ops.bnfast.forward(x, None, None, 1e-5)[0]
    ptr = y.data_ptr()
    del y
    assert torch.ops.bnfast.cpu_cache_idle_bytes() >= x.numel() * 4
    again = torch.ops.bnfast.forward(x, None, None, 1e-5)[0]
    assert again.data_ptr() == ptr
    expected = torch.nn.functional.batch_norm(x, None, None, training=True)
    torch.testing.assert_close(again, expected)


def test_reused_buffer_is_not_shared_with_a_live_tensor():
    bnfast.empty_cache()
    x = torch.randn(SHAPE)
    a = torch.ops.bnfast.forward(x, None, None, 1e-5)[0]
    b = torch.ops.bnfast.forward(x + 1, None, None, 1e-5)[0]
    assert a.data_ptr() != b.data_ptr()
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # normalization removes the shift
    torch.testing.assert_close(a, torch.nn.functional.batch_norm(x, None, None, training=True))


def test_small_outputs_bypass_the_cache():
    bnfast.empty_cache()
    y = torch.ops.bnfast.forward(torch.randn(4, 3, 5, 5), None, None, 1e-5)[0]
    del y
    assert torch.ops.bnfast.cpu_cache_idle_bytes() == 0


def test_seed_cnn_smallest_layer_is_cached():
    """128x64x4x4 float32 (512 KiB): the seed CNN's smallest BN output is reused."""
    bnfast.empty_cache()
    y = torch.ops.bnfast.forward(torch.randn(128, 64, 4, 4), None, None, 1e-5)[0]
    del y
    assert torch.ops.bnfast.cpu_cache_idle_bytes() >= 128 * 64 * 4 * 4 * 4
    bnfast.empty_cache()


def test_empty_cache_releases_idle_buffers():
    y = torch.ops.bnfast.forward(torch.randn(SHAPE), None, None, 1e-5)[0]
    del y
    assert torch.ops.bnfast.cpu_cache_idle_bytes() > 0
    bnfast.empty_cache()
    assert torch.ops.bnfast.cpu_cache_idle_bytes() == 0


def test_cache_can_be_turned_off():
    code = ("import torch, bnfast; y = torch.ops.bnfast.forward(torch.randn(16, 8, 64, 64), None, None, 1e-5)[0]; "
            "del y; print(torch.ops.bnfast.cpu_cache_idle_bytes())")
    env = dict(os.environ, BNFAST_CPU_CACHE_MB="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"
