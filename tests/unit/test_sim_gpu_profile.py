"""olb.sim.gpu: profiles, the speed and load laws, memory, DCGM text; SimConfig's GPU knobs."""

import math
import re

import pytest

from olb.sim import SimConfig
from olb.sim.catalogue import KNOWN_MODELS
from olb.sim.gpu import (CPU_FACTOR, GIB, MIB, PROFILES, Gpu, GpuProfile, dcgm_text, gpu_profile,
                         runner_bytes, spilled_rate)

B8, B70 = KNOWN_MODELS["llama3.1:8b"], KNOWN_MODELS["llama3.1:70b"]


def test_default_profile_is_the_spec_figures():
    p = GpuProfile()
    # Defaults from llama.cpp's single-stream figures, and the load model (olb/sim/gpu.py).
    assert (p.eval_rate(B8), p.prompt_rate(B8)) == pytest.approx((130.0, 6000.0))
    assert (p.eval_rate(B70), p.prompt_rate(B70)) == pytest.approx((23.0, 800.0))
    assert p.load_seconds(B8) == pytest.approx(3.31, abs=0.01)
    assert p.load_seconds(B70) == pytest.approx(24.8, abs=0.1)
    assert p.alpha == 0.15 and p.vram == 80 * GIB


def test_smaller_models_are_faster_on_the_same_law():
    p = GpuProfile()
    small = KNOWN_MODELS["llama3.2:latest"]
    assert 200 < p.eval_rate(small) < 300 and p.prompt_rate(small) > 6000
    sizes = sorted(KNOWN_MODELS.values(), key=lambda s: s.size)
    rates = [p.eval_rate(s) for s in sizes]
    assert rates == sorted(rates, reverse=True)


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_profiles_hit_their_anchors(name):
    p = gpu_profile(name)
    assert p.eval_rate(B8) == pytest.approx(p.eval_8b) and p.prompt_rate(B70) == pytest.approx(p.prompt_70b)
    assert p.vram > 20 * GIB


def test_unknown_profile_and_bad_values():
    with pytest.raises(KeyError, match="known: default"):
        gpu_profile("tpu")
    with pytest.raises(ValueError):
        GpuProfile(vram=0)
    with pytest.raises(ValueError):
        GpuProfile(alpha=-1)


def test_runner_bytes_and_spill():
    # Llama-3-8B KV is 128 KiB per token (2 x 32 layers x 8 kv heads x 128 x 2 bytes).
    assert runner_bytes(B8, 8192, 1) - runner_bytes(B8, 4096, 1) == 4096 * 128 * 1024
    assert runner_bytes(B8, 4096, 4) - runner_bytes(B8, 4096, 1) == 3 * 4096 * 128 * 1024
    # num_ctx is capped at the training context.
    emb = KNOWN_MODELS["nomic-embed-text:latest"]
    assert runner_bytes(emb, 1 << 20, 1) == runner_bytes(emb, emb.context_length, 1)
    assert spilled_rate(100.0, 1.0) == 100.0
    assert spilled_rate(100.0, 0.0) == pytest.approx(100.0 * CPU_FACTOR)
    assert 100.0 * CPU_FACTOR < spilled_rate(100.0, 0.5) < 100.0


def test_config_gpu_knobs():
    assert SimConfig().gpu is None and SimConfig().time_scale == 1.0
    assert SimConfig(gpu="H100").gpu is PROFILES["h100"]
    custom = GpuProfile(vram=8 * GIB)
    assert SimConfig(gpu=custom).gpu is custom
    for bad in ({"gpu": "tpu"}, {"gpu": 3}, {"time_scale": 0}, {"max_loaded_models": -1},
                {"slot_queue": -1}, {"preload": ("llama3.2:1b",)}):
        with pytest.raises(ValueError):
            SimConfig(**bad)
    assert SimConfig(preload=("llama3.2",)).preload == ("llama3.2",)


LINE = re.compile(r'^(DCGM_FI_DEV_[A-Z_]+)\{((?:[A-Za-z_]+="(?:[^"\\]|\\.)*",?)+)\} (\d+)$')


def parse_dcgm(text: str) -> dict:
    """A strict reader of the exporter's text format: HELP, TYPE, sample."""
    out, lines = {}, text.splitlines()
    assert len(lines) % 3 == 0
    for i in range(0, len(lines), 3):
        help_line, type_line, sample = lines[i:i + 3]
        name = help_line.split()[2]
        assert help_line.startswith(f"# HELP {name} ") and type_line == f"# TYPE {name} gauge"
        m = LINE.match(sample)
        assert m and m.group(1) == name, sample
        labels = dict(re.findall(r'([A-Za-z_]+)="((?:[^"\\]|\\.)*)"', m.group(2)))
        out[name] = (labels, int(m.group(3)))
    return out


def test_dcgm_text():
    gpu = Gpu(GpuProfile(model_name='Odd "name"'), lambda: 0.0)
    gpu.used = 1000 * MIB + 5
    metrics = parse_dcgm(dcgm_text(gpu, "GPU-1234", "host-a").decode())
    assert list(metrics) == ["DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_FREE", "DCGM_FI_DEV_FB_USED"]
    labels, used = metrics["DCGM_FI_DEV_FB_USED"]
    assert used == 1000 and metrics["DCGM_FI_DEV_FB_FREE"][1] == 80 * 1024 - 1000
    assert metrics["DCGM_FI_DEV_GPU_UTIL"][1] == 0
    assert labels == {"gpu": "0", "UUID": "GPU-1234", "pci_bus_id": "00000000:01:00.0", "device": "nvidia0",
                      "modelName": 'Odd \\"name\\"', "Hostname": "host-a"}


def test_prefill_sharing_accounting():
    now = [0.0]

    class Job:
        pf_left = 0.0

    gpu = Gpu(GpuProfile(), lambda: now[0])
    a, b = Job(), Job()
    gpu.prefill_add(a, 1.0)
    now[0] = 0.5
    gpu.prefill_add(b, 1.0)                 # a has 0.5 left, now shared by two
    delay, first = gpu.prefill_next()
    assert first is a and delay == pytest.approx(1.0)
    now[0] = 1.5
    done = gpu.prefill_done()
    assert [j for j, _ in done] == [a] and done[0][1] == pytest.approx(1.5)
    now[0] = 2.0
    assert gpu.prefill_next() == (pytest.approx(0.0), b)
    assert math.isclose(gpu.prefill_done()[0][1], 2.0)
    assert gpu.prefilling == []
