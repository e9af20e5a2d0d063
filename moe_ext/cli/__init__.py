"""The launchers' logic. ``launch/infer.py`` and ``launch/train.py`` are thin Hydra entry
points: they read the environment and hand it, with the composed config, to ``main`` here.

- ``infer``: validate a generation job, build this rank's shard, generate, report.
- ``train``: validate a training job, train, checkpoint, export, report.
- ``io``: the prompts file and the output file of ``infer`` (read, checked, written
  atomically).
"""
