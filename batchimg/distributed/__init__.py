"""Scale-out on Ray (`batchimg run --ray local|ADDRESS --workers N`, extra `[ray]`).

    driver.py  plans the manifest's chunks, starts the hubs and the workers, relays progress
               and stops, replaces dead workers, adds up the summary
    worker.py  one Engine per worker, fed chunks from the queue (`Worker`, `ChunkSource`)
    shared.py  the run's one limiter, one budget and the chunk queue (the hubs, held by Ray
               actors) and the proxies a worker's engine uses in their place

Ray is imported only when a run asks for it.
"""

from __future__ import annotations

from .driver import run_on_ray

__all__ = ["run_on_ray"]
