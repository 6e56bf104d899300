"""`hub.machine.MeasurementCache` keys: what was measured and the settings it ran under."""

from __future__ import annotations

from hub.machine import KERNEL_ENV, MeasurementCache


def test_a_key_changes_with_the_settings_that_pick_cpu_kernels(monkeypatch):
    for name in KERNEL_ENV:
        monkeypatch.delenv(name, raising=False)
    plain = MeasurementCache.key("dtype", 2, "smollm2")
    assert MeasurementCache.key("dtype", 2, "smollm2") == plain
    assert MeasurementCache.key("dtype", 1, "smollm2") != plain
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # bf16 matmuls 4x slower on an AMX CPU
    assert MeasurementCache.key("dtype", 2, "smollm2") != plain
