"""Shared fixtures: a tiny, freshly initialised UniRestorer saved as a weights bundle."""

from __future__ import annotations

import os

import pytest
import torch

from unirestorer.launch.ports import MASTER_PORTS
from unirestorer.launch.ports import free_port as free_port_in

# pytest-xdist (`-n 2 --dist loadfile`, pyproject.toml) hands test files to its two workers in collection order;
# the longest files go first so that no worker is left with one of them at the end (serial seconds per file on
# dev-2c, 2026-12-05: 371, 199, 165, 133, 125, 96, 94, 75; every other file under 60)
LONGEST_FIRST = ("test_experts_cluster.py", "test_demo.py", "test_extractor.py", "test_adversarial_train.py",
                 "test_train_spine.py", "test_quality_bench.py", "test_do_no_harm.py", "test_parallel.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file keeps its own order


PORT_BLOCK = 2000


def free_port() -> int:
    """A master port for a test's launcher, from one block per pytest-xdist worker (two workers never pick the
    same port), below the kernel's ephemeral range (see launch/env.py's free_port)."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    start = MASTER_PORTS.start + PORT_BLOCK * (worker % (len(MASTER_PORTS) // PORT_BLOCK))
    return free_port_in(range(start, start + PORT_BLOCK))


TINY_EXPERT = {"name": "nafnet", "preset": "tiny", "stat_window": 32}
TINY_EXTRACTOR = dict(backbone="test_resnet", embed_dim=16, proj_dim=8, crop=16, max_crops=2)


def build_tiny_unirestorer(seed: int = 0):
    """Real extractor, tree [1, 2, 4] fitted on embeddings of random 'noise'/'dark' images (intensity known
    for 'noise' only), tiny NAFNet experts perturbed away from identity (so they differ), router gates
    spread over leaves and levels."""
    from unirestorer.model.experts import create_expert
    from unirestorer.model.extractor import DegradationExtractor
    from unirestorer.model.router import Router
    from unirestorer.model.tree import DegradationTree
    from unirestorer.model.unirestorer import UniRestorer

    torch.manual_seed(seed)
    extractor = DegradationExtractor(**TINY_EXTRACTOR).eval()
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(12, 3, 24, 24, generator=g) * 0.6 + 0.2
    x = torch.cat([(base + torch.randn(base.shape, generator=g) * 0.2).clamp(0, 1), base * 0.2])
    tree = DegradationTree.fit(extractor.embed(x), [1, 2, 4], tasks=["noise"] * 12 + ["dark"] * 12, seed=seed,
                               intensities=[i / 20 for i in range(1, 13)] + [None] * 12)  # 'dark': unknown
    experts = {n: create_expert(**TINY_EXPERT) for n in range(tree.n_nodes)}
    with torch.no_grad():
        for expert in experts.values():
            for p in expert.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    router = Router.from_tree(tree)
    with torch.no_grad():
        router.g_d.weight.normal_(0, 1.0)
        router.g_g.weight.normal_(0, 1.0)
    return UniRestorer(extractor, tree, router, experts, expert_specs={n: TINY_EXPERT for n in experts}).eval()


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> str:
    """Folder of a saved tiny bundle (built once per session)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = tmp_path_factory.mktemp("bundle")
        build_tiny_unirestorer().save_bundle(path)
    finally:
        torch.set_num_threads(n)
    return str(path)


@pytest.fixture
def one_thread():
    """Tiny convs on a shared 2-core machine: one thread avoids oversubscription stalls."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def mapped_files() -> set[str]:
    """Every file some live process maps (Linux /proc)."""
    from pathlib import Path

    paths = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            paths.update(line.split(None, 5)[5].strip() for line in maps.read_text().splitlines() if line.count(" ") >= 5)
        except (OSError, IndexError):  # the process ended, or is not ours to read
            pass
    return paths


@pytest.fixture(autouse=True, scope="module")
def release_deepspeed_shm():
    """DeepSpeed's CPU all-reduce op leaves a 69 MB buffer per rank and master port in /dev/shm (a full run
    otherwise fills the machine's memory). After each module, the buffers no live process maps go: the
    modules run two at a time (pytest-xdist), so another module's ranks may still be using theirs."""
    from pathlib import Path

    yield
    live = mapped_files()
    for f in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"):
        if str(f) not in live:
            f.unlink(missing_ok=True)
