"""The benchmark's self-tests, run with the suite (pyproject.toml's testpaths).

A package inside ``bench``, so pytest puts the repository root on ``sys.path`` to import them as
``bench.tests.*``: that is how ``import bench`` works here while ``tests/`` never imports the bench.
"""
