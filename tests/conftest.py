"""Test set-up: 8 simulated CPU devices (for sharding tests) before JAX is imported."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Keep the measured-peak cache out of the user's home and avoid measuring in tests.
os.environ.setdefault("VPT_CPU_PEAK_FLOPS", "1e11")

# ../shared beside the repository holds data for tests (GSM8K); VPT_SHARED_DIR overrides.
SHARED_DIR = os.environ.get(
    "VPT_SHARED_DIR", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared"))
GSM8K_DIR = os.path.join(SHARED_DIR, "data", "gsm8k")
