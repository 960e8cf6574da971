"""Synthetic degradations, the shard writer and the streaming loader.

OpenCV runs single-threaded in every process that imports this package: parallelism comes from
worker processes, and OpenCV's thread pool is not fork-safe (a DataLoader worker forked after the
parent ran a threaded cv2 call deadlocks in its first cv2 call).
"""

import cv2

cv2.setNumThreads(1)
