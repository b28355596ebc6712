"""PyTorch loader throughput: ``python benchmarks/loader_bench.py [--samples N]``.

Writes a synthetic corpus (default 600 samples in 300-sample tars, seed 7),
converts it with the default layout, and prints one JSON object. Every loader
uses the same batch size and workers and persistent workers; one untimed epoch
starts the workers, then ``--epochs`` epochs are timed, interleaved across
loaders, and the fastest counts. Every epoch must deliver every sample once.

Loaders (``<name>_sps``, samples/s):

- ``loader``: ``dataloader(InSARDataset, ShardAwareSampler)``, exact transforms,
  the platform's start method (fork on Linux); ``loader_forkserver`` the same
  with ``multiprocessing_context="forkserver"``.
- ``loader_fast``: the same with ``precision="fast"``.
- ``loader_stacked``: ``stack=True, dtype=torch.bfloat16`` (exact values, rounded).
- ``loader_raw``: ``precision="fast", device="cpu"``, the batches left raw: the
  workers only read (the raw arrays into shared memory); nothing is transformed.
- ``wds_loader``: the release loader's pattern over the tars (WebDataset, npz
  decode, the card's transforms per sample with the same numpy kernels).

Goal keys: ``loader_over_wds_loader``, ``loader_fast_over_wds_loader``,
``loader_fork_over_forkserver``, ``first_batch_s`` (a new loader's first batch
after ``iter``), ``train_over_min_loader_model`` (a small conv net on CPU fed by
``loader_stacked``: step rate over the slower of the loader alone and the model
fed synthetic tensors), ``loader_raw_ms_per_sample_worker`` (CPU time of the
workers per sample of ``loader_raw``), ``loader_stacked_over_dict``. The
in-process profile (``loader_profile_ms_per_sample``) says where a worker's time
goes. The work directory is reused when present.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import measure as m  # noqa: E402

NOTES = {
    "loader_over_wds_loader": (
        "dataloader(InSARDataset, ShardAwareSampler), exact transforms, fork workers, over the"
        " release loader's pattern (WebDataset over the tars, npz decode, the card's transforms"
        " per sample); same batch size and workers, best of interleaved epochs"
        " (benchmarks/loader_bench.py)"
    ),
    "loader_fast_over_wds_loader": "the same with precision='fast' (torch kernels)",
    "loader_fork_over_forkserver": "the exact loader with fork workers over forkserver workers",
    "first_batch_s": "iter() of a new dataloader (fork workers) to its first batch of 64",
    "train_over_min_loader_model": (
        "a small conv net (CPU, main process) fed by stack=True, dtype=bfloat16 batches: step"
        " rate over min(that loader alone, the model fed synthetic tensors)"
    ),
    "loader_raw_ms_per_sample_worker": (
        "CPU time of the workers (psutil) per sample when they only read (device='cpu',"
        " batches left raw: the raw arrays into pooled shared memory, no transform)"
    ),
    "loader_stacked_over_dict": "stack=True, dtype=bfloat16 loader over today's dict of float32",
    "gpu_train_vit_s_sps": (
        "ViT-S/16, 128 px, 22 channels, bf16, 16 workers on a GPU machine: not measured (no GPU"
        " machine was lent to this run)"
    ),
}


def _worker_cpu(loader: Any) -> float:
    """CPU seconds used so far by the persistent workers of ``loader``."""
    import psutil

    it = loader._iterator
    total = 0.0
    for w in getattr(it, "_workers", []):
        times = psutil.Process(w.pid).cpu_times()
        total += times.user + times.system
    return total


def _model(channels: int):
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(channels, 16, 8, stride=8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 4, stride=4),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(32, 1),
    )


def _step(model: Any, optimizer: Any, x: Any) -> None:
    loss = model(x.float()).square().mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def loaders(cube: Path, corpus: Path, *, batch_size: int, num_workers: int, epochs: int) -> dict:
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    from nasar_zarr.torch import InSARDataset, ShardAwareSampler, dataloader

    common = {"batch_size": batch_size, "num_workers": num_workers}
    # First batch of a new loader (fork, workers started by iter), before anything else.
    first_ds = InSARDataset(str(cube))
    first = dataloader(first_ds, sampler=ShardAwareSampler(first_ds, seed=9), **common)
    t = m.now()
    next(iter(first))
    first_batch_s = m.now() - t
    del first

    datasets = {
        "loader": InSARDataset(str(cube)),
        "loader_forkserver": InSARDataset(str(cube)),
        "loader_fast": InSARDataset(str(cube), precision="fast"),
        "loader_stacked": InSARDataset(str(cube), stack=True, dtype=torch.bfloat16),
        "loader_raw": InSARDataset(str(cube), precision="fast", device="cpu"),
    }
    samplers = {name: ShardAwareSampler(ds, seed=0) for name, ds in datasets.items()}
    built: dict[str, Any] = {
        "loader_random": dataloader(
            datasets["loader"],
            sampler=RandomSampler(datasets["loader"], generator=torch.Generator().manual_seed(0)),
            **common,
        )
    }
    for name, ds in datasets.items():
        extra = {"multiprocessing_context": "forkserver"} if name.endswith("forkserver") else {}
        built[name] = dataloader(ds, sampler=samplers[name], **extra, **common)
    built["wds_loader"] = DataLoader(
        m.release_wds_dataset(m.tar_paths(corpus)), persistent_workers=True, **common
    )
    n = len(datasets["loader"])
    best: dict[str, float] = {}
    startup: dict[str, float] = {}
    worker_cpu: dict[str, float] = {}
    for epoch in range(epochs + 1):
        for sampler in samplers.values():
            sampler.set_epoch(epoch)
        for name, loader in built.items():
            cpu = _worker_cpu(loader) if epoch else 0.0
            t = m.now()
            it = iter(loader)
            if name == "loader_raw":
                it._finish = None  # raw batches: nothing transformed in this process
            count = sum(len(batch["sample_key"]) for batch in it)
            seconds = m.now() - t
            if epoch:  # the workers' CPU: far less sensitive to other tenants than wall time
                used = _worker_cpu(loader) - cpu
                worker_cpu[name] = min(worker_cpu.get(name, float("inf")), used)
            if count != n:
                raise RuntimeError(f"{name} delivered {count} samples, expected {n}")
            if epoch == 0:
                startup[name] = round(seconds, 3)
            else:
                best[name] = min(best.get(name, float("inf")), seconds)

    # The model alone (synthetic batches) and fed by the stacked loader, same batches.
    channels = len(datasets["loader_stacked"].channels)
    model = _model(channels)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)
    synthetic = torch.rand(batch_size, channels, 128, 128).to(torch.bfloat16)
    batches = -(-n // batch_size)
    _step(model, optimizer, synthetic)
    model_s = float("inf")
    train_s = float("inf")
    stacked = built["loader_stacked"]
    for epoch in range(epochs):
        t = m.now()
        for _ in range(batches):
            _step(model, optimizer, synthetic)
        model_s = min(model_s, m.now() - t)
        samplers["loader_stacked"].set_epoch(100 + epoch)
        t = m.now()
        for batch in stacked:
            _step(model, optimizer, batch["x"])
        train_s = min(train_s, m.now() - t)

    sps = {name: n / s for name, s in best.items()}
    out: dict[str, Any] = {f"{name}_sps": round(v, 1) for name, v in sps.items()}
    out["model_sps"] = round(batches * batch_size / model_s, 1)
    out["train_sps"] = round(n / train_s, 1)
    out["loader_over_wds_loader"] = round(sps["loader"] / sps["wds_loader"], 3)
    out["loader_random_over_wds_loader"] = round(sps["loader_random"] / sps["wds_loader"], 3)
    out["loader_fast_over_wds_loader"] = round(sps["loader_fast"] / sps["wds_loader"], 3)
    out["loader_fork_over_forkserver"] = round(sps["loader"] / sps["loader_forkserver"], 3)
    out["first_batch_s"] = round(first_batch_s, 3)
    out["train_over_min_loader_model"] = round(
        (n / train_s) / min(sps["loader_stacked"], out["model_sps"]), 3
    )
    out["loader_raw_ms_per_sample_worker"] = round(worker_cpu["loader_raw"] * 1e3 / n, 3)
    out["loader_worker_cpu_ms_per_sample"] = {
        name: round(cpu * 1e3 / n, 3) for name, cpu in worker_cpu.items()
    }
    out["loader_stacked_over_dict"] = round(sps["loader_stacked"] / sps["loader"], 3)
    out["loader_first_epoch_s"] = startup
    out["loader_profile_ms_per_sample"] = profile(datasets, batch_size=batch_size)
    out["gpu_train_vit_s_sps"] = None  # a GPU machine's figure; none was lent to this run
    out["notes"] = NOTES
    out["loader_setup"] = {
        "samples": n,
        "batch_size": batch_size,
        "num_workers": num_workers,
        "timed_epochs": epochs,
        "torch_threads_main": torch.get_num_threads(),
        "inner_chunk": datasets["loader"].inner_chunk,
        "shard": datasets["loader"].shard_size,
    }
    return out


def profile(datasets: dict[str, Any], *, batch_size: int, batches: int = 3) -> dict[str, float]:
    """Where a worker's time goes, in this process (ms per sample, best of 3 passes).

    Shard-aware batches: ``read`` (the shard decoder, every variable), then each
    output built from those arrays into fresh shared memory as in a worker
    (``dict_f32``: today's per-key float32 buffers; ``fast_f32``; ``stacked_bf16``;
    ``raw``: the raw arrays copied into shared memory), and ``shm_alloc_dict_f32``
    / ``shm_alloc_stacked_bf16``: allocating and first touching that much shared
    memory alone (the kernel's page work, part of every figure above).
    """
    import torch

    from nasar_zarr import torch as nt
    from nasar_zarr.torch.buffers import _Block, _shared_empty

    ds = datasets["loader"]
    order = nt.shard_aware_order(
        ds.sample_indices, shard=ds.shard_size, inner_chunk=ds.inner_chunk, seed=1, epoch=0
    )
    picks = [
        ds.sample_indices[order[i * batch_size : (i + 1) * batch_size]] for i in range(batches)
    ]
    n = sum(len(p) for p in picks)
    reader = ds.reader
    data = [reader[p] for p in picks]

    def best(fn) -> float:
        times = []
        for _ in range(3):
            t = time.thread_time()
            fn()
            times.append(time.thread_time() - t)
        return round(min(times) * 1e3 / n, 3)

    def build(name: str):
        d = datasets[name]
        return lambda: [d._outputs(x, _Block(None, _shared_empty)) for x in data]

    def shm(channels: int, dtype: Any):
        def run() -> None:
            for p in picks:
                _shared_empty((len(p), channels, 128, 128), dtype).fill_(0)

        return run

    raw = datasets["loader_raw"]
    return {
        "read": best(lambda: [reader[p] for p in picks]),
        "dict_f32": best(build("loader")),
        "fast_f32": best(build("loader_fast")),
        "stacked_bf16": best(build("loader_stacked")),
        "raw": best(lambda: [raw._raw_tensors(x, _Block(None, _shared_empty)) for x in data]),
        "shm_alloc_dict_f32": best(shm(22, torch.float32)),
        "shm_alloc_stacked_bf16": best(shm(22, torch.bfloat16)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=600, help="corpus size (300 per tar)")
    p.add_argument("--workdir", type=Path, default=HERE / "work" / "loader")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per loader")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)

    from nasar_zarr import plan_conversion
    from nasar_zarr.testing import write_corpus

    n_tars = max(1, round(args.samples / 300))
    corpus = args.workdir / f"corpus-{n_tars}x300"
    cube = args.workdir / f"cube-{n_tars}x300.zarr"
    if not (corpus / "metadata.parquet").exists():
        write_corpus(corpus, n_shards=n_tars, samples_per_shard=300, seed=7)
    if not (cube / "zarr.json").exists():
        plan_conversion(str(corpus), str(cube)).execute(workers=0)
    m.warm_page_cache([*m.tar_paths(corpus), cube])
    result = loaders(
        cube, corpus, batch_size=args.batch_size, num_workers=args.workers, epochs=args.epochs
    )
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
