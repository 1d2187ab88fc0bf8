"""asmkit on a Ray cluster (optional: ``pip install 'asmkit[ray]'``).

- :func:`connect` joins a cluster (``host:port``) or starts a local one, and fails within
  a timeout when nothing answers;
- :func:`build_index` extracts, quantizes and aggregates images on the workers, which send
  back the compact aggregates; the codebook is trained first on a sample
  (:func:`sample_descriptors`);
- :class:`ShardedIndex` holds one ``Index.split`` shard per actor; a search fans out to
  the shards and is merged with ``asmkit.merge_topk``: the result is exactly
  ``Index.search`` of the whole index;
- :func:`scores_topk` ranks many queries (all-vs-all top-k) as query-block tasks;
- :func:`remote_task` makes a Ray task whose workers settle float32 ties on the driver's
  faiss thread count (``asmkit.quantizer.set_settle_threads``), as every task and actor
  here does, so the cluster's words are the driver's;
- :func:`save_shards` / :meth:`ShardedIndex.save` and :meth:`ShardedIndex.load` keep shards
  as a directory of ``Index.save`` directories plus ``shards.json``.

The engine never imports this package, and this package imports Ray only when called, so
``import asmkit.distributed`` works without Ray and calls raise
:class:`RayNotInstalledError` with the install command.
"""

from ._ray import INSTALL, ClusterUnreachableError, Connection, RayNotInstalledError, connect, remote_task, require_ray
from .build import IndexBuild, build_index, concat_aggregates, sample_descriptors
from .shards import SHARDS_MANIFEST, ShardedIndex, is_sharded, read_manifest, save_shards, scores_topk

__all__ = [
    "INSTALL",
    "SHARDS_MANIFEST",
    "ClusterUnreachableError",
    "Connection",
    "IndexBuild",
    "RayNotInstalledError",
    "ShardedIndex",
    "build_index",
    "concat_aggregates",
    "connect",
    "is_sharded",
    "read_manifest",
    "remote_task",
    "require_ray",
    "sample_descriptors",
    "save_shards",
    "scores_topk",
]
