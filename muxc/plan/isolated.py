"""`profile_in_child`: a device profile taken in a child Python process, not in the caller's.

Profiling runs every op kind of a model at many sizes (minutes for a 12-layer model on a 2-core
CPU). Done inside a training process, its probes share that process's heap and allocator with
what the caller holds, and whatever they leave stays there. `muxc.plan.load_or_profile` with
``profiler=profile_in_child`` (what ``Options(cost_model=path)`` uses) profiles the missing
keys here instead: a fresh interpreter (``python -m muxc.plan.isolated``, so the caller's
``__main__`` is never re-run) with the caller's torch thread count, environment and module
path, handing the profile back as JSON. Measured on the benchmark's llama-large case (8 tasks,
fresh profile, 2-vCPU VM): the training process's steady peak 702.4 MiB profiling in-process,
700.0 MiB profiling in a child (the two profiles led to different plans).

>>> prof = profile_in_child("cpu", [], elementwise_numels=(256,), repeats=1)  # doctest: +SKIP
>>> prof.identity["device_kind"]                                              # doctest: +SKIP
'cpu'
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

from muxc.plan.ops import CostModelError, OpKey
from muxc.plan.profile import DeviceProfile, profile_device

__all__ = ["profile_in_child"]

_STDERR_TAIL = 2000  # characters of the child's stderr quoted in an error


def profile_in_child(device: torch.device | str, keys: Iterable[OpKey],
                     **profile_kwargs) -> DeviceProfile:
    """`muxc.plan.profile_device` (same arguments) run in a child process."""
    request = {"device": str(torch.device(device)), "keys": list(keys),
               "threads": torch.get_num_threads(), "kwargs": profile_kwargs}
    with tempfile.TemporaryDirectory(prefix="muxc-profile-") as tmp:
        out = Path(tmp) / "profile.json"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        done = subprocess.run([sys.executable, "-m", "muxc.plan.isolated", str(out)],
                              input=pickle.dumps(request), capture_output=True, env=env)
        if done.returncode != 0 or not out.exists():
            tail = done.stderr.decode(errors="replace")[-_STDERR_TAIL:]
            raise CostModelError(
                f"profiling {request['device']} in a child process failed (exit "
                f"{done.returncode}):\n{tail}\nRemedy: fix the error above, or profile in this "
                "process with muxc.plan.profile_device and pass the profile to CostModel")
        return DeviceProfile.from_json(json.loads(out.read_text()))


def _main(out: str) -> None:
    request = pickle.loads(sys.stdin.buffer.read())
    torch.set_num_threads(request["threads"])
    profile = profile_device(request["device"], request["keys"], **request["kwargs"])
    Path(out).write_text(json.dumps(profile.to_json()))


if __name__ == "__main__":
    _main(sys.argv[1])
