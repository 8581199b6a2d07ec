"""Peak memory of a benchmark's process tree while it runs: private and shared resident pages
of this process and of all its descendants (Ray's daemons and workers), and Ray's object-store
use, polled in a thread."""

from __future__ import annotations

import re
import threading

import psutil


def _rss_kib(pid: int) -> tuple[int, int]:
    """(private, shared) resident KiB of a process: ``RssAnon`` and ``RssShmem``. Shared
    pages are Ray's object store mapped into the process: they grow with every block it
    touches, up to the store's size, whatever the corpus, so they are reported apart."""
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(("RssAnon:", "RssShmem:")):
                key, value = line.split(":", 1)
                fields[key] = int(value.split()[0])
    return fields.get("RssAnon", 0), fields.get("RssShmem", 0)


class PeakSampler:
    """Peak private and shared resident memory of this process and of its whole tree (Ray's
    daemons and workers), and peak object-store use, polled every ``interval`` s."""

    KEYS = (
        "driver_private_mib",
        "driver_shared_mib",
        "tree_private_mib",
        "tree_shared_mib",
        "object_store_mib",
    )

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.peaks = dict.fromkeys(self.KEYS, 0.0)
        self.frames = 0  # the consumer's progress, set by it: each sample is stamped with it
        self.samples: list[tuple[int, tuple[float, ...]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def halves(self) -> dict[str, float]:
        """Each key's peak over the second half of the frames ÷ over the first half: about 1
        once memory has reached its plateau within the first half."""
        middle = self.frames / 2
        first = [v for f, v in self.samples if f < middle]
        second = [v for f, v in self.samples if f >= middle]
        if not first or not second:
            return {}
        return {
            key: max(v[i] for v in second) / max(v[i] for v in first)
            for i, key in enumerate(self.KEYS)
            if max(v[i] for v in first)
        }

    def _sample(self) -> tuple[float, ...]:
        me = psutil.Process()
        driver = _rss_kib(me.pid)
        private, shared = driver
        for proc in me.children(recursive=True):
            try:
                p, sh = _rss_kib(proc.pid)
            except OSError:
                continue
            private, shared = private + p, shared + sh
        kib = (driver[0], driver[1], private, shared)
        return (*(k / 1024 for k in kib), object_store_mib())

    def _run(self) -> None:
        while not self._stop.is_set():
            sample = self._sample()
            self.samples.append((self.frames, sample))
            for key, value in zip(self.KEYS, sample, strict=True):
                self.peaks[key] = max(self.peaks[key], value)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def object_store_mib() -> float:
    """Object-store memory in use on the local node, MiB (Ray's memory summary)."""
    import ray
    from ray._private.internal_api import memory_summary

    # this process's Ray by address: other Ray instances may run on the machine
    text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    found = re.search(r"Plasma memory usage (\d+) MiB", text)
    return float(found.group(1)) if found else 0.0
